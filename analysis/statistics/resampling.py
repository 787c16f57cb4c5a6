"""Resampling machinery for a paired, prompt-level design, vectorised over resamples and permutations.

The prompt is the unit of replication and base and instruct see the same prompts (docs/method.md,
"Inference"). So:
- the bootstrap resamples prompt indices within each category (stratum) once per resample and
  applies the same indices to base and instruct;
- the permutation test swaps base and instruct per prompt, i.e. flips the sign of that prompt's
  paired difference, with one sign per prompt shared by every layer, head and category statistic
  computed from the same permutation.
Every statistic in this study is a function of category means, so resampled data never has to be
materialised: a resample is a matrix of index counts and its category means are one matrix product.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

GroupMeans = dict[Hashable, np.ndarray]


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A numpy Generator determined by the seed and string keys (stable across runs and platforms)."""
    words = [int(seed)] + [zlib.crc32(str(k).encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _positions(strata: np.ndarray) -> dict[Hashable, np.ndarray]:
    """Positions of each stratum label, labels in order of first appearance."""
    strata = np.asarray(strata)
    labels = list(dict.fromkeys(strata.tolist()))
    return {label: np.flatnonzero(strata == label) for label in labels}


def stratified_bootstrap_indices(strata: Sequence[Hashable] | np.ndarray, n_resamples: int,
                                 rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n] int indices: column j draws, with replacement, among the positions of j's stratum.

    One row is one resample of the whole prompt set; apply it to base and instruct alike (paired).
    """
    strata = np.asarray(strata)
    out = np.empty((int(n_resamples), strata.size), dtype=np.int64)
    for pos in _positions(strata).values():
        out[:, pos] = pos[rng.integers(0, pos.size, size=(int(n_resamples), pos.size))]
    return out


def index_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """[B, n] how often each of n items appears in each row of an index matrix [B, m]."""
    indices = np.asarray(indices)
    b = indices.shape[0]
    flat = (indices + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def bootstrap_group_means(values: np.ndarray, strata: Sequence[Hashable] | np.ndarray,
                          indices: np.ndarray) -> GroupMeans:
    """Per stratum, the mean of `values` [n, ...] over each resample's prompts: label -> [B, ...]."""
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    counts = index_counts(indices, n).astype(float)
    flat = values.reshape(n, -1)
    out = {}
    for label, pos in _positions(np.asarray(strata)).items():
        means = counts[:, pos] @ flat[pos] / pos.size
        out[label] = means.reshape((counts.shape[0],) + values.shape[1:])
    return out


def group_means(values: np.ndarray, strata: Sequence[Hashable] | np.ndarray) -> GroupMeans:
    """Per stratum, the plain mean of `values` [n, ...] over its prompts, with a leading axis of 1."""
    values = np.asarray(values, dtype=float)
    return {label: values[pos].mean(axis=0, keepdims=True) for label, pos in _positions(np.asarray(strata)).items()}


def percentile_ci(samples: np.ndarray, confidence: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided percentile interval of resampled statistics (linear interpolation, as scipy.stats.bootstrap)."""
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [tail, 1.0 - tail], axis=axis)
    return lo, hi


def sign_flips(n: int, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """[n_permutations, n] of +1 (keep) / -1 (swap base and instruct of that prompt), each with probability 1/2."""
    return rng.integers(0, 2, size=(int(n_permutations), int(n)), dtype=np.int8) * 2 - 1


def permuted_group_means(base: np.ndarray, instruct: np.ndarray, strata: Sequence[Hashable] | np.ndarray,
                         signs: np.ndarray) -> tuple[GroupMeans, GroupMeans]:
    """Per stratum, the category means of base and instruct after per-prompt swaps: label -> [n_perm, ...].

    Swapping prompt p flips its paired difference d_p = instruct_p - base_p around the midpoint m_p, so
    the swapped means are mean(m) -/+ mean(s * d) / 2: one matrix product per stratum.
    """
    base = np.asarray(base, dtype=float)
    instruct = np.asarray(instruct, dtype=float)
    n = base.shape[0]
    shape = base.shape[1:]
    mid = ((base + instruct) / 2.0).reshape(n, -1)
    half = ((instruct - base) / 2.0).reshape(n, -1)
    signs = np.asarray(signs, dtype=float)
    out_base, out_instruct = {}, {}
    for label, pos in _positions(np.asarray(strata)).items():
        centre = mid[pos].mean(axis=0)
        shift = signs[:, pos] @ half[pos] / pos.size
        out_base[label] = (centre - shift).reshape((signs.shape[0],) + shape)
        out_instruct[label] = (centre + shift).reshape((signs.shape[0],) + shape)
    return out_base, out_instruct


def _exceedances(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """#{|T*| >= |T|} along axis 0; |T*| within 100 machine epsilons of |T| (relative) counts as a tie,
    as in scipy.stats.permutation_test, so that values equal in exact arithmetic are counted."""
    gamma = np.abs(observed) * np.finfo(float).eps * 100
    return (np.abs(null) >= np.abs(observed) - gamma).sum(axis=0)


def permutation_pvalue(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Two-sided Monte-Carlo p = (1 + #{|T*| >= |T|}) / (1 + n_perm) from a null [n_perm, ...]; NaN where T is."""
    observed = np.asarray(observed, dtype=float)
    null = np.asarray(null, dtype=float)
    p = (1.0 + _exceedances(observed, null)) / (1.0 + null.shape[0])
    return np.where(np.isnan(observed), np.nan, p)


def paired_permutation_test(base: np.ndarray, instruct: np.ndarray, strata: Sequence[Hashable] | np.ndarray,
                            statistic: Callable[[GroupMeans, GroupMeans], np.ndarray], signs: np.ndarray,
                            chunk_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Observed statistic and its paired-permutation p-value, for every cell of `base` [n, ...] at once.

    `statistic(base_means, instruct_means)` maps stratum -> [k, ...] category means to [k, ...] values.
    `signs` [n_perm, n] from `sign_flips`; permutations are processed in chunks only to bound memory.
    p = (1 + #{|T*| >= |T|}) / (1 + n_perm), as `permutation_pvalue`.
    """
    observed = np.asarray(statistic(group_means(base, strata), group_means(instruct, strata))[0], dtype=float)
    hits = np.zeros(observed.shape, dtype=np.int64)
    n_perm = signs.shape[0]
    for start in range(0, n_perm, chunk_size):
        null = statistic(*permuted_group_means(base, instruct, strata, signs[start:start + chunk_size]))
        hits += _exceedances(observed, null)
    p = (1.0 + hits) / (1.0 + n_perm)
    return observed, np.where(np.isnan(observed), np.nan, p)


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching rows of a and b [..., n] (broadcast); NaN where either row is constant."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    constant = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=-1) / np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def circular_shift_pvalue(x: np.ndarray, y: np.ndarray, method: str = "pearson") -> tuple[float, float]:
    """Correlation of two profiles and its circular-shift p-value.

    The null keeps each profile's autocorrelation (neighbouring layers are not independent: docs/method.md, "Correlated layers"):
    y is rotated by k = 1 .. n-1 positions and r_k = corr(x, roll(y, k)). p = (1 + #{|r_k| >= |r|}) / n,
    so the smallest attainable p is 1/n. `method` "spearman" does the same on ranks. NaN if r is.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if method == "spearman":
        x, y = stats.rankdata(x), stats.rankdata(y)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', not {method!r}")
    n = x.size
    r = float(rowwise_pearson(x, y))
    if n < 3 or not np.isfinite(r):
        return r, float("nan")
    k = np.arange(1, n)
    rolled = y[(np.arange(n)[None, :] - k[:, None]) % n]
    r_k = rowwise_pearson(x[None, :], rolled)
    gamma = abs(r) * np.finfo(float).eps * 100
    hits = int(np.sum(np.abs(r_k) >= abs(r) - gamma))
    return r, (1.0 + hits) / n


def fdr_bh(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (statsmodels multipletests, fdr_bh) over the finite p-values; NaN stays NaN."""
    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = multipletests(p[finite], method="fdr_bh")[1]
    return q


def label_permutations(n_a: int, n_b: int, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """[n_permutations, n_a + n_b] of +1 (group a) / -1 (group b): random relabellings of two independent groups
    with their sizes kept (the null of a two-sample test: the labels do not matter)."""
    labels = np.concatenate([np.ones(int(n_a), dtype=np.int8), -np.ones(int(n_b), dtype=np.int8)])
    return rng.permuted(np.tile(labels, (int(n_permutations), 1)), axis=1)


def two_sample_permutation_test(a: np.ndarray, b: np.ndarray, labels: np.ndarray,
                                chunk_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """mean(a) − mean(b) for every cell of a [n_a, ...] and b [n_b, ...] at once, and its two-sided permutation p
    over relabellings of the pooled rows (`labels` from `label_permutations`): p = (1 + #{|T*| >= |T|}) / (1 + n_perm),
    as scipy.stats.permutation_test with permutation_type='independent' on the same relabellings."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    shape = a.shape[1:]
    pooled = np.concatenate([a, b]).reshape(a.shape[0] + b.shape[0], -1)
    observed = a.mean(axis=0).ravel() - b.mean(axis=0).ravel()
    weights_a, weights_b = 1.0 / a.shape[0], 1.0 / b.shape[0]
    hits = np.zeros(observed.shape, dtype=np.int64)
    labels = np.asarray(labels)
    for start in range(0, labels.shape[0], chunk_size):
        chunk = labels[start:start + chunk_size]
        weights = np.where(chunk > 0, weights_a, -weights_b)
        hits += _exceedances(observed, weights @ pooled)
    p = (1.0 + hits) / (1.0 + labels.shape[0])
    return observed.reshape(shape), np.where(np.isnan(observed), np.nan, p).reshape(shape)
