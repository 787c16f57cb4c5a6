"""Writing GGUF files for the tests with gguf-py (the `gguf` package): a demo checkpoint in F32 or Q8_0, and small
broken files (cut off, no tokenizer, an architecture no loader knows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gguf

# Hugging Face Llama tensor names -> GGUF names (llama.cpp's convention); {i} is the layer.
LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def rope_interleave(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q and k rows with each head's two rotary halves interleaved (its own rotary layout);
    transformers' loader undoes exactly this."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> tuple[str, int | None]:
    """GGUF name of a Hugging Face Llama tensor, and its layer (None outside the blocks)."""
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        layer = int(parts[2])
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        return LLAMA_NAMES[key].format(i=layer), layer
    return LLAMA_NAMES[hf_name], None


def _tokenizer_fields(writer: gguf.GGUFWriter, folder: Path) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as GGUF's `gpt2` tokenizer model, with its chat template."""
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *added.values()]) + 1
    tokens = [""] * size
    types = [gguf.TokenType.NORMAL] * size
    for token, i in vocab.items():
        tokens[i] = token
    for token, i in added.items():
        tokens[i], types[i] = token, gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, setter in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                         ("pad_token", writer.add_pad_token_id)):
        if config.get(role) in added:
            setter(added[config[role]])
    writer.add_add_bos_token(True)
    template = folder / "chat_template.jinja"
    if template.exists():
        writer.add_chat_template(template.read_text(encoding="utf-8"))


def write_llama_gguf(folder: Path, target: Path, quantisation: str = "F32", tokenizer: bool = True,
                     architecture: str = "llama") -> Path:
    """A Hugging Face Llama folder (safetensors) as one GGUF file: F32, or Q8_0 for the 2-D weights
    (llama.cpp's choice: norms stay F32)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    writer = gguf.GGUFWriter(str(target), architecture)
    writer.add_name("selfref demo")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quantisation == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if tokenizer:
        _tokenizer_fields(writer, folder)
    for hf_name, array in weights.items():
        name, _ = gguf_name(hf_name)
        data = array.astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = rope_interleave(data, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            data = rope_interleave(data, config["num_key_value_heads"])
        if quantisation == "Q8_0" and data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
