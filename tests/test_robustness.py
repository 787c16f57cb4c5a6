"""Length control and split-half reliability on synthetic entropy tables with known answers."""

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from analysis.statistics.robustness import FORMULA, INTERACTION, NO_CHANGE_TO_MODEL, length_control, prompt_layer_entropy, split_half

from entropy_tables import entropy_table, prompt_frame

N_PROMPTS, N_LAYERS, N_HEADS = 40, 5, 3


def synthetic_table(seed: int, *, self_shift=None, length_slope=0.0, self_extra_tokens=0, noise=0.02):
    """Entropies with a prompt effect, head noise, an optional instruct change on self_referent prompts
    (`self_shift[layer]`) and an optional instruct change proportional to token count (`length_slope`)."""
    rng = np.random.default_rng(seed)
    categories = np.repeat(["self_referent", "neutral"], N_PROMPTS)
    values = {v: np.empty((categories.size, N_LAYERS, N_HEADS)) for v in ("base", "instruct")}
    n_tokens = np.empty(categories.size, dtype=int)
    for i, category in enumerate(categories):  # draws in the order of the original row-by-row construction
        n_tokens[i] = int(rng.integers(6, 12)) + (self_extra_tokens if category == "self_referent" else 0)
        prompt_effect = rng.normal(0, 0.05, N_LAYERS)
        for variant in ("base", "instruct"):
            for layer in range(N_LAYERS):
                level = 1.0 + 0.05 * n_tokens[i] + prompt_effect[layer]
                if variant == "instruct":
                    level += length_slope * n_tokens[i]
                    if category == "self_referent" and self_shift is not None:
                        level += self_shift[layer]
                values[variant][i, layer] = level + rng.normal(0, noise, N_HEADS)
    prompts = prompt_frame(categories, [f"{c}_{i % N_PROMPTS}" for i, c in enumerate(categories)])
    return pd.concat([entropy_table(values[v], prompts, family="f", variant=v, n_tokens=n_tokens)
                      for v in ("base", "instruct")], ignore_index=True)


def _deltas(table: pd.DataFrame, layer_class: list[str]) -> pd.DataFrame:
    m = prompt_layer_entropy(table, "entropy").groupby(["variant", "layer", "category"])["entropy"].mean().unstack()
    rfc = (1 - m["self_referent"] / m["neutral"]).unstack("variant")
    return pd.DataFrame({"family": "f", "layer": range(N_LAYERS), "delta_rfc": (rfc["instruct"] - rfc["base"]).values,
                         "layer_class": layer_class})


def test_interaction_matches_statsmodels_called_directly():
    table = synthetic_table(1, self_shift=[0, 0.08, 0, 0, 0])
    out = length_control(table, "entropy", _deltas(table, ["no_change"] * N_LAYERS), alpha=0.05)
    layer = prompt_layer_entropy(table, "entropy").query("layer == 1")
    fit = smf.mixedlm(FORMULA, layer, groups=layer["prompt_id"]).fit(reml=True)
    row = out.set_index("layer").loc[1]
    assert row["interaction"] == pytest.approx(fit.params[INTERACTION], rel=1e-6)
    assert row["p_value"] == pytest.approx(fit.pvalues[INTERACTION], rel=1e-4)


def test_true_self_effect_survives_length_control():
    table = synthetic_table(2, self_shift=[0, 0.08, 0, 0, 0])
    classes = ["no_change", "compression", "no_change", "no_change", "no_change"]
    out = length_control(table, "entropy", _deltas(table, classes), alpha=0.05).set_index("layer")
    assert out.loc[1, "adjusted_class"] == "compression" and not out.loc[1, "disagrees"]
    assert out.loc[1, "interaction"] == pytest.approx(0.08, abs=0.02)
    assert out.loc[1, "adjusted_delta_rfc"] < 0


def test_an_effect_that_is_only_length_is_flagged():
    # Self prompts are 4 tokens longer and instruct raises entropy with length only: ΔRFC moves,
    # but once length is in the model the self x instruct interaction is gone.
    table = synthetic_table(3, length_slope=0.01, self_extra_tokens=4)
    deltas = _deltas(table, ["compression"] * N_LAYERS)
    assert (deltas["delta_rfc"] < 0).all(), "the construction must move ΔRFC"
    out = length_control(table, "entropy", deltas, alpha=0.05)
    assert (out["adjusted_class"] == "no_change").all()
    assert out["disagrees"].all()


def test_identical_variants_are_undefined_with_a_reason():
    """Instruct equal to base: interaction and standard error would both be 0, so nothing is estimated (null, with
    the reason), never p = 1; the layer counts as no change."""
    table = synthetic_table(4)
    table.loc[table["variant"] == "instruct", "entropy"] = table.loc[table["variant"] == "base", "entropy"].to_numpy()
    out = length_control(table, "entropy", _deltas(table, ["no_change"] * N_LAYERS), alpha=0.05)
    assert out[["interaction", "interaction_se", "p_value", "q_value"]].isna().all().all()
    assert (out["reason"] == NO_CHANGE_TO_MODEL).all() and (out["adjusted_class"] == "no_change").all()


def test_split_half_high_for_a_planted_profile_and_near_zero_for_noise():
    planted = synthetic_table(5, self_shift=[0.0, 0.1, 0.05, -0.05, 0.0], noise=0.01)
    null = synthetic_table(6, noise=0.01)
    high = split_half(planted, "entropy", n_splits=400, seed=0).iloc[0]
    low = split_half(null, "entropy", n_splits=400, seed=0).iloc[0]
    assert high["split_half_r"] > 0.8 and high["spearman_brown"] > high["split_half_r"]
    assert abs(low["split_half_r"]) < 0.2


def test_split_half_of_an_exact_null_is_undefined_not_zero():
    """Instruct equal to base: every half-profile is constant, no split has a correlation, r is undefined."""
    table = synthetic_table(7)
    table.loc[table["variant"] == "instruct", "entropy"] = table.loc[table["variant"] == "base", "entropy"].to_numpy()
    out = split_half(table, "entropy", n_splits=50, seed=0).iloc[0]
    assert np.isnan(out["split_half_r"]) and np.isnan(out["spearman_brown"]) and out["n_splits_defined"] == 0


def test_split_half_is_deterministic_given_the_seed():
    table = synthetic_table(8, self_shift=[0, 0.05, 0, 0, 0])
    a = split_half(table, "entropy", n_splits=100, seed=3)
    b = split_half(table, "entropy", n_splits=100, seed=3)
    pd.testing.assert_frame_equal(a, b)


def test_conclusions_and_differences_from_the_headline():
    """A conclusion follows the sign of the whole interval; rows whose conclusion is not the headline's
    are marked, and the report's cells carry a dagger exactly there."""
    from analysis.report.document import robustness_rows
    from analysis.statistics.robustness import conclusion, metrics_entries, robustness_table

    assert conclusion(-0.3, -0.1) == "compression" and conclusion(0.1, 0.2) == "gain"
    assert conclusion(-0.1, 0.1) == "no_change" and conclusion(None, 0.2) == "no_change"
    rows = []
    for definition, fmt, lo, hi in [("raw", "raw", -0.3, -0.1), ("no_bos", "raw", -0.2, 0.05),
                                    ("raw", "chat", -0.25, -0.05)]:
        rows.append({"family": "f", "definition": definition, "format": fmt, "mean_delta_rfc": (lo + hi) / 2,
                     "mean_delta_rfc_lo": lo, "mean_delta_rfc_hi": hi, "share_compression": 0.5,
                     "share_gain": 0.0, "conclusion": conclusion(lo, hi)})
    table = robustness_table(pd.DataFrame(rows), "raw", "raw")
    marked = table.set_index(["definition", "format"])["differs"]
    assert marked.to_dict() == {("no_bos", "raw"): True, ("raw", "chat"): False, ("raw", "raw"): False}
    shown = robustness_rows(table).set_index(["family", "entropy", "prompts"])
    assert shown.loc[("f", "no_bos", "raw"), "conclusion"] == "no change †"
    assert shown.loc[("f", "raw", "raw"), "conclusion"] == "compression"
    assert shown.loc[("f", "raw", "raw"), "mean ΔRFC [CI]"] == "-0.2000 [-0.3000, -0.1000]"
    assert shown.loc[("f", "raw", "raw"), "compressing layers"] == "50.0%"
    split = pd.DataFrame({"family": ["f"], "split_half_r": [0.8], "spearman_brown": [0.888889]})
    length = pd.DataFrame({"family": ["f", "f"], "disagrees": [True, False]})
    assert metrics_entries(table, split, length)["f"] == {
        "n_choices": 3, "n_choices_differing": 1, "split_half_r": 0.8, "spearman_brown": 0.888889,
        "n_layers_length_disagrees": 1}
    with pytest.raises(ValueError, match="no headline row"):
        robustness_table(pd.DataFrame(rows), "normalised", "raw")
