"""Attention entropy of a batch of patterns, reduced to one number per (prompt, head) on the spot.

Three definitions (columns of the entropy table):
- raw: mean over counted query positions of -sum p log p over the keys the query sees (nats);
  position 0 sees only itself and contributes 0, as in the original study.
- no_bos: the first position removed as query and as key, the remaining mass renormalised; asks what a
  head does with the rest of the prompt when it parks mass on an attention sink.
- normalised: each query's entropy divided by log(number of visible keys), position 0 excluded;
  removes the growth of the maximum entropy with position (prompt length).
"""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values[b, h, q] over the q where mask[b, q]; rows outside the mask may hold NaN."""
    mask = mask[:, None, :]
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    return total / mask.sum(-1).clamp_min(1)


def pattern_entropies(pattern: torch.Tensor, query_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (prompt, head) entropies of right-padded patterns [batch, heads, query, key].

    `query_mask[b, q]` marks the query positions to average over (real tokens, or the user's text
    inside a chat template). Padding sits to the right of every real token, so causal masking already
    keeps pad keys out of every counted row. Accumulation is in float32 whatever the model's dtype.
    """
    p = pattern.float()
    n = p.shape[-1]
    positions = torch.arange(n, device=p.device)
    raw_rows = -torch.special.xlogy(p, p).sum(-1)

    visible = (positions + 1).to(p.dtype)
    normalised_rows = raw_rows / torch.log(visible).clamp_min(torch.finfo(p.dtype).tiny)

    rest = p[..., 1:]
    rest_mass = rest.sum(-1, keepdim=True)
    renorm = rest / rest_mass.clamp_min(torch.finfo(p.dtype).tiny)
    no_bos_rows = -torch.special.xlogy(renorm, renorm).sum(-1)
    # A row that puts all its mass on the first key has nothing left to spread: entropy 0.
    no_bos_rows = torch.where(rest_mass.squeeze(-1) > 0, no_bos_rows, torch.zeros_like(no_bos_rows))

    after_first = query_mask & (positions[None, :] >= 1)
    return {
        "raw": _masked_mean(raw_rows, query_mask),
        "no_bos": _masked_mean(no_bos_rows, after_first),
        "normalised": _masked_mean(normalised_rows, after_first),
    }
