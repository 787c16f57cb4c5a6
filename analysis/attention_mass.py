"""Where a head looks: the attention mass a pattern puts on the first token (the sink) and on the prompt's
person-marker tokens, reduced to one number per (prompt, head) inside the hook, like the entropies.

docs/method.md, "Where heads look": the first-token mass is averaged over the counted query positions;
the marker mass over the counted query positions that can see a marker token (causal mask: earlier
queries cannot, and would only dilute it). A prompt without a marker (neutral) gets NaN, never 0.
"""

from __future__ import annotations

MASSES = ("first", "marker")


def pattern_masses(pattern: "torch.Tensor", query_mask: "torch.Tensor", marker_keys: "torch.Tensor") -> dict:
    """Per (prompt, head) masses of right-padded patterns [batch, heads, query, key], accumulated in float32.

    `query_mask[b, q]` marks the counted query positions; `marker_keys[b, k]` the person-marker tokens.
    """
    import torch  # here, so that the stats stage can use mass_changes without loading torch

    p = pattern.float()
    query = query_mask.to(p.device)
    keys = marker_keys.to(p.device)
    first_rows = p[..., 0]                                          # [b, h, q]
    marker_rows = (p * keys[:, None, None, :].to(p.dtype)).sum(-1)  # [b, h, q]
    first_marker = torch.where(keys.any(-1), keys.float().argmax(-1), torch.full_like(keys[:, 0], -1, dtype=torch.long))
    positions = torch.arange(p.shape[-2], device=p.device)
    sees_marker = query & (first_marker[:, None] >= 0) & (positions[None, :] >= first_marker[:, None])

    def mean(rows, mask):
        total = torch.where(mask[:, None, :], rows, torch.zeros((), dtype=rows.dtype, device=rows.device)).sum(-1)
        count = mask.sum(-1)[:, None].to(rows.dtype)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))

    return {"first": mean(first_rows, query), "marker": mean(marker_rows, sees_marker)}


def mass_changes(entropy, *, n_resamples: int, confidence: float, seed: int):
    """Per (family, category, mass, layer, head): mean mass in base and instruct over the category's prompts,
    the change instruct - base, and its prompt-bootstrap interval (paired: one resample of prompts applied
    to both variants). Neutral prompts have no marker and get no marker rows (docs/method.md, "Where heads look").

    `entropy` is the long entropy table of one prompt format with the columns of MASS_COLUMNS.
    """
    import numpy as np
    import pandas as pd

    from analysis.quantities import CATEGORIES, MASS_COLUMNS, NEUTRAL
    from analysis.resampling import bootstrap_group_means, percentile_ci, rng_for, stratified_bootstrap_indices

    frames = []
    for family, rows in entropy.groupby("family", sort=True):
        n_layers, n_heads = int(rows["layer"].max()) + 1, int(rows["head"].max()) + 1
        variants = {}
        for variant, part in rows.groupby("variant"):
            part = part.sort_values(["prompt_id", "layer", "head"])
            variants[variant] = part
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
