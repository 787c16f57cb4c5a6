"""Synthetic demo checkpoints in Hugging Face format, with attention effects planted at known heads.

A demo family's base and instruct share one random initialisation (the spec's `seed`). Residual
dimensions are reserved: one is constant for every token, and one per prompt language marks that language's
self-referent words (you, your, ...; 你, 您; tú, te, ti, tu, ...: SELF_MARKERS). A `self_focus` head reads the
constant dimension in its query and the self dimensions of the spec's `self_languages` (default: every
language) in its key, on the lowest-frequency rotary pair (so position barely matters): its queries attend to
self-referent tokens of those languages. `planted` heads are wired the same way in base and instruct except for that
query row, so the two variants differ only where the spec says. `noise` perturbs only weights that
no attention pattern reads (last layer's value/output/MLP, final norm, unembedding), so a family
meant to show no effect holds that null exactly (docs/method.md, "Exact nulls").

For families with several training stages: `clones` ([layer, head, of_head]) makes a head compute
exactly the pattern of another head of its key/value group, and `mute_planted` zeroes the output of the
planted heads, so that changing their focus changes no other head. A layer with k identical self-focus
heads that lose their focus one by one over the stages then changes by exactly j/k of its total at a
step where j of them do: a planted split of the change that the step shares must recover.

For the residual-stream probes (docs/method.md, "What the residual stream encodes"): `plain_embedding` gives every
token the same embedding apart from the reserved dimensions (so only self-referent words differ), `transparent`
zeroes every attention output and MLP output (each layer passes the residual stream on unchanged), and
`probe_write` ([layer, head]) makes that head read the self dimensions of its keys through its value and write them
into one more reserved dimension (PROBE_DIM) of the residual stream. Its attention pattern is not touched, so a
base with the write and an instruct without it have the same attention patterns (an exact null for every entropy
statistic) and the same residual stream up to that layer; from it on, the last token of a self-referent prompt
carries a direction the other prompts lack.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from analysis.core.errors import UserError
from analysis.core.quantities import LANGUAGES

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
# The demo's self markers per language: the words that address the model, as whole tokens (self_token_ids).
SELF_MARKERS = {
    "en": ("you", "your", "yours", "yourself", "yourselves"),
    "zh": ("你", "您"),
    "es": ("tú", "te", "ti", "tu", "tus", "contigo"),
}
SELF_WORDS = frozenset(SELF_MARKERS["en"])
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CJK_CHARACTER = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]"
CONST_DIM = 0
SELF_DIMS = {language: 1 + i for i, language in enumerate(LANGUAGES)}  # one marker dimension per language
PROBE_DIM = 1 + len(LANGUAGES)  # where a `probe_write` head writes what it read from self-referent keys
PROBE_GAIN = 4.0  # value of PROBE_DIM per unit of attention on self-referent tokens (RMS-normalised input)
FOCUS_SCORE = 8.0  # attention logit a self-focus head gives a self-referent key, before normalisation drift;
# strong enough that attending to a marker late in an English prompt still lowers the head's entropy
VOCAB_SIZE = 4096
QK_SCALE = 4.0  # random query/key weights scaled up so random heads attend unevenly, as trained heads do

# A little general text beside the prompts, so the tokenizer learns ordinary English merges too.
_CORPUS = """
The river runs past the old mill and into the lake below the hills.
Scientists measure the speed of light with lasers and mirrors.
A library keeps books, maps and newspapers for anyone who asks.
Bread rises because yeast turns sugar into gas.
The committee met on Tuesday to discuss the budget for next year.
Mountains form where plates of the crust push against each other.
You can ask a question, and I will try to answer it; she said the same to him.
They walked to the station, bought tickets and waited for the train.
"""

REQUIRED_KEYS = ("architecture", "layers", "hidden", "heads", "kv_heads", "seed")


def check_spec(spec: dict[str, Any], where: str) -> None:
    """Raise UserError naming the checkpoint when a demo spec cannot describe a valid model."""
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise UserError(f"{where}: demo spec lacks {', '.join(missing)}")
    if spec["architecture"] not in ARCHITECTURES:
        raise UserError(f"{where}: unknown architecture {spec['architecture']!r}; use one of {', '.join(ARCHITECTURES)}")
    hidden, heads, kv = int(spec["hidden"]), int(spec["heads"]), int(spec["kv_heads"])
    if hidden % heads or heads % kv or (hidden // heads) % 2:
        raise UserError(f"{where}: hidden must split into an even head size and heads into kv_heads groups")
    for layer, head in [*spec.get("planted", []), *spec.get("self_focus", [])]:
        if not (0 <= layer < int(spec["layers"]) and 0 <= head < heads):
            raise UserError(f"{where}: planted head [{layer}, {head}] is outside {spec['layers']} layers x {heads} heads")
    stray = {tuple(x) for x in spec.get("self_focus", [])} - {tuple(x) for x in spec.get("planted", [])}
    if stray:
        raise UserError(f"{where}: self_focus heads {sorted(stray)} must also be listed under planted")
    group = heads // kv
    for entry in spec.get("clones", []):
        if len(entry) != 3:
            raise UserError(f"{where}: clones entry {entry} must be [layer, head, of_head]")
        layer, head, source = map(int, entry)
        if not (0 <= layer < int(spec["layers"]) and 0 <= head < heads and 0 <= source < heads) or head == source:
            raise UserError(f"{where}: clones entry {entry} names a head outside {spec['layers']} layers x {heads} "
                            "heads, or a head cloning itself")
        if head // group != source // group:
            raise UserError(f"{where}: clones entry {entry}: a clone must share its key/value head with its source "
                            f"({group} query heads per key/value head)")
    languages = spec.get("self_languages", list(LANGUAGES))
    if not isinstance(languages, list) or not languages or any(x not in LANGUAGES for x in languages):
        raise UserError(f"{where}: self_languages {languages!r} must be a non-empty list of {', '.join(LANGUAGES)}")
    for key in ("mute_planted", "transparent", "plain_embedding"):
        if not isinstance(spec.get(key, False), bool):
            raise UserError(f"{where}: {key} must be true or false")
    write = spec.get("probe_write")
    if write is not None:
        if not (isinstance(write, list) and len(write) == 2 and all(isinstance(x, int) for x in write)
                and 0 <= write[0] < int(spec["layers"]) and 0 <= write[1] < heads):
            raise UserError(f"{where}: probe_write {write!r} must be [layer, head] inside {spec['layers']} layers x "
                            f"{heads} heads")
        if not spec.get("transparent", False):
            raise UserError(f"{where}: probe_write needs transparent: true (other layers must not move the "
                            "self-referent dimensions to the last token themselves)")
    if hidden <= PROBE_DIM:
        raise UserError(f"{where}: hidden must exceed {PROBE_DIM} (reserved residual dimensions)")


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the prompt texts plus a small corpus; adds a BOS token."""
    tok = Tokenizer(models.BPE())
    # Each CJK character is its own pre-token (Chinese has no spaces: without this, BPE learns whole questions).
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CJK_CHARACTER), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*sorted(texts), *_CORPUS.strip().splitlines()], trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        padding_side="right", model_max_length=512,
    )


def self_token_ids(tokenizer: PreTrainedTokenizerFast, language: str = "en") -> list[int]:
    """Ids of tokens that spell a whole self-referent word of `language`: English in any case, with or without a
    leading space; Spanish after a space or capitalised (a word's start: "te" inside "gente" is no marker); Chinese
    the character itself."""
    words = frozenset(SELF_MARKERS[language])

    def marks(text: str) -> bool:
        if language == "es":
            return (text.startswith(" ") and text[1:] in words) or (text[:1].isupper() and text.lower() in words)
        return text.strip().lower() in words

    return sorted(i for token, i in tokenizer.get_vocab().items() if marks(tokenizer.convert_tokens_to_string([token])))


def _focus_gain(hidden: int, head_dim: int) -> float:
    # After RMSNorm the constant dimension is about sqrt(hidden) and a self token's marker about
    # sqrt(hidden / 2); the logit is gain^2 * their product / sqrt(head_dim).
    return math.sqrt(FOCUS_SCORE * math.sqrt(2 * head_dim) / hidden)


@torch.no_grad()
def build_model(spec: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """Random-init model of the spec's architecture with the spec's planted heads wired in."""
    config_cls, model_cls = ARCHITECTURES[spec["architecture"]]
    hidden, heads, kv = int(spec["hidden"]), int(spec["heads"]), int(spec["kv_heads"])
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=int(spec["layers"]), num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=512, rope_theta=1.0e6, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(int(spec["seed"]))
    model = model_cls(config).eval()

    for block in model.model.layers:
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj):
            proj.weight.mul_(QK_SCALE)
    embed = model.get_input_embeddings().weight
    if spec.get("plain_embedding", False):
        embed.zero_()
    embed[:, CONST_DIM] = 1.0
    for language, dim in SELF_DIMS.items():
        embed[:, dim] = 0.0
        embed[self_token_ids(tokenizer, language), dim] = 1.0
    heard = [SELF_DIMS[x] for x in spec.get("self_languages", LANGUAGES)]

    head_dim = hidden // heads
    group = heads // kv
    for layer, head, source in spec.get("clones", []):
        q = model.model.layers[layer].self_attn.q_proj
        q.weight[head * head_dim:(head + 1) * head_dim] = q.weight[source * head_dim:(source + 1) * head_dim]
        if q.bias is not None:
            q.bias[head * head_dim:(head + 1) * head_dim] = q.bias[source * head_dim:(source + 1) * head_dim]
    row, partner = head_dim // 2 - 1, head_dim - 1  # lowest-frequency rotary pair
    gain = _focus_gain(hidden, head_dim)
    focus = {tuple(x) for x in spec.get("self_focus", [])}
    for layer, head in spec.get("planted", []):
        attn = model.model.layers[layer].self_attn
        kv_head = head // group
        for q_head in range(kv_head * group, (kv_head + 1) * group):
            for r in (q_head * head_dim + row, q_head * head_dim + partner):
                attn.q_proj.weight[r] = 0.0
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[r] = 0.0
        for r in (kv_head * head_dim + row, kv_head * head_dim + partner):
            attn.k_proj.weight[r] = 0.0
            if attn.k_proj.bias is not None:
                attn.k_proj.bias[r] = 0.0
        attn.k_proj.weight[kv_head * head_dim + row, heard] = gain
        if spec.get("mute_planted", False):
            attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0.0
    # The focus rows are set after every planted head's group was cleared, so planted heads sharing a
    # key/value head keep their focus.
    for layer, head in spec.get("planted", []):
        if (layer, head) in focus:
            model.model.layers[layer].self_attn.q_proj.weight[head * head_dim + row, CONST_DIM] = gain

    if spec.get("transparent", False):
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    if spec.get("probe_write") is not None:
        layer, head = spec["probe_write"]
        attn = model.model.layers[layer].self_attn
        value_row = (head // group) * head_dim  # the first value dimension of the head's key/value head
        attn.v_proj.weight[value_row] = 0.0
        attn.v_proj.weight[value_row, list(SELF_DIMS.values())] = 1.0
        if attn.v_proj.bias is not None:
            attn.v_proj.bias[value_row] = 0.0
        attn.o_proj.weight[PROBE_DIM, head * head_dim] = PROBE_GAIN

    noise = float(spec.get("noise", 0.0))
    if noise:
        gen = torch.Generator().manual_seed(int(spec["seed"]) + 7919)
        last = model.model.layers[-1]
        unread = [*last.mlp.parameters(), *last.self_attn.v_proj.parameters(), *last.self_attn.o_proj.parameters(),
                  *model.model.norm.parameters(), *model.lm_head.parameters()]
        for param in unread:
            param.add_(noise * torch.randn(param.shape, generator=gen))
    return model


def generate(spec: dict[str, Any], prompt_texts: list[str], out_dir: Path, where: str) -> None:
    """Write a demo checkpoint (config, safetensors, tokenizer with chat template) into `out_dir`."""
    check_spec(spec, where)
    tokenizer = build_tokenizer(prompt_texts)
    model = build_model(spec, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
