"""A family of a single checkpoint through the same statistics as a pair, with every comparison left out: its
layer profile, its most self-focused heads (two-sample permutation test), the language contrast of RFC and chat
minus raw within the model, its attention masses and the interventions it allows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.core.quantities import MASS_COLUMNS
from analysis.interventions.patching import interventions_for
from analysis.statistics.heads import self_focus_heads
from analysis.statistics.languages import language_contrasts
from analysis.statistics.layers import build_statistics, format_contrasts
from analysis.statistics.resampling import label_permutations, rng_for, two_sample_permutation_test
from test_stats import long_table, settings

CATS = np.repeat(["self_referent", "neutral", "third_person", "confounder"], 8)


def _single(family: str, variant: str, values: np.ndarray) -> pd.DataFrame:
    table = long_table(family, values, values, CATS)
    table = table[table["variant"] == "base"].assign(variant=variant).reset_index(drop=True)
    for column in MASS_COLUMNS.values():  # attention masses: any values in [0, 1] (marker missing on neutral)
        table[column] = np.where((column == MASS_COLUMNS["marker"]) & (table["category"] == "neutral"), np.nan,
                                 table["entropy"] / 2)
    return table


def _values(seed: int = 1, focus: tuple[int, int] | None = (1, 2)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = 1.0 + 0.05 * rng.standard_normal((len(CATS), 3, 4))
    if focus:
        values[CATS == "self_referent", focus[0], focus[1]] -= 0.5  # a head focused on self-referent prompts
    return values


def test_two_sample_permutation_test_matches_scipy_on_the_same_relabellings():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.3, 1, (9, 2)), rng.normal(0, 1, (7, 2))
    labels = label_permutations(9, 7, 999, rng_for(1, "t"))
    observed, p = two_sample_permutation_test(a, b, labels)
    assert np.allclose(observed, a.mean(0) - b.mean(0))
    pooled = np.concatenate([a, b])
    for j in range(2):  # the same null by hand: mean of the +1 rows minus mean of the -1 rows
        null = np.array([pooled[l > 0, j].mean() - pooled[l < 0, j].mean() for l in labels])
        assert p[j] == pytest.approx((1 + np.sum(np.abs(null) >= abs(observed[j]) - 1e-12)) / 1000)
        ref = stats.permutation_test((a[:, j], b[:, j]), lambda x, y: x.mean() - y.mean(), n_resamples=20000,
                                     permutation_type="independent", random_state=0).pvalue
        assert p[j] == pytest.approx(ref, abs=0.04)  # Monte Carlo p of two different draws


def test_self_focus_heads_finds_the_focused_head_by_hand():
    values = _values()
    order = np.concatenate([np.flatnonzero(CATS == "self_referent"), np.flatnonzero(CATS == "neutral")])
    labels = label_permutations(8, 8, 500, rng_for(2, "h"))
    heads = self_focus_heads(values[order], CATS[order], labels, top_k=2, decimals=4)
    top = heads.sort_values("position").iloc[0]
    assert (top["layer"], top["head"]) == (1, 2) and top["q_value"] < 0.05
    h_self = values[CATS == "self_referent", 1, 2].mean()
    h_neutral = values[CATS == "neutral", 1, 2].mean()
    assert top["self_minus_neutral"] == pytest.approx(h_self - h_neutral)
    assert top["score"] == pytest.approx(-np.log((h_self + 1e-6) / (h_neutral + 1e-6)))


def test_a_single_checkpoint_goes_through_build_statistics_without_comparisons():
    pair = long_table("pair", _values(4), _values(5), CATS)
    solo = _single("solo", "instruct", _values(6))
    out = build_statistics(pd.concat([pair, solo], ignore_index=True), settings(), {"solo": ("instruct",)})
    assert set(out["deltas"]["family"]) == {"pair"} and set(out["heads"]["family"]) == {"pair"}
    assert out["cross_family"].empty and "solo" not in out["metrics"]["families"]
    layers = out["layers"][out["layers"]["family"] == "solo"]
    assert list(layers["variant"].unique()) == ["instruct"] and len(layers) == 3
    v = _values(6).mean(axis=2)
    expected = 1 - v[CATS == "self_referent"].mean(0) / v[CATS == "neutral"].mean(0)
    assert np.allclose(layers["rfc"], expected)
    assert (layers["rfc_lo"] <= layers["rfc"]).all() and (layers["rfc"] <= layers["rfc_hi"]).all()
    entry = out["metrics"]["checkpoints"]["solo"]
    assert entry["variant"] == "instruct" and entry["top_heads"]["rank_1"] == "L1H2"
    assert entry["mean_rfc"] == pytest.approx(expected.mean(), rel=1e-5)
    assert set(out["self_focus_heads"]["family"]) == {"solo"}


def test_a_family_named_single_with_two_checkpoints_is_refused():
    from analysis.core.errors import UserError

    with pytest.raises(UserError, match="single checkpoint"):
        build_statistics(long_table("pair", _values(4), _values(5), CATS), settings(), {"pair": ("instruct",)})


def test_language_contrast_of_a_single_checkpoint_is_rfc_l_minus_rfc_en():
    en, zh = _values(7), _values(8, focus=None)
    a = _single("solo", "base", en).assign(language="en")
    b = _single("solo", "base", zh).assign(language="zh")
    a["source_id"], b["source_id"] = a["prompt_id"], a["prompt_id"]
    b["prompt_id"] = "zh_" + b["prompt_id"]
    out = language_contrasts(pd.concat([a, b], ignore_index=True), settings(), {"solo": ("base",)})
    assert set(out["quantity"]) == {"rfc"}

    def rfc(v):
        m = v.mean(axis=2)
        return 1 - m[CATS == "self_referent"].mean(0) / m[CATS == "neutral"].mean(0)

    assert np.allclose(out["contrast"], rfc(zh) - rfc(en)) and np.allclose(out["delta_rfc_en"], rfc(en))
    assert out.loc[out["layer"] == 1, "q_value"].iloc[0] < 0.05  # the English-only focus of layer 1


def test_chat_minus_raw_is_paired_over_prompts_of_the_instruct_checkpoint():
    raw, chat = _single("solo", "instruct", _values(9)), _single("solo", "instruct", _values(9, focus=None))
    out = format_contrasts(raw, chat, settings())
    m_raw, m_chat = _values(9).mean(axis=2), _values(9, focus=None).mean(axis=2)
    rfc = lambda m: 1 - m[CATS == "self_referent"].mean(0) / m[CATS == "neutral"].mean(0)  # noqa: E731
    assert np.allclose(out["delta_rfc"], rfc(m_chat) - rfc(m_raw)) and "layer_class" not in out
    assert format_contrasts(raw.assign(variant="base"), chat.assign(variant="base"), settings()).empty


def test_a_single_checkpoint_is_ablated_never_patched():
    assert [iv.name for iv in interventions_for(["base"])] == ["mean_ablation@base"]
    assert len(interventions_for(["base", "instruct"])) == 6


def test_a_suite_of_single_checkpoints_alone_goes_through_the_whole_study():
    """`selfref suite use real`: no family with base and instruct; the comparison tables are empty, not an error."""
    from analysis.statistics.study import build_study

    raw = pd.concat([_single("solo", "instruct", _values(10)), _single("other", "base", _values(11))],
                    ignore_index=True)
    chat = _single("solo", "instruct", _values(12))
    study = build_study({"raw": raw, "chat": chat}, settings(split_half_splits=10),
                        {"solo": ("instruct",), "other": ("base",)})
    assert study["deltas"].empty and study["length_control"].empty and study["split_half"].empty
    assert set(study["metrics"]["checkpoints"]) == {"solo", "other"} and not study["metrics"]["families"]
    assert set(study["format_contrasts"]["family"]) == {"solo"}  # chat exists only where there is an instruct model
    assert set(study["self_focus_heads"]["family"]) == {"solo", "other"}
