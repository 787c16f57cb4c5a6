"""The one factory of synthetic entropy tables for tests: arrays of entropies in, the extract stage's own long
table out (built by analysis.extraction.runner.entropy_frame, so a column the stage adds reaches every test)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.core.quantities import DEFINITIONS, MASS_COLUMNS
from analysis.extraction.runner import EncodedPrompt, entropy_frame


def prompt_frame(categories, prompt_ids=None, *, language: str | None = None, source_ids=None) -> pd.DataFrame:
    """A prompt list in data/prompts.csv's columns: ids default to `<category>_<index>`."""
    categories = np.asarray(categories)
    ids = (np.asarray(prompt_ids) if prompt_ids is not None
           else np.asarray([f"{c}_{i:02d}" for i, c in enumerate(categories)]))
    frame = pd.DataFrame({"prompt_id": ids, "category": categories})
    if language is not None:
        frame["language"] = language
        frame["source_id"] = ids if source_ids is None else np.asarray(source_ids)
    return frame


def entropy_table(entropy, prompts: pd.DataFrame, *, family: str, variant: str, checkpoint: str | None = None,
                  prompt_format: str = "raw", n_tokens=None, no_bos=None, normalised=None, mass_first=None,
                  mass_marker=None, token_seed: str = "") -> pd.DataFrame:
    """The entropy table of one checkpoint from `entropy` [prompts, layers, heads] (nats) and its prompt list.

    Unless given: n_tokens 8 + (prompt index mod 5); the other definitions fixed positive transforms of
    `entropy` (0.9 e + 0.05, and e / log(n_tokens + 1)); mass on the first token 0.5 and on the person marker
    0.1 (NaN for neutral prompts, which have no marker). Masses may be [prompts, layers, heads] or scalars.
    Token ids depend on the prompt's position and `token_seed` only, so every variant of a family sees the same
    ids (the stats stage checks that across training stages)."""
    entropy = np.asarray(entropy, dtype=float)
    n_prompts = entropy.shape[0]
    if len(prompts) != n_prompts:
        raise ValueError(f"{len(prompts)} prompts for an entropy array of {n_prompts}")
    n_tokens = (8 + np.arange(n_prompts) % 5) if n_tokens is None else np.asarray(n_tokens, dtype=int)
    cells = np.ones_like(entropy)
    neutral = (np.asarray(prompts["category"]) == "neutral")[:, None, None]
    values = {
        "raw": entropy,
        "no_bos": 0.9 * entropy + 0.05 if no_bos is None else np.asarray(no_bos, dtype=float),
        "normalised": (entropy / np.log(n_tokens + 1.0)[:, None, None] if normalised is None
                       else np.asarray(normalised, dtype=float)),
        MASS_COLUMNS["first"]: cells * (0.5 if mass_first is None else np.asarray(mass_first, dtype=float)),
        MASS_COLUMNS["marker"]: np.where(neutral, np.nan, cells * (0.1 if mass_marker is None
                                                                     else np.asarray(mass_marker, dtype=float))),
    }
    assert set(DEFINITIONS) <= set(values)
    offset = sum(map(ord, token_seed))
    encoded = [EncodedPrompt(input_ids=[offset + i] * int(n), query_mask=[True] * int(n))
               for i, n in enumerate(n_tokens)]
    return entropy_frame(prompts.reset_index(drop=True), encoded, values, checkpoint or f"{family}-{variant}",
                         family, variant, ["<s>"] * n_prompts, prompt_format)
