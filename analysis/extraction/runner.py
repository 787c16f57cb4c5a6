"""Forward passes through TransformerBridge with entropies taken inside the attention hooks.

Full attention patterns never leave the hook: each layer's pattern is reduced to per-(prompt, head)
entropies while the batch is on the device, so memory does not grow with the prompt set.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis.extraction.attention_mass import MASSES, pattern_masses
from analysis.core.config import ExtractSettings
from analysis.extraction.entropy import pattern_entropies
from analysis.core.threads import cpu_threads
from analysis.extraction.residuals import (ResidualSet, compress, pooled_arrays, pooled_residual_hooks,
                                           user_token_masks)
from analysis.core.errors import UserError
from analysis.core.prompts import MARKER_COLUMN, marker_spans
from analysis.core.quantities import DEFINITIONS, ENTROPY_COLUMNS, MASS_COLUMNS, PROMPT_FORMATS, SOURCE_LANGUAGE

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids fed to the model, which of their positions count as queries, and which hold the person marker."""

    input_ids: list[int]
    query_mask: list[bool]
    marker_mask: tuple[bool, ...] = ()


def pick_device(requested: str = "auto") -> str:
    """cuda, else cpu, unless the user names one; TransformerLens's own picker decides (mps only if opted in).

    TransformerLens leaves Apple's MPS out of automatic choice because of silent correctness problems
    in PyTorch's MPS kernels; `device: mps` or TRANSFORMERLENS_ALLOW_MPS=1 opts in (README, Apple Silicon).
    """
    if requested != "auto":
        return requested
    from transformer_lens.utilities.devices import get_device

    return str(get_device())


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """float32 on CPU, bfloat16 on an accelerator, unless the user names one."""
    if requested == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[requested]


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], shift: int = 0) -> tuple[bool, ...]:
    """Which tokens (character offsets; special tokens have empty ones) overlap any of the spans."""
    return tuple(e > s and any(s < b + shift and e > a + shift for a, b in spans) for s, e in offsets)


def chat_messages(text: str, chat_system: str = "default") -> list[dict[str, str]]:
    """The conversation wrapped by the chat template (docs: README "Chat templates speak too").

    `default` sends the user's text alone, so the template adds whatever system text it has of its own;
    `none` sends an empty system message, which replaces a template's default system text (a template
    may still write fixed headers); any other string is sent as the system message for every family.
    """
    user = [{"role": "user", "content": text}]
    if chat_system == "default":
        return user
    return [{"role": "system", "content": "" if chat_system == "none" else chat_system}, *user]


def encode(tokenizer: Any, text: str, prompt_format: str, chat_tokenizer: Any | None = None,
           chat_system: str = "default", chat_date: str | None = None, marker: str = "") -> EncodedPrompt:
    """Tokenise one prompt exactly once, with the tokenizer's own special tokens and never two BOS; the
    person marker (data/prompts.csv `marker`) is mapped to token positions with the tokenizer's offsets.

    `chat_date` is passed to the template as `date_string`, so a template that writes today's date
    renders the same text on every day (unused by templates without one).
    """
    spans = marker_spans(text, marker) if marker else []
    if prompt_format == "raw":
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [True] * len(ids)
        markers = _overlaps(enc["offset_mapping"], spans)
    elif prompt_format == "chat":
        template = chat_tokenizer or tokenizer
        if not template.chat_template:
            raise UserError("prompt_format chat: the family's instruct tokenizer has no chat template; "
                            "use prompt_format raw")
        extra = {"date_string": chat_date} if chat_date else {}
        try:
            rendered = template.apply_chat_template(chat_messages(text, chat_system), add_generation_prompt=True,
                                                    tokenize=False, **extra)
        except Exception as err:  # noqa: BLE001 - jinja's TemplateError and raise_exception() of the template
            raise UserError(f"prompt_format chat: the chat template refused extract.chat_system={chat_system!r}: "
                            f"{err}; use chat_system default") from err
        start = rendered.find(text)
        if start < 0:
            raise UserError(f"prompt_format chat: the chat template does not contain the prompt {text!r} verbatim")
        end = start + len(text)
        # The template writes its own BOS (if any), so the tokenizer must not add another.
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [s < end and e > start for s, e in enc["offset_mapping"]]
        markers = _overlaps(enc["offset_mapping"], spans, shift=start)
    else:
        raise UserError(f"prompt format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise UserError(f"prompt {text!r}: BOS token added twice; check the tokenizer's post-processor and template")
    if sum(mask) < 1 or len(ids) < 2:
        raise UserError(f"prompt {text!r}: too short after tokenisation ({len(ids)} tokens)")
    if spans and not any(markers):
        raise UserError(f"prompt {text!r}: no token covers its person marker {marker!r}; check data/prompts.csv")
    return EncodedPrompt(ids, mask, markers)


def encode_prompts(tokenizer: Any, prompts: pd.DataFrame, prompt_format: str, settings: ExtractSettings,
                   chat_tokenizer: Any | None = None) -> list[EncodedPrompt]:
    """Every prompt of the prompt table, encoded with its person marker (empty where it has none)."""
    markers = prompts[MARKER_COLUMN] if MARKER_COLUMN in prompts else [""] * len(prompts)
    return [encode(tokenizer, text, prompt_format, chat_tokenizer, settings.chat_system, settings.chat_date, marker)
            for text, marker in zip(prompts["text"], markers)]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of similar length, so little compute is spent on padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def load_bridge(local_dir: Path, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                device_map: str | None = None) -> Any:
    """TransformerBridge over a local Hugging Face folder (safetensors; remote code only if asked)."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(
            str(local_dir), device=None if device_map else device, dtype=dtype,
            trust_remote_code=trust_remote_code, device_map=device_map,
        )
    except (ValueError, KeyError, NotImplementedError, AttributeError) as err:
        if "trust_remote_code" in str(err):
            raise  # the caller names extract.trust_remote_code (_remote_code_error)
        config = json.loads((Path(local_dir) / "config.json").read_text(encoding="utf-8"))
        arch = ", ".join(config.get("architectures") or [str(config.get("model_type"))])
        raise UserError(f"{local_dir}: TransformerBridge cannot load architecture {arch} "
                        f"(model_type {config.get('model_type')}): {err}. Check that the installed "
                        "transformer-lens supports it, or choose another checkpoint") from err
    bridge.eval()
    return bridge


def pad_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS token, else 0 (never attended to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def marker_keys(prompts: list[EncodedPrompt], width: int, device: Any) -> torch.Tensor:
    """[batch, width] bool: the person-marker tokens of each prompt of a right-padded batch."""
    keys = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        if p.marker_mask:
            keys[row, : len(p.marker_mask)] = torch.tensor(p.marker_mask)
    return keys.to(device)


def pad_batch(prompts: list[EncodedPrompt], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids, attention mask and query mask of a batch, on `device`."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    query = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids)
        attention[row, : len(p.input_ids)] = 1
        query[row, : len(p.input_ids)] = torch.tensor(p.query_mask)
    return ids.to(device), attention.to(device), query.to(device)


# How torch reports an allocation failure of host memory: a RuntimeError, not torch.OutOfMemoryError.
HOST_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """True for an allocation failure on any device: CUDA/MPS (torch.OutOfMemoryError) or host memory."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in HOST_OOM_MESSAGES)


# Extra hooks for one batch: given the batch's prompt indices, its token ids and attention mask, and a dict
# the hooks may fill with per-prompt arrays [batch, ...] (returned with the entropies), the hooks to add.
BatchHooks = Callable[[list[int], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], list[tuple[str, Any]]]
# What to keep of a batch's next-token log-probabilities (float64, [batch, vocab], each prompt's last real
# position), given the batch's prompt indices: per-prompt arrays [batch, ...] by name, reduced on the device.
LogitReducer = Callable[[list[int], torch.Tensor], dict[str, torch.Tensor]]


class EntropyRunner:
    """Runs batches through a bridge and returns per-(prompt, layer, head) entropies and attention masses.

    The patching stage (analysis/interventions/patching/patching.py) runs its interventions through the same batching,
    padding, hooks and out-of-memory splitting: `batch_hooks` add hooks per batch, `logits` reduces each
    prompt's next-token log-probabilities at its last real position (so a vocabulary-wide array per prompt
    need not be kept).
    """

    def __init__(self, bridge: Any, n_layers: int, n_heads: int, pad_id: int, device: str):
        self.bridge, self.n_layers, self.n_heads, self.pad_id, self.device = bridge, n_layers, n_heads, pad_id, device
        # Without a logit reducer the vocabulary projection of every position is wasted work (Gemma 3's 262k-token
        # vocabulary made it 80% of a forward pass on a CPU): ask the model for the last position's logits only,
        # where its forward takes `logits_to_keep` (Hugging Face causal LMs); attention is computed before it.
        model = getattr(bridge, "original_model", None)
        try:
            self.skips_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError, AttributeError):
            self.skips_logits = False

    def _forward(self, prompts: list[EncodedPrompt], batch: list[int], batch_hooks: BatchHooks | None = None,
                 logits: LogitReducer | None = None) -> dict[str, np.ndarray]:
        first = next(self.bridge.parameters()).device
        ids, attention, query = pad_batch(prompts, self.pad_id, first)
        keys = marker_keys(prompts, ids.shape[1], first)
        per_layer: dict[int, torch.Tensor] = {}

        def hook(pattern: torch.Tensor, hook: Any) -> None:
            layer = int(hook.name.split(".")[1])
            if pattern.shape[1] != self.n_heads:
                raise UserError(f"layer {layer}: pattern has {pattern.shape[1]} heads, config says {self.n_heads}")
            values = pattern_entropies(pattern, query.to(pattern.device))
            masses = pattern_masses(pattern, query, keys)
            # stays on the device: one copy to the host per batch, not one per layer and definition
            per_layer[layer] = torch.stack([*(values[d] for d in DEFINITIONS), *(masses[m] for m in MASSES)])

        hooks = [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(self.n_layers)]
        extras: dict[str, torch.Tensor] = {}
        if batch_hooks is not None:
            hooks += batch_hooks(batch, ids, attention, extras)
        last = attention.sum(dim=1) - 1  # each row's last real position (right padding)
        extra_kwargs = {}
        if self.skips_logits:  # one position's logits per row: the last one, or (no reducer) any
            extra_kwargs["logits_to_keep"] = 1 if logits is None else last.view(-1, 1)
        with torch.inference_mode():
            out = self.bridge.run_with_hooks(ids, attention_mask=attention, fwd_hooks=hooks,
                                             return_type="logits" if logits is not None else None, **extra_kwargs)
        missing = sorted(set(range(self.n_layers)) - set(per_layer))
        if missing:
            raise UserError(f"no attention pattern reached the hooks of layers {missing}")
        stacked = torch.stack([per_layer[layer].to(first) for layer in range(self.n_layers)], dim=2)
        values = stacked.double().cpu().numpy()  # [quantity, prompt, layer, head]
        names = [*DEFINITIONS, *(MASS_COLUMNS[m] for m in MASSES)]
        result = {name: values[i] for i, name in enumerate(names)}
        if logits is not None:
            rows = (out[:, 0] if extra_kwargs else
                    out[torch.arange(out.shape[0], device=out.device), last.to(out.device)])
            kept = logits(batch, torch.log_softmax(rows.double(), dim=-1))
            result.update({k: v.detach().double().cpu().numpy() for k, v in kept.items()})
        result.update({k: v.detach().float().cpu().numpy() for k, v in extras.items()})
        return result

    def run(self, prompts: list[EncodedPrompt], batch_size: int, label: str = "",
            batch_hooks: BatchHooks | None = None, logits: LogitReducer | None = None,
            progress: bool = True) -> dict[str, np.ndarray]:
        """Per quantity an array [prompt, ...]: entropies per definition and masses [prompt, layer, head],
        plus what `logits` and `batch_hooks` add; a batch that runs out of memory is split and retried."""
        result: dict[str, np.ndarray] = {}
        pending = length_sorted_batches([len(p.input_ids) for p in prompts], batch_size)
        with tqdm(total=len(prompts), desc=label or "extract", unit="prompt", disable=not progress) as bar:
            while pending:
                batch = pending.pop(0)
                try:
                    values = self._forward([prompts[i] for i in batch], batch, batch_hooks, logits)
                except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                    if not is_out_of_memory(err):
                        raise
                    if len(batch) == 1:
                        raise UserError(f"{label}: out of memory on a single prompt; use a smaller dtype, "
                                        "device_map: auto, or a larger device") from err
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    half = len(batch) // 2
                    log.warning("%s: out of memory on a batch of %d prompts; retrying as %d + %d",
                                label, len(batch), half, len(batch) - half)
                    pending[:0] = [batch[:half], batch[half:]]
                    continue
                for name, array in values.items():
                    if name not in result:
                        result[name] = np.full((len(prompts),) + array.shape[1:], np.nan, dtype=array.dtype)
                    result[name][batch] = array
                bar.update(len(batch))
        return result


def _remote_code_error(err: ValueError, checkpoint: str) -> Exception:
    """A refusal to run a checkpoint's own code, as one line naming the setting; other errors unchanged."""
    if "trust_remote_code" not in str(err):
        return err
    return UserError(f"{checkpoint}: this checkpoint needs its own modelling code to load; read that code, then set "
                     "`extract.trust_remote_code: true` in params.yaml (it is off so that no downloaded code runs "
                     "unread)")


def check_context(local_dir: Path, prompts: pd.DataFrame, encoded: list[EncodedPrompt], checkpoint: str) -> None:
    """Refuse prompts longer than the checkpoint's context (config.json max_position_embeddings)."""
    config = json.loads((Path(local_dir) / "config.json").read_text(encoding="utf-8"))
    limit = config.get("text_config", config).get("max_position_embeddings")
    if limit is None:
        return
    too_long = [(pid, len(e.input_ids)) for pid, e in zip(prompts["prompt_id"], encoded) if len(e.input_ids) > limit]
    if too_long:
        pid, n = too_long[0]
        raise UserError(f"{checkpoint}: prompt {pid} is {n} tokens, longer than the model's context of {limit} "
                        f"({len(too_long)} prompt(s) in all); shorten it in data/prompts.csv")


def entropy_frame(prompts: pd.DataFrame, encoded: list[EncodedPrompt], values: dict[str, np.ndarray],
                  checkpoint: str, family: str, variant: str, first_tokens: list[str],
                  prompt_format: str) -> pd.DataFrame:
    """The long table: one row per (prompt, layer, head), in prompt-file order."""
    n_prompts, n_layers, n_heads = values["raw"].shape
    per_cell = n_layers * n_heads
    frame = pd.DataFrame({
        "checkpoint": checkpoint,
        "family": family,
        "variant": variant,
        "prompt_id": np.repeat(prompts["prompt_id"].to_numpy(), per_cell),
        "category": np.repeat(prompts["category"].to_numpy(), per_cell),
        "language": np.repeat(_column(prompts, "language", SOURCE_LANGUAGE), per_cell),
        "source_id": np.repeat(_column(prompts, "source_id", None, prompts["prompt_id"]), per_cell),
        "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), n_prompts).astype("int32"),
        "head": np.tile(np.arange(n_heads), n_prompts * n_layers).astype("int32"),
        **{ENTROPY_COLUMNS[d]: values[d].reshape(-1) for d in DEFINITIONS},
        **{MASS_COLUMNS[m]: values[MASS_COLUMNS[m]].reshape(-1) for m in MASSES},
        "n_tokens": np.repeat([len(e.input_ids) for e in encoded], per_cell).astype("int32"),
        "input_ids_sha1": np.repeat([ids_digest(e.input_ids) for e in encoded], per_cell),
        "n_query": np.repeat([sum(e.query_mask) for e in encoded], per_cell).astype("int32"),
        "first_token": np.repeat(first_tokens, per_cell),
        "prompt_format": prompt_format,
    })
    return frame


def _column(prompts: pd.DataFrame, name: str, default, fallback=None) -> np.ndarray:
    """A prompt column, or `default` (or `fallback`'s values) for a prompt frame without it (an English-only set)."""
    if name in prompts:
        return prompts[name].to_numpy()
    return np.asarray(fallback) if fallback is not None else np.full(len(prompts), default)


def ids_digest(input_ids: list[int]) -> str:
    """SHA-1 of the token ids fed (first 16 hex digits): whether two checkpoints tokenised a prompt identically."""
    return hashlib.sha1(",".join(map(str, input_ids)).encode("ascii")).hexdigest()[:16]


def first_token_strings(tokenizer: Any, encoded: list[EncodedPrompt]) -> list[str]:
    """The first token of each prompt as text, to show whether (and which) BOS was used."""
    return [tokenizer.convert_ids_to_tokens(e.input_ids[0]) for e in encoded]


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to run: its tokenizer, the instruct sibling's (chat format) and a runner."""

    tokenizer: Any
    chat_tokenizer: Any | None
    runner: EntropyRunner


def open_checkpoint(local_dir: Path, *, checkpoint: str, settings: ExtractSettings, chat_dir: Path | None = None,
                    expected_shape: tuple[int, int] | None = None) -> LoadedCheckpoint:
    """Tokenizer(s) and a TransformerBridge runner for one checkpoint, with the `extract` settings of params.yaml."""
    from transformers import AutoTokenizer

    trust = settings.trust_remote_code
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    threads = cpu_threads(settings.cpu_threads) if device == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
        log.info("%s: %d torch thread(s) (extract.cpu_threads: %s)", checkpoint, threads, settings.cpu_threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir), trust_remote_code=trust)
        chat_tokenizer = AutoTokenizer.from_pretrained(str(chat_dir), trust_remote_code=trust) if chat_dir else None
        bridge = load_bridge(local_dir, device, dtype, trust, settings.device_map)
    except ValueError as err:
        raise _remote_code_error(err, checkpoint) from None
    n_layers, n_heads = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    if expected_shape is not None and (n_layers, n_heads) != tuple(expected_shape):
        raise UserError(f"{checkpoint}: loaded model has {n_layers} layers x {n_heads} heads, its manifest says "
                        f"{expected_shape[0]} x {expected_shape[1]}; run `selfref pull {checkpoint}` again")
    return LoadedCheckpoint(tokenizer, chat_tokenizer, EntropyRunner(bridge, n_layers, n_heads, pad_id(tokenizer), device))


def checkpoint_tables(local_dir: Path, prompts: pd.DataFrame, *, checkpoint: str, family: str, variant: str,
                      settings: ExtractSettings, formats: tuple[str, ...] = ("raw",), chat_dir: Path | None = None,
                      expected_shape: tuple[int, int] | None = None,
                      residuals: bool = False) -> tuple[dict[str, pd.DataFrame], ResidualSet | None]:
    """Entropy tables of one checkpoint over the prompt set, one per prompt format, from a single load of the model
    (loading and importing cost more than the forward passes of a small checkpoint); with `residuals`, also the
    pooled residual stream after each layer from the raw format's forward passes (analysis.extraction.residuals)."""
    loaded = open_checkpoint(local_dir, checkpoint=checkpoint, settings=settings, chat_dir=chat_dir,
                             expected_shape=expected_shape)
    tables, captured = {}, None
    for prompt_format in formats:
        encoded = encode_prompts(loaded.tokenizer, prompts, prompt_format, settings, loaded.chat_tokenizer)
        check_context(local_dir, prompts, encoded, checkpoint)
        n_layers = loaded.runner.n_layers
        capture = residuals and prompt_format == "raw"
        hooks = pooled_residual_hooks(user_token_masks(loaded.tokenizer, encoded), n_layers) if capture else None
        values = loaded.runner.run(encoded, settings.batch_size, label=f"{checkpoint} {prompt_format}",
                                   batch_hooks=hooks)
        for d in DEFINITIONS:
            if not np.isfinite(values[d]).all():
                raise UserError(f"{checkpoint}: non-finite {d} entropies; try dtype float32")
        frame = entropy_frame(prompts, encoded, values, checkpoint, family, variant,
                              first_token_strings(loaded.tokenizer, encoded), prompt_format)
        frame["chat_system"] = settings.chat_system if prompt_format == "chat" else None
        tables[prompt_format] = frame
        if capture:
            captured = compress(checkpoint, list(prompts["prompt_id"]), pooled_arrays(values, n_layers),
                                [e.input_ids for e in encoded])
    return tables, captured


def extract_checkpoint(local_dir: Path, prompts: pd.DataFrame, *, checkpoint: str, family: str, variant: str,
                       settings: ExtractSettings, prompt_format: str = "raw", chat_dir: Path | None = None,
                       expected_shape: tuple[int, int] | None = None) -> pd.DataFrame:
    """Entropy table of one checkpoint over the prompt set in one prompt format."""
    tables, _ = checkpoint_tables(local_dir, prompts, checkpoint=checkpoint, family=family, variant=variant,
                                  settings=settings, formats=(prompt_format,), chat_dir=chat_dir,
                                  expected_shape=expected_shape)
    return tables[prompt_format]
