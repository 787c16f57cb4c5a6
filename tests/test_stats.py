"""Statistics of the study (analysis.statistics.resampling, correlation, heads, metrics) on cases with known answers.

Three kinds of evidence:
- hand-computed small cases (numbers small enough to check on paper, written out in the test);
- the library each statistic wraps or reimplements, called directly on the same data (scipy, statsmodels,
  numpy), with any difference in convention stated where the comparison is made;
- properties of the design: the bootstrap is paired and stratified, the permutation test holds its level
  on exchangeable data, a planted change is found where it was planted and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from analysis.core.config import StatsSettings
from analysis.statistics.correlation import (CONSTANT, INTERPOLATED, NO_SIGNAL, comparison_grid, compare_profiles,
                                  interpolation_matrix)
from analysis.core.errors import UserError
from analysis.statistics.heads import EPS, head_scores, zscore
from analysis.statistics.layers import _change, build_statistics, family_arrays, head_t_interval
from analysis.core.quantities import CATEGORIES, layer_ratios, relative_depth
from analysis.statistics.resampling import (bootstrap_group_means, circular_shift_pvalue, fdr_bh, group_means, index_counts,
                                 paired_permutation_test, percentile_ci, permutation_pvalue, permuted_group_means,
                                 rng_for, rowwise_pearson, sign_flips, stratified_bootstrap_indices)
from entropy_tables import entropy_table, prompt_frame

CATS = CATEGORIES
ALL_DEFINITIONS = ["raw", "no_bos", "normalised"]


# ----------------------------------------------------------------------------------------------- helpers

def settings(**overrides) -> StatsSettings:
    """Small, fast stats settings (the fields of params.yaml `stats`)."""
    out = {"seed": 7, "n_resamples": 200, "n_permutations": 200, "confidence": 0.95, "alpha": 0.05,
           "near_zero": 0.01, "neutral_floor": 0.05, "noise_floor": {"delta_rfc": 1e-5, "delta_diff": 1e-5},
           "depth_grid": 8, "top_k_heads": 3, "rank_decimals": 4, "split_half_splits": 50,
           "definitions": ("raw",), "headline_definition": "raw", "headline_format": "raw", "workers": 1}
    out.update(overrides)
    out["definitions"] = tuple(out["definitions"])
    return StatsSettings(**out)


def long_table(family: str, base: np.ndarray, instruct: np.ndarray, categories, prompt_ids=None) -> pd.DataFrame:
    """The entropy tables of a family's base and instruct from [prompts, layers, heads] arrays (tests/entropy_tables)."""
    prompts = prompt_frame(categories, prompt_ids)
    return pd.concat([entropy_table(values, prompts, family=family, variant=variant)
                      for variant, values in (("base", base), ("instruct", instruct))], ignore_index=True)


def synthetic_family(seed: int, n_per_cat: int, n_layers: int, n_heads: int, shift: dict | None = None,
                     noise: float = 0.02):
    """Positive entropies: head level (gamma, ~2 nats) + per-prompt layer effect + independent noise per
    variant (base and instruct exchangeable per prompt); `shift` {(layer, head): v} adds v to instruct
    on self_referent prompts only."""
    rng = np.random.default_rng(seed)
    categories = np.repeat(CATS, n_per_cat)
    n_p = categories.size
    level = rng.gamma(20.0, 0.1, size=(n_layers, n_heads))
    prompt = rng.normal(0.0, 0.1, size=(n_p, n_layers, 1)) + rng.normal(0.0, 0.05, size=(n_p, n_layers, n_heads))
    base = level + prompt + rng.normal(0.0, noise, size=(n_p, n_layers, n_heads))
    instruct = level + prompt + rng.normal(0.0, noise, size=(n_p, n_layers, n_heads))
    for (layer, head), value in (shift or {}).items():
        instruct[categories == "self_referent", layer, head] += value
    assert base.min() > 0 and instruct.min() > 0
    return base, instruct, categories


def all_sign_vectors(n: int) -> np.ndarray:
    """[2^n, n] every +/-1 vector (the identity, all +1, is row 0): the exact sign-flip null."""
    return ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * -2 + 1


def hand_table() -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """One family, 2 prompts per category, 1 layer, 2 heads; numbers chosen to be checked on paper.

    base (per prompt, heads [h0, h1] -> prompt mean):
      self_referent [1,3]->2, [2,4]->3  => H_self = 2.5
      neutral       [4,6]->5, [5,5]->5  => H_neutral = 5
      third_person  [3,5]->4, [4,4]->4  => H_third = 4
      confounder    [3,3]->3, [4,4]->4  => H_conf = 3.5
    instruct: the same, except every self_referent entry + 1  => H_self = 3.5.
    RFC_base = 1 - 2.5/5 = 0.5, RSI_base = (3.5 - 2.5)/5 = 0.2, diff_base = -2.5;
    RFC_inst = 1 - 3.5/5 = 0.3, RSI_inst = 0,                 diff_inst = -1.5;
    ΔRFC = -0.2, ΔRSI = -0.2, Δdiff = +1.
    """
    categories = np.repeat(CATS, 2)
    base = np.array([[1, 3], [2, 4], [4, 6], [5, 5], [3, 5], [4, 4], [3, 3], [4, 4]], float)[:, None, :]
    instruct = base.copy()
    instruct[:2] += 1.0
    return long_table("fam", base, instruct, categories), base, instruct, categories


# ------------------------------------------------------------------------------- hand-computed statistics

def test_layer_ratios_by_hand():
    """RFC = 1 - H_self/H_neutral, RSI = (H_conf - H_self)/H_neutral and H_self - H_neutral on numbers done by hand."""
    out = layer_ratios({"self_referent": np.array([2.0, 1.0]), "neutral": np.array([4.0, 2.0]),
                        "third_person": np.array([9.0, 9.0]), "confounder": np.array([3.0, 0.5])})
    np.testing.assert_allclose(out["rfc"], [0.5, 0.5])
    np.testing.assert_allclose(out["rsi"], [0.25, -0.25])
    np.testing.assert_allclose(out["diff_self_neutral"], [-2.0, -1.0])


def test_build_statistics_layer_and_delta_values_by_hand():
    """H_c, RFC, RSI, ΔRFC, ΔRSI, Δdiff and the classes of the hand table (see hand_table) come out as computed on paper."""
    table, *_ = hand_table()
    out = build_statistics(table, settings(n_resamples=50, n_permutations=50))
    layers = out["layers"].set_index("variant")
    for variant, h_self, rfc, rsi, diff in (("base", 2.5, 0.5, 0.2, -2.5), ("instruct", 3.5, 0.3, 0.0, -1.5)):
        row = layers.loc[variant]
        assert row["h_self_referent"] == pytest.approx(h_self)
        assert row["h_neutral"] == pytest.approx(5.0)
        assert row["h_third_person"] == pytest.approx(4.0)
        assert row["h_confounder"] == pytest.approx(3.5)
        assert row["rfc"] == pytest.approx(rfc)
        assert row["rsi"] == pytest.approx(rsi, abs=1e-12)
        assert row["diff_self_neutral"] == pytest.approx(diff)
        assert row["n_prompts_self_referent"] == 2 and not row["low_neutral"]
        assert row["depth"] == pytest.approx(0.5)
    d = out["deltas"].iloc[0]
    assert d["delta_rfc"] == pytest.approx(-0.2)
    assert d["delta_rsi"] == pytest.approx(-0.2)
    assert d["delta_diff"] == pytest.approx(1.0)
    assert (d["rfc_base"], d["rfc_instruct"]) == (pytest.approx(0.5), pytest.approx(0.3))
    assert d["original_class"] == "compression" and not d["near_zero"]
    # Instruct = base + 1 on every self prompt and H_neutral is 5 in every resample (both neutral prompts
    # average 5), so every paired resample has ΔRFC = -1/5 and Δdiff = 1 exactly: a zero-width interval.
    assert d["delta_rfc_lo"] == pytest.approx(-0.2) and d["delta_rfc_hi"] == pytest.approx(-0.2)
    assert d["delta_diff_lo"] == pytest.approx(1.0) and d["delta_diff_hi"] == pytest.approx(1.0)


def test_head_t_interval_by_hand_and_against_scipy():
    """The original study's across-heads interval: per-head ΔRFC of the hand table is -2/9 and -2/11; mean and
    t-interval equal scipy.stats.t.interval."""
    _, base, instruct, categories = hand_table()
    mean, lo, hi = head_t_interval(base, instruct, categories, 0.95)
    per_head = np.array([-2 / 9, -2 / 11])
    assert mean[0] == pytest.approx(-20 / 99)
    ref = stats.t.interval(0.95, df=1, loc=per_head.mean(), scale=stats.sem(per_head))
    assert (lo[0], hi[0]) == (pytest.approx(ref[0]), pytest.approx(ref[1]))


def head_hand_case():
    """1 layer, 2 heads, 2 prompts per category (see test_head_scores_by_hand for the arithmetic)."""
    categories = np.repeat(CATS, 2)
    base = np.array([[1, 2], [3, 2],      # self_referent
                     [4, 2], [4, 2],      # neutral
                     [2, 4], [2, 4],      # third_person
                     [2, 4], [2, 4]], float)[:, None, :]  # confounder
    instruct = base.copy()
    instruct[0, 0] = [2, 3]
    instruct[1, 0] = [5, 1.5]
    instruct[2, 0] = [4.5, 2]
    instruct[3, 0] = [4.5, 2]
    return base, instruct, categories


def test_head_scores_by_hand():
    """DiD, log-ratio, consistency, base entropy, z-scored score, rank and top_k of two heads computed on paper.

    head 0: self 2 -> 3.5 (Δ 1.5), neutral 4 -> 4.5 (Δ 0.5): DiD 1; own self changes minus Δneutral 0.5, 1.5
            -> consistency 1; base entropy over all 8 prompts 20/8 = 2.5.
    head 1: self 2 -> 2.25 (Δ 0.25), neutral 2 -> 2 (Δ 0): DiD 0.25; own changes 1, -0.5 -> consistency 0.5;
            base entropy 24/8 = 3.
    With two heads every z-score is +/-1: score = [3, -3], rank [1, 2].
    """
    base, instruct, categories = head_hand_case()
    signs = sign_flips(len(categories), 20, rng_for(0, "t"))
    t = head_scores(base, instruct, categories, signs, top_k=1, decimals=4)
    np.testing.assert_allclose(t["did"], [1.0, 0.25])
    np.testing.assert_allclose(t["delta_self"], [1.5, 0.25])
    np.testing.assert_allclose(t["delta_neutral"], [0.5, 0.0])
    expected_lr = [math.log((3.5 + EPS) / (2 + EPS)) - math.log((4.5 + EPS) / (4 + EPS)),
                   math.log((2.25 + EPS) / (2 + EPS))]
    np.testing.assert_allclose(t["did_log_ratio"], expected_lr)
    assert t["did_log_ratio"][0] == pytest.approx(math.log(1.75) - math.log(1.125), abs=1e-6)
    np.testing.assert_allclose(t["consistency"], [1.0, 0.5])
    np.testing.assert_allclose(t["base_entropy"], [2.5, 3.0])
    np.testing.assert_allclose(t["score"], [3.0, -3.0])
    assert list(t["rank"]) == [1, 2] and list(t["top_k"]) == [True, False]
    # Swapping base and instruct negates DiD; consistency counts moves in DiD's direction, so it is unchanged.
    swapped = head_scores(instruct, base, categories, signs, top_k=1, decimals=4)
    np.testing.assert_allclose(swapped["did"], [-1.0, -0.25])
    np.testing.assert_allclose(swapped["consistency"], [1.0, 0.5])


def test_zscore_by_hand():
    """zscore uses the population sd: [1, 2, 3] -> [-sqrt(1.5), 0, sqrt(1.5)]; a constant gives zeros, not NaN."""
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0])), [-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    np.testing.assert_array_equal(zscore(np.array([5.0, 5.0, 5.0])), [0.0, 0.0, 0.0])


def test_relative_depth_and_interpolation_by_hand():
    """(l + 0.5)/L for L = 4; a 4-layer and a 2-layer profile on the common grid [0.25, 0.5, 0.75]."""
    np.testing.assert_allclose(relative_depth(4), [0.125, 0.375, 0.625, 0.875])
    kind, grid, wa, wb = comparison_grid(4, 2, 3)
    assert kind == "relative_depth"
    np.testing.assert_allclose(grid, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(wa @ np.array([0.0, 1.0, 2.0, 3.0]), [0.5, 1.5, 2.5])
    np.testing.assert_allclose(wb @ np.array([10.0, 20.0]), [10.0, 15.0, 20.0])
    kind, grid, wa, wb = comparison_grid(5, 5, 3)
    assert kind == "layer" and grid.size == 5 and np.array_equal(wa, np.eye(5))


def test_interpolation_matrix_equals_np_interp():
    """W @ profile == np.interp(grid, depth, profile) for an arbitrary profile, including grid points outside depth."""
    rng = np.random.default_rng(3)
    depth, grid = relative_depth(7), np.linspace(0.0, 1.0, 13)
    profile = rng.normal(size=7)
    np.testing.assert_allclose(interpolation_matrix(depth, grid) @ profile, np.interp(grid, depth, profile))


def test_circular_shift_pvalue_known_count():
    """x = y = [1,0,0,1,0,0] (period 3): of the 5 shifts only k = 3 reproduces |r| = 1 (the others give
    r = -0.5), so p = (1 + 1)/6 = 1/3. A single spike has no exceeding shift: p = 1/5, the minimum."""
    x = np.array([1.0, 0, 0, 1, 0, 0])
    r, p = circular_shift_pvalue(x, x)
    assert r == pytest.approx(1.0) and p == pytest.approx(1 / 3)
    spike = np.array([0.0, 0, 1, 0, 0])
    assert circular_shift_pvalue(spike, spike)[1] == pytest.approx(1 / 5)
    # [1,0,1,0]: every shift gives |r| = 1, p = (1 + 3)/4 = 1.
    assert circular_shift_pvalue(np.array([1.0, 0, 1, 0]), np.array([1.0, 0, 1, 0]))[1] == pytest.approx(1.0)


def test_circular_shift_spearman_uses_ranks():
    """The spearman variant's r equals scipy.stats.spearmanr and is unchanged by a monotone transform of x."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=12), rng.normal(size=12)
    r, p = circular_shift_pvalue(x, y, "spearman")
    assert r == pytest.approx(stats.spearmanr(x, y).statistic)
    assert circular_shift_pvalue(np.exp(3 * x), y, "spearman") == (pytest.approx(r), pytest.approx(p))
    assert circular_shift_pvalue(np.exp(3 * x), y, "pearson")[0] != pytest.approx(r)


def test_permutation_pvalue_counts_plus_one():
    """p = (1 + #{|T*| >= |T|})/(1 + n): T = 2 against null [0.5, -2, 3, 1] has 2 exceedances -> 3/5; NaN stays NaN."""
    p = permutation_pvalue(np.array([2.0, np.nan, 10.0]), np.array([[0.5, 0.0, 0.0], [-2.0, 1.0, 0.0],
                                                                     [3.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    assert p[0] == pytest.approx(3 / 5) and np.isnan(p[1]) and p[2] == pytest.approx(1 / 5)


def test_paired_permutation_test_exact_by_hand():
    """Paired differences [1, 2, 3], statistic = mean difference 2: of the 8 sign vectors only all-plus and
    all-minus reach |mean| >= 2, so with all 8 fed in p = (1 + 2)/(1 + 8) = 1/3."""
    base = np.zeros((3, 1))
    instruct = np.array([[1.0], [2.0], [3.0]])
    observed, p = paired_permutation_test(base, instruct, np.zeros(3), lambda b, i: i[0] - b[0], all_sign_vectors(3))
    assert observed[0] == pytest.approx(2.0) and p[0] == pytest.approx(1 / 3)


def test_percentile_ci_by_hand():
    """Linear-interpolation percentiles, as scipy.stats.bootstrap: 0..100 at 90% gives (5, 95); 0..10 at 95% (0.25, 9.75)."""
    assert percentile_ci(np.arange(101.0), 0.90) == (pytest.approx(5.0), pytest.approx(95.0))
    assert percentile_ci(np.arange(11.0), 0.95) == (pytest.approx(0.25), pytest.approx(9.75))


def test_fdr_bh_by_hand():
    """BH: [0.01, 0.02, 0.03, 0.5] -> p*m/rank = [0.04, 0.04, 0.04, 0.5]; a NaN is left out of m and stays NaN."""
    np.testing.assert_allclose(fdr_bh(np.array([0.01, 0.02, 0.03, 0.5])), [0.04, 0.04, 0.04, 0.5])
    q = fdr_bh(np.array([0.01, np.nan, 0.02]))
    assert q[0] == pytest.approx(0.02) and np.isnan(q[1]) and q[2] == pytest.approx(0.02)
    assert np.isnan(fdr_bh(np.array([np.nan, np.nan]))).all()


def test_index_counts_by_hand():
    """Counts per row: [[0,0,2],[1,2,2]] over 3 items -> [[2,0,1],[0,1,2]]."""
    np.testing.assert_array_equal(index_counts(np.array([[0, 0, 2], [1, 2, 2]]), 3), [[2, 0, 1], [0, 1, 2]])


# ------------------------------------------------------------------------------ against the libraries

def test_bootstrap_ci_of_one_stratum_mean_matches_scipy_bootstrap():
    """Our stratified bootstrap of a single-stratum mean gives the same percentile CI as
    scipy.stats.bootstrap(method="percentile") up to Monte-Carlo error.

    Tolerance: with B = 20,000 resamples the Monte-Carlo SE of a 2.5% quantile of a roughly normal
    bootstrap distribution with sd s is sqrt(.025*.975/B)/phi(1.96) * s ~ 0.019 s; the difference of two
    independent runs has SE ~ 0.027 s. We allow 0.15 s (> 5 SE), far below the 1.96 s half-width a
    wrong resampling scheme (no replacement: width 0; resampling one prompt: width x sqrt(n)) would miss by.
    """
    x = np.random.default_rng(11).gamma(2.0, 1.0, size=40)
    strata = np.zeros(40, dtype=int)
    idx = stratified_bootstrap_indices(strata, 20_000, rng_for(1, "ci"))
    means = bootstrap_group_means(x[:, None], strata, idx)[0][:, 0]
    lo, hi = percentile_ci(means, 0.95)
    ref = stats.bootstrap((x,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(2)).confidence_interval
    s = x.std(ddof=0) / math.sqrt(x.size)
    assert abs(lo - ref.low) < 0.15 * s and abs(hi - ref.high) < 0.15 * s
    assert hi - lo > 3.5 * s  # the interval has the right width (about 2 * 1.96 s), not just the right centre


def test_sign_flip_pvalue_matches_scipy_exact_permutation_test():
    """With all 2^n sign vectors fed in, our count of |T*| >= |T| is exactly scipy's exact count, so
    p_ours = (1 + 2^n p_scipy)/(1 + 2^n). scipy's two-sided p is 2 min(P(T* <= T), P(T* >= T)), which
    equals P(|T*| >= |T|) here because the sign-flip null of a mean difference is symmetric (flipping
    every sign negates T)."""
    n = 10
    signs = all_sign_vectors(n)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        base = rng.normal(size=n)
        instruct = base + rng.normal(0.3 * seed, 1.0, size=n)
        _, p = paired_permutation_test(base[:, None], instruct[:, None], np.zeros(n),
                                       lambda b, i: i[0] - b[0], signs)
        ref = stats.permutation_test((instruct, base), lambda a, b, axis: np.mean(a - b, axis=axis),
                                     permutation_type="samples", n_resamples=np.inf, vectorized=True,
                                     alternative="two-sided").pvalue
        assert p[0] == pytest.approx((1 + 2 ** n * ref) / (1 + 2 ** n), rel=1e-12)


def test_layer_delta_rfc_pvalue_matches_scipy_exact_permutation_test():
    """The layer test's statistic (ΔRFC, a ratio of category means, over 4 strata) against scipy's exact
    paired permutation test of the same statistic: same relation as for the mean difference."""
    rng = np.random.default_rng(5)
    categories = np.repeat(CATS, 3)
    base = rng.gamma(20.0, 0.1, size=(12, 2))
    instruct = base + rng.normal(0.0, 0.05, size=(12, 2))
    instruct[categories == "self_referent", 0] += 0.5
    masks = [categories == c for c in CATS]

    def delta_rfc(x, y, axis=-1):  # scipy passes base as x, instruct as y, prompts along `axis`
        x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
        rfc = [1 - v[..., masks[0]].mean(-1) / v[..., masks[1]].mean(-1) for v in (x, y)]
        return rfc[1] - rfc[0]

    signs = all_sign_vectors(12)
    _, p = paired_permutation_test(base, instruct, categories, _change, signs)
    for layer in range(2):
        ref = stats.permutation_test((base[:, layer], instruct[:, layer]), delta_rfc, permutation_type="samples",
                                     n_resamples=np.inf, vectorized=True).pvalue
        assert p[0][layer] == pytest.approx((1 + 4096 * ref) / 4097, rel=1e-12)
    # Non-trivial p-values (not the p = 1 of identical variants), and the planted layer reaches about the
    # smallest p attainable with 3 self prompts (patterns keeping them the same sign have probability 2/8).
    assert p[0][0] < 0.3 and p[0][1] < 1 and p[0][0] != p[0][1]


def test_head_did_pvalue_matches_scipy_exact_permutation_test():
    """Head p-values (paired permutation test of DiD over self and neutral prompts) against scipy's exact test."""
    rng = np.random.default_rng(6)
    categories = np.repeat(["self_referent", "neutral"], 4)
    base = rng.gamma(20.0, 0.1, size=(8, 1, 3))
    instruct = base + rng.normal(0.0, 0.1, size=(8, 1, 3))
    instruct[:4, 0, 1] += 0.3
    is_self = categories == "self_referent"
    table = head_scores(base, instruct, categories, all_sign_vectors(8), top_k=1, decimals=4)

    def did(x, y, axis=-1):
        d = np.moveaxis(y, axis, -1) - np.moveaxis(x, axis, -1)
        return d[..., is_self].mean(-1) - d[..., ~is_self].mean(-1)

    for head in range(3):
        ref = stats.permutation_test((base[:, 0, head], instruct[:, 0, head]), did, permutation_type="samples",
                                     n_resamples=np.inf, vectorized=True).pvalue
        assert table["p_value"][head] == pytest.approx((1 + 256 * ref) / 257, rel=1e-12)


def test_fdr_bh_matches_statsmodels_with_nan():
    """fdr_bh equals statsmodels multipletests(method="fdr_bh") on the finite p-values; NaNs keep their place."""
    rng = np.random.default_rng(8)
    p = rng.uniform(size=30) ** 2
    p[[3, 17, 25]] = np.nan
    q = fdr_bh(p)
    finite = np.isfinite(p)
    np.testing.assert_array_equal(np.isnan(q), ~finite)
    np.testing.assert_allclose(q[finite], multipletests(p[finite], method="fdr_bh")[1])
    assert not np.allclose(q[finite], p[finite])  # the adjustment did something


def test_compare_profiles_matches_scipy_pearson_and_spearman():
    """Pearson and Spearman fields equal scipy.stats.pearsonr/spearmanr: layer by layer for equal depth,
    on the np.interp-ed relative-depth grid for different depths."""
    rng = np.random.default_rng(9)
    a, b, c = rng.normal(size=12), rng.normal(size=12), rng.normal(size=8)
    row = compare_profiles(a, b, depth_grid=10, confidence=0.95)
    assert row["grid"] == "layer" and row["n_points"] == 12
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(a, b).statistic)
    assert row["pearson_p"] == pytest.approx(stats.pearsonr(a, b).pvalue)
    assert row["spearman_r"] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert row["spearman_p"] == pytest.approx(stats.spearmanr(a, b).pvalue)
    assert row["pearson_p_shift"] == pytest.approx(circular_shift_pvalue(a, b)[1])

    row = compare_profiles(a, c, depth_grid=10, confidence=0.95)
    da, dc = relative_depth(12), relative_depth(8)
    grid = np.linspace(max(da[0], dc[0]), min(da[-1], dc[-1]), 10)
    x, y = np.interp(grid, da, a), np.interp(grid, dc, c)
    assert row["grid"] == "relative_depth" and row["n_points"] == 10
    assert row["depth_lo"] == pytest.approx(1 / 16) and row["depth_hi"] == pytest.approx(15 / 16)
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert row["spearman_r"] == pytest.approx(stats.spearmanr(x, y).statistic)
    # no parametric p on interpolated points: the circular-shift p is the p, and the real layers are shown
    assert math.isnan(row["pearson_p"]) and math.isnan(row["spearman_p"])
    assert row["parametric_p_reason"] == INTERPOLATED and row["undefined_reason"] is None
    assert row["pearson_p_shift"] == pytest.approx(circular_shift_pvalue(x, y)[1])
    assert (row["n_layers_a"], row["n_layers_b"]) == (12, 8)


def test_compare_profiles_undefined_without_signal():
    """A profile whose largest |ΔRFC| is within the noise floor has no shape to correlate: every statistic is
    NaN and the reason names the family; so is a constant profile; a profile above the floor is correlated."""
    rng = np.random.default_rng(11)
    a, tiny = rng.normal(size=6), rng.normal(size=6) * 1e-7
    row = compare_profiles(a, tiny, depth_grid=5, confidence=0.9, floor=1e-5, names=("x", "y"))
    assert row["undefined_reason"] == NO_SIGNAL.format(family="y")
    assert all(math.isnan(row[k]) for k in ("pearson_r", "pearson_p", "pearson_p_shift", "spearman_r"))
    assert compare_profiles(a, np.full(6, 0.2), depth_grid=5, confidence=0.9, floor=1e-5,
                            names=("x", "y"))["undefined_reason"] == CONSTANT.format(family="y")
    fine = compare_profiles(a, tiny, depth_grid=5, confidence=0.9, floor=1e-8, names=("x", "y"))
    assert fine["undefined_reason"] is None and np.isfinite(fine["pearson_r"])


def test_compare_profiles_resampled_interval():
    """The r interval is the percentile interval of row-wise r over the paired resample rows; NaN without resamples."""
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=6), rng.normal(size=6)
    ra, rb = a + rng.normal(0, 0.3, (500, 6)), b + rng.normal(0, 0.3, (500, 6))
    row = compare_profiles(a, b, depth_grid=5, confidence=0.9, resamples_a=ra, resamples_b=rb)
    r = np.array([np.corrcoef(ra[k], rb[k])[0, 1] for k in range(500)])
    assert (row["pearson_r_lo"], row["pearson_r_hi"]) == (pytest.approx(np.quantile(r, 0.05)),
                                                          pytest.approx(np.quantile(r, 0.95)))
    assert math.isnan(compare_profiles(a, b, depth_grid=5, confidence=0.9)["pearson_r_lo"])


def test_rowwise_pearson_matches_np_corrcoef():
    """Row-wise r equals np.corrcoef row by row; a constant row gives NaN (np.corrcoef would warn and give NaN too)."""
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    b[2] = 3 * a[2] + 1  # r = 1 exactly
    r = rowwise_pearson(a, b)
    np.testing.assert_allclose(r, [np.corrcoef(a[k], b[k])[0, 1] for k in range(6)], atol=1e-12)
    assert r[2] == pytest.approx(1.0)
    a[4] = 2.0
    assert np.isnan(rowwise_pearson(a, b)[4])


# ---------------------------------------------------------------------------- resampling design properties

def test_bootstrap_indices_stay_within_strata_and_counts_sum_to_n():
    """Every resampled index belongs to its column's stratum (interleaved strata), each stratum is resampled
    to its own size, and index_counts rows sum to n."""
    strata = np.array(list("abacbbcaab"))
    idx = stratified_bootstrap_indices(strata, 300, rng_for(3, "strata"))
    assert idx.shape == (300, 10)
    np.testing.assert_array_equal(strata[idx], np.broadcast_to(strata, idx.shape))
    counts = index_counts(idx, 10)
    np.testing.assert_array_equal(counts.sum(axis=1), np.full(300, 10))
    for label in "abc":
        np.testing.assert_array_equal(counts[:, strata == label].sum(axis=1), np.full(300, np.sum(strata == label)))
    assert len({tuple(row) for row in idx}) > 250  # resamples differ (with replacement, not a fixed permutation)


def test_bootstrap_group_means_equal_explicit_resampling():
    """bootstrap_group_means (counts @ values) equals taking each resample's prompts and averaging per stratum."""
    rng = np.random.default_rng(13)
    strata = np.array(list("aabbbcab"))
    values = rng.normal(size=(8, 3, 2))
    idx = stratified_bootstrap_indices(strata, 20, rng)
    means = bootstrap_group_means(values, strata, idx)
    for k in range(20):
        for label in "abc":
            cols = np.flatnonzero(strata == label)
            np.testing.assert_allclose(means[label][k], values[idx[k, cols]].mean(axis=0))


def test_bootstrap_is_paired_constant_shift_survives_every_resample():
    """Instruct = base + a constant per category: with the same indices for both, every resampled ΔH_c is
    exactly that constant (independent resampling would scatter it), and family_layer_statistics'
    resampled Δ(H_self - H_neutral) is exactly shift_self - shift_neutral."""
    base, _, categories = synthetic_family(14, 6, 3, 2)
    shifts = {"self_referent": 0.3, "neutral": -0.1, "third_person": 0.0, "confounder": 0.2}
    instruct = base + np.array([shifts[c] for c in categories])[:, None, None]
    idx = stratified_bootstrap_indices(categories, 500, rng_for(0, "paired"))
    mb = bootstrap_group_means(base, categories, idx)
    mi = bootstrap_group_means(instruct, categories, idx)
    for c in CATS:
        np.testing.assert_allclose(mi[c] - mb[c], shifts[c], atol=1e-12)
        assert np.ptp(mb[c][:, 0, 0]) > 0.01  # the resampled means themselves do vary
    out = build_statistics(long_table("f", base, instruct, categories), settings(n_resamples=500))
    d = out["deltas"]
    np.testing.assert_allclose(d["delta_diff_lo"], 0.4, atol=1e-9)
    np.testing.assert_allclose(d["delta_diff_hi"], 0.4, atol=1e-9)


def test_permuted_group_means_equal_explicit_swaps():
    """permuted_group_means equals swapping base and instruct of the prompts with sign -1 and averaging per stratum."""
    rng = np.random.default_rng(15)
    strata = np.array(list("abab"))
    base, instruct = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    signs = np.array([[1, -1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, 1]])
    pb, pi = permuted_group_means(base, instruct, strata, signs)
    for k, s in enumerate(signs):
        swapped_b = np.where(s[:, None] > 0, base, instruct)
        swapped_i = np.where(s[:, None] > 0, instruct, base)
        for label in "ab":
            np.testing.assert_allclose(pb[label][k], swapped_b[strata == label].mean(0))
            np.testing.assert_allclose(pi[label][k], swapped_i[strata == label].mean(0))


def test_group_means_by_hand():
    """Plain stratum means with a leading axis of 1."""
    out = group_means(np.array([1.0, 3.0, 10.0]), np.array(["x", "x", "y"]))
    assert out["x"].tolist() == [2.0] and out["y"].tolist() == [10.0]


# ---------------------------------------------------------------------------------- input validation

def _valid_table() -> pd.DataFrame:
    base, instruct, categories = synthetic_family(16, 2, 2, 2)
    return long_table("fam", base, instruct, categories)


def test_valid_table_is_accepted_and_ordered():
    """A valid table passes, prompts are ordered by category then id, and arrays hold the table's values."""
    table = _valid_table().sample(frac=1.0, random_state=0)  # row order must not matter
    arrays = family_arrays(table, ALL_DEFINITIONS)["fam"]
    assert list(arrays.categories) == list(np.repeat(CATS, 2))
    row = table[(table["variant"] == "instruct") & (table["prompt_id"] == arrays.prompt_ids[5])
                & (table["layer"] == 1) & (table["head"] == 0)].iloc[0]
    assert arrays.instruct["no_bos"][5, 1, 0] == row["entropy_no_bos"]


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.drop(columns="entropy_no_bos"), "lacks column.*entropy_no_bos"),
    (lambda t: t.drop(columns="prompt_id"), "lacks column.*prompt_id"),
    (lambda t: t[~((t["variant"] == "instruct") & (t["prompt_id"] == "neutral_02"))],
     "same prompts.*neutral_02"),
    (lambda t: t[t["category"] != "third_person"], r"no prompts in categories \['third_person'\]"),
    (lambda t: pd.concat([t, t.iloc[[5]]], ignore_index=True), "1 duplicated"),
    (lambda t: t.assign(entropy=t["entropy"].where(t.index != 7, np.nan)), "non-finite.*column entropy "),
    (lambda t: t.assign(entropy_normalised=t["entropy_normalised"].where(t.index != 3, np.inf)),
     "1 non-finite values in column entropy_normalised"),
    (lambda t: t[t["variant"] == "base"], "needs exactly a base and an instruct"),
])
def test_family_arrays_rejects_bad_tables(mutate, message):
    """family_arrays raises UserError whose message names the problem (column, prompt, category, duplicates, NaN)."""
    table = _valid_table()
    family_arrays(table, ALL_DEFINITIONS)  # the unmutated table is fine
    with pytest.raises(UserError, match=message):
        family_arrays(mutate(table), ALL_DEFINITIONS)


# ------------------------------------------------------------------------- build_statistics end to end

PLANTED_LAYER, PLANTED_HEAD = 3, 1


@pytest.fixture(scope="module")
def planted():
    """Family `deep` (6 layers x 4 heads) with +0.4 nats on instruct self_referent prompts at one head of
    layer 3 only; family `shallow` (4 layers x 3 heads), same prompts, no change. 12 prompts per category."""
    base, instruct, categories = synthetic_family(21, 12, 6, 4, shift={(PLANTED_LAYER, PLANTED_HEAD): 0.4})
    b2, i2, _ = synthetic_family(22, 12, 4, 3)
    table = pd.concat([long_table("deep", base, instruct, categories), long_table("shallow", b2, i2, categories)],
                      ignore_index=True)
    s = settings(n_resamples=999, n_permutations=999, definitions=ALL_DEFINITIONS)
    return table, s, build_statistics(table, s)


def test_planted_layer_is_compression_and_others_no_change(planted):
    """The planted layer alone is classed compression (q < alpha, ΔRFC CI below 0) in every definition;
    every other layer of both families is no_change."""
    _, s, out = planted
    d = out["deltas"]
    for definition in ALL_DEFINITIONS:
        deep = d[(d["family"] == "deep") & (d["definition"] == definition)].set_index("layer")
        hit = deep.loc[PLANTED_LAYER]
        assert hit["layer_class"] == "compression" and hit["q_value"] < s.alpha
        assert hit["delta_rfc_hi"] < 0 and hit["delta_rfc_lo"] <= hit["delta_rfc"] <= hit["delta_rfc_hi"]
        assert hit["delta_diff_lo"] > 0  # self entropy rose relative to neutral
        assert (deep.drop(PLANTED_LAYER)["layer_class"] == "no_change").all()
    assert (d.loc[d["family"] == "shallow", "layer_class"] == "no_change").all()


def test_planted_head_ranks_first_and_is_significant(planted):
    """The planted head has rank 1 and q < alpha in its family; the unchanged family has no significant head."""
    _, s, out = planted
    h = out["heads"][out["heads"]["definition"] == "raw"]
    deep = h[h["family"] == "deep"].set_index(["layer", "head"])
    top = deep.loc[(PLANTED_LAYER, PLANTED_HEAD)]
    assert top["rank"] == 1 and top["q_value"] < s.alpha and top["top_k"]
    assert (deep["q_value"] < s.alpha).sum() == 1
    assert not (h.loc[h["family"] == "shallow", "q_value"] < s.alpha).any()


def test_metrics_are_json_ready_and_complete(planted):
    """metrics has no NaN (json.dumps(allow_nan=False) works), the documented family and pair keys, and
    values consistent with the deltas table."""
    _, s, out = planted
    metrics = out["metrics"]
    json.dumps(metrics, allow_nan=False)
    deep = metrics["families"]["deep"]
    for key in ("n_layers", "n_heads", "mean_delta_rfc", "mean_delta_rfc_lo", "mean_delta_rfc_hi",
                "share_compression", "share_gain", "share_no_change", "top_compression_layers"):
        assert key in deep and deep[key] is not None, key
    assert (deep["n_layers"], deep["n_heads"]) == (6, 4)
    assert deep["share_compression"] == pytest.approx(1 / 6, rel=1e-5)  # metrics keep 6 significant digits
    assert deep["share_no_change"] == pytest.approx(5 / 6, rel=1e-5)
    assert deep["top_compression_layers"]["rank_1"] == PLANTED_LAYER
    assert deep["mean_delta_rfc_lo"] <= deep["mean_delta_rfc"] <= deep["mean_delta_rfc_hi"]
    raw = out["deltas"][(out["deltas"]["definition"] == "raw") & (out["deltas"]["family"] == "deep")]
    assert deep["mean_delta_rfc"] == pytest.approx(raw["delta_rfc"].mean(), rel=1e-5)
    pair = metrics["pairs"]["deep~shallow"]
    for key in ("pearson_r", "pearson_p_shift"):
        assert isinstance(pair[key], float), key
    # different depths: no parametric p, and the pair says why and how many real layers each profile has
    assert pair["pearson_p"] is None and pair["parametric_p_reason"] == INTERPOLATED
    assert (pair["n_layers_a"], pair["n_layers_b"]) == (6, 4)
    assert set(out["summaries"]) == set(ALL_DEFINITIONS)


def test_families_of_different_depth_compared_on_relative_depth(planted):
    """6- and 4-layer families: grid relative_depth with depth_grid points from 1/8 to 7/8, and r equals scipy's
    Pearson of the two ΔRFC profiles interpolated onto that grid."""
    _, s, out = planted
    row = out["cross_family"].query("definition == 'raw'").iloc[0]
    assert (row["family_a"], row["family_b"]) == ("deep", "shallow")
    assert row["grid"] == "relative_depth" and row["n_points"] == s.depth_grid
    assert (row["depth_lo"], row["depth_hi"]) == (pytest.approx(0.125), pytest.approx(0.875))
    assert bool(row["joint_resampling"])  # same prompts -> same resample indices
    d = out["deltas"].query("definition == 'raw'")
    grid = np.linspace(0.125, 0.875, s.depth_grid)
    x = np.interp(grid, relative_depth(6), d.loc[d["family"] == "deep", "delta_rfc"].to_numpy())
    y = np.interp(grid, relative_depth(4), d.loc[d["family"] == "shallow", "delta_rfc"].to_numpy())
    assert row["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)


def test_same_seed_same_results_other_seed_other_intervals(planted):
    """build_statistics is deterministic given the seed; another seed changes intervals but not point estimates."""
    table, s, out = planted
    again = build_statistics(table, s)
    for key in ("layers", "deltas", "cross_family", "heads"):
        pd.testing.assert_frame_equal(out[key], again[key])
    assert again["metrics"] == out["metrics"]
    other = build_statistics(table, dataclasses.replace(s, seed=s.seed + 1))
    np.testing.assert_array_equal(other["deltas"]["delta_rfc"], out["deltas"]["delta_rfc"])
    assert not np.array_equal(other["deltas"]["delta_rfc_lo"], out["deltas"]["delta_rfc_lo"])
    assert not np.array_equal(other["deltas"]["p_value"], out["deltas"]["p_value"])


def test_null_calibration_on_exchangeable_variants():
    """20 seeds where base and instruct are exchangeable per prompt (prompt effect + independent noise of the
    same distribution): the mean share of FDR-flagged layers is <= alpha and in at least 15 seeds no head
    has q < alpha (under the global null BH controls the chance of any flag at alpha)."""
    alpha = 0.05
    s = settings(n_resamples=20, n_permutations=999, alpha=alpha)
    shares, seeds_with_head = [], 0
    for seed in range(20):
        base, instruct, categories = synthetic_family(100 + seed, 10, 8, 6, noise=0.05)
        out = build_statistics(long_table("null", base, instruct, categories), dataclasses.replace(s, seed=seed))
        shares.append(float(np.mean(out["deltas"]["q_value"] < alpha)))
        seeds_with_head += bool((out["heads"]["q_value"] < alpha).any())
        assert out["deltas"]["p_value"].min() >= 1 / 1000  # p = (1 + #)/(1 + 999) is never below 1/1000
    assert np.mean(shares) <= alpha
    assert seeds_with_head <= 5
