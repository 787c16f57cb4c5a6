"""Candidate heads: which heads changed self-referent attention more than neutral attention after tuning?

Per head, a difference-in-differences of mean entropy (instruct - base on self_referent, minus the same
on neutral), its log-ratio version (scale-free, so low-entropy heads are not drowned out), how
consistently self-referent prompts move in that direction, and the base entropy (focused heads rank
higher). The score ranks heads for inspection; the permutation p-value, BH-adjusted across all heads
of a family (docs/method.md, "Multiple comparisons"), is what says whether a head's change is more than prompt noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.core.quantities import NEUTRAL, NO_CHANGE, SELF, did as entropy_did
from analysis.core.ranking import positions_and_ranks
from analysis.statistics.resampling import fdr_bh, paired_permutation_test, two_sample_permutation_test

EPS = 1e-6  # nats added to every mean entropy inside the log-ratio, so a head with zero entropy stays finite
COLUMNS = ["layer", "head", "base_self", "base_neutral", "instruct_self", "instruct_neutral", "delta_self",
           "delta_neutral", "did", "did_log_ratio", "consistency", "base_entropy", "score", "p_value", "q_value",
           "p_reason", "rank", "position", "tied", "top_k"]


# Within one checkpoint (a family of a single checkpoint): how much more focused a head is on self-referent prompts
# than on neutral ones (data/stats/self_focus_heads.parquet). `base_entropy` is the checkpoint's mean entropy over all
# prompts (the column the patch stage reads, whatever the variant), `position` the head's place in the ranking.
SELF_FOCUS_COLUMNS = ["layer", "head", "h_self", "h_neutral", "self_minus_neutral", "log_ratio", "base_entropy",
                      "score", "p_value", "q_value", "p_reason", "rank", "position", "tied", "top_k"]


def self_focus_heads(values: np.ndarray, categories: np.ndarray, labels: np.ndarray, *, top_k: int, decimals: int,
                     floor: float = 0.0) -> pd.DataFrame:
    """Head table of one checkpoint and one entropy definition: the most self-focused heads.

    values: [n_prompts, n_layers, n_heads] entropies; categories: [n_prompts]; labels: relabellings of the
    self-referent and neutral prompts (`label_permutations`, self first). Columns: h_self, h_neutral (mean entropy
    over the category's prompts); self_minus_neutral; log_ratio = log((h_self+EPS)/(h_neutral+EPS));
    base_entropy = mean over every prompt of the checkpoint; score = −log_ratio (> 0: attention on self-referent
    prompts is more focused, scale-free as in `head_scores`); p_value = two-sample permutation test of
    self_minus_neutral = 0 (self-referent and neutral are different prompts: their labels are permuted), null
    where |self_minus_neutral| <= `floor`; q_value = BH over the checkpoint's heads; rank, position, tied, top_k
    as in `head_scores` (the score rounded to `decimals` orders the heads).
    """
    values = np.asarray(values, dtype=float)
    categories = np.asarray(categories)
    _, n_layers, n_heads = values.shape
    is_self, is_neutral = categories == SELF, categories == NEUTRAL
    h_self, h_neutral = values[is_self].mean(axis=0), values[is_neutral].mean(axis=0)
    log_ratio = np.log((h_self + EPS) / (h_neutral + EPS))
    diff, p = two_sample_permutation_test(values[is_self], values[is_neutral], labels)
    still = (np.abs(diff) <= floor).ravel()
    p = np.where(still, np.nan, p.ravel())
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    table = pd.DataFrame({
        "layer": layer.ravel(), "head": head.ravel(), "h_self": h_self.ravel(), "h_neutral": h_neutral.ravel(),
        "self_minus_neutral": diff.ravel(), "log_ratio": log_ratio.ravel(),
        "base_entropy": values.mean(axis=0).ravel(), "score": -log_ratio.ravel(),
        "p_value": p, "q_value": fdr_bh(p), "p_reason": np.where(still, NO_CHANGE, None),
    })
    position, rank, tied = positions_and_ranks(table, "score", decimals)
    table["rank"], table["position"], table["tied"] = rank, position, tied
    table["top_k"] = position <= int(top_k)
    return table[SELF_FOCUS_COLUMNS]


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / sd over all entries (population sd); all zeros when x is constant."""
    x = np.asarray(x, dtype=float)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def head_scores(base: np.ndarray, instruct: np.ndarray, categories: np.ndarray, signs: np.ndarray, *,
                top_k: int, decimals: int, floor: float = 0.0, chunk_size: int = 1000) -> pd.DataFrame:
    """Head table of one family and one entropy definition.

    base, instruct: [n_prompts, n_layers, n_heads] entropies, rows the same prompts in the same order;
    categories: [n_prompts] category labels; signs: [n_perm, n_prompts] per-prompt swaps (`sign_flips`).

    Columns: layer, head; base_self, base_neutral, instruct_self, instruct_neutral (mean entropy over the
    category's prompts); delta_self, delta_neutral (instruct - base); did = delta_self - delta_neutral;
    did_log_ratio = log((instruct_self+EPS)/(base_self+EPS)) - log((instruct_neutral+EPS)/(base_neutral+EPS));
    consistency = share of self_referent prompts whose own change minus delta_neutral has the sign of did
    (0 when did is exactly 0); base_entropy = mean over all base prompts; score = z(|did_log_ratio|) +
    z(consistency) + z(-base_entropy), z over the family's heads; p_value = paired permutation test of
    did = 0 (per-prompt base/instruct swaps), null where |did| <= `floor` (no change: p_reason says so);
    q_value = BH over the heads with a p; the score rounded to `decimals`
    orders the heads (analysis/ranking.py): rank = competition rank (heads tied at that precision share it),
    position = 1..n (ties in layer-head order), tied; top_k = position <= top_k.
    """
    base = np.asarray(base, dtype=float)
    instruct = np.asarray(instruct, dtype=float)
    categories = np.asarray(categories)
    n_prompts, n_layers, n_heads = base.shape
    is_self, is_neutral = categories == SELF, categories == NEUTRAL
    b_self, b_neutral = base[is_self].mean(axis=0), base[is_neutral].mean(axis=0)
    i_self, i_neutral = instruct[is_self].mean(axis=0), instruct[is_neutral].mean(axis=0)
    delta_self, delta_neutral = i_self - b_self, i_neutral - b_neutral
    did = entropy_did({SELF: b_self, NEUTRAL: b_neutral}, {SELF: i_self, NEUTRAL: i_neutral})
    log_ratio = np.log((i_self + EPS) / (b_self + EPS)) - np.log((i_neutral + EPS) / (b_neutral + EPS))
    own_change = instruct[is_self] - base[is_self] - delta_neutral
    consistency = (own_change * np.sign(did) > 0).mean(axis=0)
    base_entropy = base.mean(axis=0)
    score = zscore(np.abs(log_ratio)) + zscore(consistency) + zscore(-base_entropy)

    rows = is_self | is_neutral
    flat = (n_layers * n_heads,)
    _, p = paired_permutation_test(base[rows].reshape((-1,) + flat), instruct[rows].reshape((-1,) + flat),
                                   categories[rows], entropy_did, np.asarray(signs)[:, rows], chunk_size=chunk_size)
    still = (np.abs(did) <= floor).ravel()  # a change within the noise floor is no change: no p, no q
    p = np.where(still, np.nan, p)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    table = pd.DataFrame({
        "layer": layer.ravel(), "head": head.ravel(),
        "base_self": b_self.ravel(), "base_neutral": b_neutral.ravel(),
        "instruct_self": i_self.ravel(), "instruct_neutral": i_neutral.ravel(),
        "delta_self": delta_self.ravel(), "delta_neutral": delta_neutral.ravel(),
        "did": did.ravel(), "did_log_ratio": log_ratio.ravel(), "consistency": consistency.ravel(),
        "base_entropy": base_entropy.ravel(), "score": score.ravel(),
        "p_value": p, "q_value": fdr_bh(p), "p_reason": np.where(still, NO_CHANGE, None),
    })
    position, rank, tied = positions_and_ranks(table, "score", decimals)
    table["rank"], table["position"], table["tied"] = rank, position, tied
    table["top_k"] = position <= int(top_k)
    return table[COLUMNS]
