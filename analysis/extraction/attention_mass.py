"""Where a head looks: the attention mass a pattern puts on the first token (the sink) and on the prompt's
person-marker tokens, reduced to one number per (prompt, head) inside the hook, like the entropies.

docs/method.md, "Where heads look": the first-token mass is averaged over the counted query positions;
the marker mass over the counted query positions that can see a marker token (causal mask: earlier
queries cannot, and would only dilute it). A prompt without a marker (neutral) gets NaN, never 0.
"""

from __future__ import annotations

from analysis.core.quantities import MASS_COLUMNS

MASSES = tuple(MASS_COLUMNS)  # the masses computed, in the order of the table's mass columns


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

