"""Where heads look, base against instruct: the change of attention mass on the first token and on the
person marker per head, with prompt-bootstrap intervals (docs/method.md, "Where heads look")."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.extraction.attention_mass import MASSES
from analysis.core.quantities import CATEGORIES, MASS_COLUMNS, NEUTRAL
from analysis.statistics.resampling import bootstrap_group_means, percentile_ci, rng_for, stratified_bootstrap_indices


def mass_changes(entropy, *, n_resamples: int, confidence: float, seed: int):
    """Per (family, category, mass, layer, head): mean mass in base and instruct over the category's prompts,
    the change instruct - base, and its prompt-bootstrap interval (paired: one resample of prompts applied
    to both variants). Neutral prompts have no marker and get no marker rows (docs/method.md, "Where heads look").
    A family of a single checkpoint has its mean mass in its own column (base or instruct, with a prompt-bootstrap
    interval in level_lo, level_hi), the other column and the change empty (nothing to compare it with).

    `entropy` is the long entropy table of one prompt format with the columns of MASS_COLUMNS.
    """
    frames = []
    for family, rows in entropy.groupby("family", sort=True):
        n_layers, n_heads = int(rows["layer"].max()) + 1, int(rows["head"].max()) + 1
        variants = {}
        for variant, part in rows.groupby("variant"):
            part = part.sort_values(["prompt_id", "layer", "head"])
            variants[variant] = part
        if len(variants) == 1:
            frames.extend(_single_masses(family, *next(iter(variants.items())), n_layers, n_heads, n_resamples,
                                         confidence, seed))
            continue
        base, instruct = variants["base"], variants["instruct"]
        if not np.array_equal(base["prompt_id"].to_numpy(), instruct["prompt_id"].to_numpy()):
            raise ValueError(f"{family}: base and instruct entropy tables list different prompts")
        per_prompt = base.drop_duplicates("prompt_id")
        categories = per_prompt["category"].to_numpy()
        indices = stratified_bootstrap_indices(categories, n_resamples, rng_for(seed, "mass_change", family))
        for mass in MASSES:
            column = MASS_COLUMNS[mass]
            b = base[column].to_numpy(dtype=float).reshape(-1, n_layers, n_heads)
            i = instruct[column].to_numpy(dtype=float).reshape(-1, n_layers, n_heads)
            boot = bootstrap_group_means(i - b, categories, indices)
            for category in CATEGORIES:
                if mass == "marker" and category == NEUTRAL:
                    continue
                pick = categories == category
                lo, hi = percentile_ci(boot[category], confidence)
                layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
                frames.append(pd.DataFrame({
                    "family": family, "category": category, "mass": mass,
                    "layer": layer.ravel(), "head": head.ravel(),
                    "base": b[pick].mean(axis=0).ravel(), "instruct": i[pick].mean(axis=0).ravel(),
                    "delta": (i[pick] - b[pick]).mean(axis=0).ravel(),
                    "delta_lo": np.asarray(lo).ravel(), "delta_hi": np.asarray(hi).ravel(),
                }))
    return pd.concat(frames, ignore_index=True)


def _single_masses(family: str, variant: str, rows, n_layers: int, n_heads: int, n_resamples: int, confidence: float,
                   seed: int) -> list:
    """mass_changes' rows of a single-checkpoint family: its mean masses with prompt-bootstrap intervals."""
    per_prompt = rows.drop_duplicates("prompt_id")
    categories = per_prompt["category"].to_numpy()
    indices = stratified_bootstrap_indices(categories, n_resamples, rng_for(seed, "mass_change", family))
    frames = []
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    for mass in MASSES:
        values = rows[MASS_COLUMNS[mass]].to_numpy(dtype=float).reshape(-1, n_layers, n_heads)
        boot = bootstrap_group_means(values, categories, indices)
        for category in CATEGORIES:
            if mass == "marker" and category == NEUTRAL:
                continue
            lo, hi = percentile_ci(boot[category], confidence)
            level = values[categories == category].mean(axis=0).ravel()
            frames.append(pd.DataFrame({
                "family": family, "category": category, "mass": mass, "layer": layer.ravel(), "head": head.ravel(),
                "base": level if variant == "base" else np.nan, "instruct": level if variant == "instruct" else np.nan,
                "delta": np.nan, "delta_lo": np.nan, "delta_hi": np.nan,
                "level_lo": np.asarray(lo).ravel(), "level_hi": np.asarray(hi).ravel()}))
    return frames
