"""The residual-stream probes: residual capture against an independent forward pass, the span coordinates, grouped
folds, each statistic against a hand-computed case and the library it wraps, and the demo's known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.core.config import ProbeSettings, StatsSettings, load
from analysis.core.prompts import load_prompts
from analysis.core.quantities import NEUTRAL, SELF
from analysis.extraction import residuals as res
from analysis.statistics import probes

sklearn = pytest.importorskip("sklearn")

SETTINGS = ProbeSettings(pools=("mean", "last"), outer_folds=5, inner_folds=3, c_grid=(0.01, 0.1, 1.0, 10.0),
                         max_iter=200, n_resamples=500, n_permutations=500, workers=1)


@pytest.fixture(scope="module")
def config():
    return load()


@pytest.fixture(scope="module")
def prompts(config):
    return load_prompts(config.paths.prompts, config.prompts.min_per_category)


def _stats(config) -> StatsSettings:
    return config.stats


def test_span_coordinates_keep_the_gram_matrix_of_centred_vectors():
    rng = np.random.default_rng(0)
    for shape in ((30, 8), (8, 30)):
        x = rng.normal(size=shape) * 3 + 1
        z = res.span_coordinates(x)
        centred = x - x.mean(axis=0)
        assert z.shape == (shape[0], min(shape[0] - 1, shape[1]))
        np.testing.assert_allclose(z @ z.T, centred @ centred.T, atol=1e-9)


def test_a_rotation_invariant_probe_fits_the_same_on_span_coordinates(prompts):
    """L2 logistic regression with an intercept is rotation-invariant: same predictions on full vectors and on
    their span coordinates (why the residual file can drop the model width)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 200))
    y = (x[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)
    z = res.span_coordinates(x)
    full = LogisticRegression(C=0.3, tol=1e-10, max_iter=5000).fit(x, y).decision_function(x)
    span = LogisticRegression(C=0.3, tol=1e-10, max_iter=5000).fit(z, y).decision_function(z)
    np.testing.assert_allclose(full, span, atol=1e-5)


def test_pooled_residuals_match_the_hidden_states_of_a_plain_transformers_forward(config, prompts, tmp_path):
    """The hooks' mean and last-token pools of `blocks.<l>.hook_resid_post` against forward hooks on the decoder
    layers of transformers' own model (no TransformerLens), on a demo checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from analysis.extraction.runner import encode_prompts, open_checkpoint

    folder = config.paths.demo_model_dir("demo_llama-base")
    if not (folder / "config.json").exists():
        pytest.skip("run `selfref pull demo_llama-base` first")
    part = prompts.groupby(["language", "category"]).head(2).reset_index(drop=True)
    loaded = open_checkpoint(folder, checkpoint="demo_llama-base", settings=config.extract)
    encoded = encode_prompts(loaded.tokenizer, part, "raw", config.extract)
    masks = res.user_token_masks(loaded.tokenizer, encoded)
    n_layers = loaded.runner.n_layers
    values = loaded.runner.run(encoded, 4, batch_hooks=res.pooled_residual_hooks(masks, n_layers), progress=False)
    pooled = res.pooled_arrays(values, n_layers)

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    special = set(tokenizer.all_special_ids)
    outputs: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
               for k, layer in enumerate(model.model.layers)]
    try:
        for row, e in enumerate(encoded):
            with torch.no_grad():
                model(torch.tensor([e.input_ids]))
            keep = [t not in special for t in e.input_ids]
            assert keep == list(masks[row])
            for layer in range(n_layers):
                hidden = outputs[layer][0].double().numpy()
                np.testing.assert_allclose(pooled["mean"][layer, row], hidden[keep].mean(axis=0), atol=2e-4, rtol=1e-4)
                np.testing.assert_allclose(pooled["last"][layer, row], hidden[np.flatnonzero(keep)[-1]], atol=2e-4,
                                           rtol=1e-4)
    finally:
        for h in handles:
            h.remove()


def test_the_residual_file_round_trips_at_float16_precision(tmp_path):
    rng = np.random.default_rng(2)
    pooled = {"mean": rng.normal(size=(3, 12, 5)), "last": rng.normal(size=(3, 12, 5)) * 100}
    ids = [[1, 2, 3], [4, 5], *[[7, 8, 9, 10]] * 10]
    made = res.compress("x-base", [f"p{i}" for i in range(12)], pooled, ids)
    res.write_residuals(made, tmp_path / "x.safetensors")
    back = res.read_residuals(tmp_path / "x.safetensors")
    assert back.prompt_ids == made.prompt_ids and back.input_ids == ids and back.d_model == 5
    for pool in ("mean", "last"):
        np.testing.assert_allclose(back.features[pool], made.features[pool], rtol=2e-3,
                                   atol=2e-3 * np.abs(made.features[pool]).max())
    assert not any(p.suffix != ".safetensors" for p in tmp_path.iterdir())  # nothing half-written left beside it
    # equal content, equal bytes: DVC hashes the file, and a stage that reads it must not re-run for nothing
    for attempt in range(3):
        res.write_residuals(made, tmp_path / f"again{attempt}.safetensors")
        assert (tmp_path / f"again{attempt}.safetensors").read_bytes() == (tmp_path / "x.safetensors").read_bytes()


def test_grouped_folds_never_split_a_matching_unit(prompts, config):
    for task in probes.TASKS:
        design = probes.task_design(prompts, task, config.stats.seed)
        folds = probes.outer_folds(design, SETTINGS, config.stats.seed)
        seen = np.zeros(len(design.labels), int)
        for train, test in folds:
            seen[test] += 1
            assert not set(design.groups[train]) & set(design.groups[test])
            inner = probes.inner_folds(design.labels[train], design.groups[train], SETTINGS, config.stats.seed)
            for a, b in inner:
                assert not set(design.groups[train][a]) & set(design.groups[train][b])
        assert (seen == 1).all()
        # a triple's self-referent, third-person and confounder prompts and every translation share one unit
        frame = prompts[prompts["category"].isin(probes.TASKS[task])]
        units = pd.Series(design.groups, index=frame["prompt_id"].to_numpy())
        assert units["self_01"] == units["self_01_zh"]
        if task == "categories":
            triple = frame.loc[frame["triple_id"] == "t01", "prompt_id"]
            assert units[triple].nunique() == 1 and len(triple) == 9


def test_control_labels_keep_the_class_balance_and_are_shared_by_translations(prompts, config):
    for task in probes.TASKS:
        design = probes.task_design(prompts, task, config.stats.seed)
        assert sorted(np.bincount(design.control)) == sorted(np.bincount(design.labels))
        frame = prompts[prompts["category"].isin(probes.TASKS[task])]
        by_source = pd.Series(design.control).groupby(frame["source_id"].to_numpy()).nunique()
        assert (by_source == 1).all()
        assert not np.array_equal(design.control, design.labels)


def _toy_design() -> probes.TaskDesign:
    # four units: two "matched" (2 prompts each), two "neutral" (1 prompt each)
    return probes.TaskDesign(task="self_vs_neutral", rows=np.arange(6), labels=np.array([1, 1, 1, 1, 0, 0]),
                             control=np.array([0, 1, 1, 0, 0, 1]), groups=np.array(["a", "a", "b", "b", "c", "d"]),
                             kinds=np.array(["m", "m", "m", "m", "n", "n"]), languages=np.array(["en", "zh"] * 3))


def test_accuracy_and_selectivity_by_hand():
    design = _toy_design()
    draws = probes.UnitDraws(order=np.array(["a", "b", "c", "d"]), indices=np.array([[0, 1, 2, 3], [0, 0, 2, 2]]),
                             signs=np.ones((1, 4), np.int8))
    correct = np.array([1, 1, 0, 1, 1, 0.0])
    control = np.array([1, 0, 0, 0, 1, 1.0])
    baseline = np.ones(6)
    rows = {r["language"]: r for r in probes.accuracy_rows(correct, control, baseline, design, draws, 0.5)}
    assert rows["all"]["accuracy"] == pytest.approx(4 / 6)
    assert rows["all"]["control_accuracy"] == pytest.approx(3 / 6)
    assert rows["all"]["selectivity"] == pytest.approx(1 / 6)
    assert rows["en"]["accuracy"] == pytest.approx(2 / 3) and rows["en"]["n_prompts"] == 3  # prompts 0, 2, 4
    # resample 2 takes unit a twice (2 + 2 correct of 4) and unit c twice (1 + 1 of 2): 6 / 6 = 1
    boot = probes.resampled_means(correct, design.groups, design.kinds, draws.indices, draws.order)
    np.testing.assert_allclose(boot, [4 / 6, 6 / 6])


def test_selectivity_change_by_hand_and_against_scipy_permutation_test():
    from scipy import stats

    design = _toy_design()
    rng = np.random.default_rng(3)
    draws = probes.UnitDraws(order=np.array(["a", "b", "c", "d"]), indices=np.zeros((10, 4), int),
                             signs=np.array(np.meshgrid(*[[-1, 1]] * 4)).reshape(4, -1).T.astype(np.int8))
    base = (np.array([0, 0, 1, 0, 1, 0.0]), np.array([0, 0, 0, 0, 1, 0.0]), design, draws)
    inst = (np.array([1, 1, 1, 1, 1, 0.0]), np.array([0, 0, 0, 0, 1, 0.0]), design, draws)
    out = probes.selectivity_change(base, inst, 0.95)
    assert out["selectivity_base"] == pytest.approx(1 / 6) and out["selectivity_instruct"] == pytest.approx(4 / 6)
    assert out["delta_selectivity"] == pytest.approx(3 / 6)
    # every one of the 16 sign patterns of the four units: exact p; scipy's permutation_test over unit sums agrees
    unit = np.array([2.0, 1.0, 0.0, 0.0])  # per unit sum of the change (a: 2, b: 1)
    ref = stats.permutation_test((unit,), lambda d: d.sum() / 6, permutation_type="samples", n_resamples=np.inf,
                                 alternative="two-sided")
    null = draws.signs @ unit / 6
    assert out["p_value"] == pytest.approx((1 + np.sum(np.abs(null) >= 0.5 - 1e-12)) / 17)
    assert ref.pvalue == pytest.approx(np.mean(np.abs(null) >= 0.5 - 1e-12))


def test_nested_cv_matches_a_grid_search_of_scikit_learn(prompts, config):
    """The nested cross-validation against GridSearchCV(LogisticRegression) on the same grouped folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    design = probes.task_design(prompts, "self_vs_neutral", config.stats.seed)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(len(design.labels), 6)) + design.labels[:, None] * np.array([1.5, 0, 0, 0, 0, 0])
    folds = probes.outer_folds(design, SETTINGS, config.stats.seed)
    predictions, chosen = probes.nested_cv_predictions(x, design.labels, design.groups, folds, SETTINGS,
                                                       config.stats.seed)
    for (train, test), c in zip(folds, chosen):
        xs = x / np.sqrt(np.mean(x[train] ** 2))
        inner = probes.inner_folds(design.labels[train], design.groups[train], SETTINGS, config.stats.seed)
        search = GridSearchCV(LogisticRegression(max_iter=1000), {"C": list(SETTINGS.c_grid)}, cv=inner,
                              scoring="accuracy").fit(xs[train], design.labels[train])
        assert search.best_params_["C"] == c
        assert np.mean(search.predict(xs[test]) == predictions[test]) >= 0.95
    assert np.mean(predictions == design.labels) > 0.7


def test_fixed_c_probes_use_the_inner_folds_choice_and_equal_scikit_learn_fits(prompts, config):
    """Per layer the probe keeps each outer fold's C chosen at the reference layer: chosen_c is the nested
    cross-validation's choice, and fixed_c_predictions are LogisticRegression(C) fitted on the fold's rows."""
    from sklearn.linear_model import LogisticRegression

    design = probes.task_design(prompts, "self_vs_neutral", config.stats.seed)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(len(design.labels), 6)) + design.labels[:, None] * np.array([1.0, 0, 0, 0, 0, 0])
    folds = probes.outer_folds(design, SETTINGS, config.stats.seed)
    cs = probes.chosen_c(x, design.labels, design.groups, folds, SETTINGS, config.stats.seed)
    _, nested = probes.nested_cv_predictions(x, design.labels, design.groups, folds, SETTINGS, config.stats.seed)
    np.testing.assert_array_equal(cs, nested)
    other = rng.normal(size=x.shape)  # another layer: same folds, same C
    predictions = probes.fixed_c_predictions(other, design.control, folds, cs, SETTINGS)
    for (train, test), c in zip(folds, cs):
        xs = other / np.sqrt(np.mean(other[train] ** 2))
        fit = LogisticRegression(C=c, max_iter=SETTINGS.max_iter).fit(xs[train], design.control[train])
        np.testing.assert_array_equal(fit.predict(xs[test]), predictions[test])
    assert probes.reference_layer(6) == 5


def test_bag_of_tokens_counts_token_frequencies():
    bag = probes.bag_of_tokens([[5, 7, 7], [9]]).toarray()
    np.testing.assert_allclose(bag, [[1 / 3, 2 / 3, 0], [0, 0, 1]])


def _demo_probe(config, prompts):
    out = {}
    for variant in ("base", "instruct"):
        path = config.paths.residual_file(f"demo_probe-{variant}")
        if not path.exists():
            pytest.skip("run `selfref extract demo_probe-base --format raw` (and instruct) first")
        table, outcomes = probes.probe_checkpoint(res.read_residuals(path), prompts, SETTINGS, config.stats,
                                                  "demo_probe", variant)
        out[variant] = (table, outcomes)
    return out


@pytest.mark.slow
def test_demo_known_answer_the_planted_direction_is_found_at_its_layer_and_not_before(config, prompts):
    """demo_probe: the last token carries the planted direction from layer 2 in base only; before layer 2 (and in
    instruct everywhere) every prompt's last token is the same vector: selectivity is exactly 0."""
    found = _demo_probe(config, prompts)
    rows = {v: t[(t["language"] == "all") & (t["pool"] == "last") & (t["task"] == "self_vs_neutral")]
            .set_index("layer") for v, (t, _) in found.items()}
    base, inst = rows["base"], rows["instruct"]
    assert base.loc[2, "accuracy"] == 1.0 and base.loc[2, "selectivity_lo"] > 0.3
    for layer in (0, 1):
        assert base.loc[layer, "selectivity"] == pytest.approx(0.0, abs=1e-12)
        assert base.loc[layer, "selectivity_lo"] <= 0 <= base.loc[layer, "selectivity_hi"]
    for layer in (0, 1, 2):
        assert inst.loc[layer, "selectivity"] == pytest.approx(0.0, abs=1e-12)
    changes = probes.change_table({f"demo_probe-{v}": o for v, (_, o) in found.items()},
                                  {"demo_probe": ("base", "instruct")}, {"demo_probe": 3}, SETTINGS, config.stats)
    last = changes[(changes["pool"] == "last") & (changes["task"] == "self_vs_neutral")].set_index("layer")
    assert list(last["significant"]) == [False, False, True]
    assert (last.loc[[0, 1], "delta_selectivity"] == 0).all() and last.loc[2, "delta_selectivity"] < -0.3


def test_probe_metrics_write_a_missing_correlation_reason_as_null():
    """An undefined correlation whose reason reads back from parquet as NaN is JSON null, not a NaN the metrics
    file cannot hold."""
    import json

    corr = pd.DataFrame({"family": ["f"], "task": ["t"], "pool": ["p"], "pearson_r": [np.nan],
                         "pearson_p_shift": [np.nan], "undefined_reason": [np.nan]})
    changes = pd.DataFrame({"family": ["f"], "task": ["t"], "pool": ["p"], "significant": [False],
                            "delta_selectivity": [0.0]})
    out = probes.probe_metrics(pd.DataFrame(columns=["language", "checkpoint", "task", "pool"]), changes, corr)
    entry = json.loads(json.dumps(out, allow_nan=False))["families"]["f"]["t"]["p"]
    assert entry["correlation_undefined_reason"] is None and entry["pearson_r_with_delta_rfc"] is None
