"""The to_tokens trap measured: entropies of a one-prompt-at-a-time extraction whose token ids come from
TransformerBridge's default `to_tokens` (which prepends the tokenizer's BOS string, for SmolLM2 `<|im_start|>`, to
every prompt although the tokenizer itself adds none) against the pipeline's own (docs/method.md, "Tokenisers and
BOS")."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.extraction.runner import EncodedPrompt, EntropyRunner

TRAP_COLUMNS = ["checkpoint", "layer", "n_prompts", "h_correct", "h_trap", "mean_abs_diff", "max_abs_diff"]


def default_to_tokens(bridge: Any, text: str) -> EncodedPrompt:
    """One prompt encoded as TransformerBridge's `to_tokens(text)` does by default (every position a query)."""
    ids = [int(x) for x in bridge.to_tokens(text, move_to_device=False)[0].tolist()]
    return EncodedPrompt(ids, [True] * len(ids), ())


def trap_entropies(runner: EntropyRunner, texts: list[str], batch_size: int, definition: str = "raw") -> np.ndarray:
    """[prompt, layer, head] entropies of the trap: each prompt's ids from `default_to_tokens`, as a one-prompt-at-a-
    time extraction would feed them. They run in right-padded batches of `batch_size`, which give a prompt's
    entropies alone to float noise (docs/method.md, "Noise floor": 3.6e-7 nats) and take a tenth of the time."""
    encoded = [default_to_tokens(runner.bridge, t) for t in texts]
    return runner.run(encoded, batch_size, label="to_tokens default", progress=False)[definition]


def trap_table(checkpoint: str, correct: np.ndarray, trap: np.ndarray) -> pd.DataFrame:
    """Per layer: the mean entropy (over prompts and heads) of the pipeline's extraction and of the trap, and the
    mean and largest absolute difference of a prompt's layer entropy (mean over the layer's heads)."""
    a, b = correct.mean(axis=2), trap.mean(axis=2)  # [prompt, layer]
    diff = np.abs(b - a)
    return pd.DataFrame({"checkpoint": checkpoint, "layer": np.arange(a.shape[1]), "n_prompts": a.shape[0],
                         "h_correct": a.mean(axis=0), "h_trap": b.mean(axis=0),
                         "mean_abs_diff": diff.mean(axis=0), "max_abs_diff": diff.max(axis=0)})[TRAP_COLUMNS]


def first_tokens(bridge: Any, tokenizer: Any, text: str) -> tuple[str, str]:
    """The first token the pipeline feeds and the first one the trap feeds, as text."""
    ours = tokenizer(text, add_special_tokens=True)["input_ids"][0]
    theirs = default_to_tokens(bridge, text).input_ids[0]
    return tokenizer.convert_ids_to_tokens(ours), tokenizer.convert_ids_to_tokens(theirs)
