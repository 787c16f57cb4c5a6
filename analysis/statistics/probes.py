"""What the residual stream encodes: linear probes of the prompt category per layer (docs/method.md, "What the residual
stream encodes").

Per checkpoint, layer and pool (mean or last user token), a logistic regression (scikit-learn, L2 penalty, C chosen
by an inner cross-validation on the training folds only) is fitted and scored on held-out folds. Folds are grouped by
the prompt's matching unit (a matched triple of self-referent, third-person and confounder prompts with every
translation of each; a neutral prompt with its translations), so no question is seen in training in any wording.
Beside the real labels: a control task (labels drawn at random per source prompt with the real class balance;
Hewitt & Liang 2019) whose accuracy is the probe's chance level under this design, selectivity = accuracy − control
accuracy, and a bag-of-tokens baseline that sees only the token ids. Intervals resample matching units within their
kind (prompt bootstrap); base against instruct, the change of selectivity is tested by swapping base and instruct
per matching unit, with Benjamini–Hochberg across layers, and its profile is correlated with ΔRFC's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from analysis.core.config import ProbeSettings, StatsSettings
from analysis.core.layout import checkpoint_name
from analysis.core.quantities import CATEGORIES, NEUTRAL, SELF, relative_depth
from analysis.statistics.correlation import compare_profiles
from analysis.statistics.layers import metric_value
from analysis.statistics.resampling import (fdr_bh, index_counts, percentile_ci, permutation_pvalue, rng_for,
                                            sign_flips, stratified_bootstrap_indices)

# The probe tasks: which categories take part, and the label of each (an index into the task's classes).
TASKS = {"self_vs_neutral": (NEUTRAL, SELF), "categories": CATEGORIES}
ALL_LANGUAGES = "all"
TOKENS = "tokens"  # the `pool` of the bag-of-tokens baseline's rows


@dataclass
class TaskDesign:
    """The prompts of one task (rows of the residual arrays), their labels, control labels and matching units."""

    task: str
    rows: np.ndarray        # indices into the checkpoint's prompt order
    labels: np.ndarray      # class index per prompt
    control: np.ndarray     # control class index per prompt (random per source prompt, same class balance)
    groups: np.ndarray      # matching unit per prompt: folds never split one
    kinds: np.ndarray       # per prompt, the bootstrap stratum of its unit ("matched" triple or "neutral")
    languages: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(TASKS[self.task])


def matching_units(prompts: pd.DataFrame) -> np.ndarray:
    """Per prompt, the unit folds keep together: its matched triple (`triple_id`) where it has one, else its source
    prompt (`source_id`: a neutral prompt and its translations)."""
    source = prompts["source_id"].fillna("").astype(str).to_numpy()
    triple = prompts["triple_id"].fillna("").astype(str).to_numpy() if "triple_id" in prompts else np.full(len(source), "")
    return np.where(triple != "", "triple:" + triple, "source:" + source)


def task_design(prompts: pd.DataFrame, task: str, seed: int) -> TaskDesign:
    """The design of `task` on `prompts` (in the residual file's prompt order); control labels depend only on the
    seed and the prompt set, so every checkpoint gets the same ones."""
    classes = TASKS[task]
    keep = prompts["category"].isin(classes).to_numpy()
    part = prompts[keep]
    labels = part["category"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    source = part["source_id"].astype(str).to_numpy()
    units = pd.Series(labels, index=source).groupby(level=0).first()
    rng = rng_for(seed, "probe-control", task, *units.index)
    shuffled = pd.Series(rng.permutation(units.to_numpy()), index=units.index)
    groups = matching_units(part)
    kinds = np.where(part["category"].to_numpy() == NEUTRAL, "neutral", "matched")
    return TaskDesign(task, np.flatnonzero(keep), labels, shuffled.loc[source].to_numpy(dtype=np.int64), groups,
                      kinds, part["language"].astype(str).to_numpy())


def outer_folds(design: TaskDesign, settings: ProbeSettings, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped outer folds (StratifiedGroupKFold, shuffled with the seed): a matching unit is in one fold, and the
    folds are stratified on the real and the control label together, so that neither task's held-out class balance
    is tilted (a tilted balance pushes a probe that learns nothing below chance)."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=settings.outer_folds, shuffle=True, random_state=seed)
    joint = design.labels * design.n_classes + design.control
    return list(splitter.split(np.zeros(len(design.labels)), joint, design.groups))


def _scaled(x, train: np.ndarray):
    """Features divided by one number, the root mean square of the training rows (rotation-invariant, so span
    coordinates and full vectors give the same probe; docs/method.md)."""
    if sparse.issparse(x):
        return x
    scale = float(np.sqrt(np.mean(np.asarray(x[train], dtype=np.float64) ** 2)))
    return x / scale if scale > 0 else x


def inner_folds(y: np.ndarray, groups: np.ndarray, settings: ProbeSettings, seed: int) -> list:
    """Grouped, stratified folds within one training fold: the cross-validation that chooses C."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = min(settings.inner_folds, len(np.unique(groups)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), y, groups))


def fit_probe(x, y: np.ndarray, groups: np.ndarray, settings: ProbeSettings, seed: int):
    """scikit-learn's LogisticRegressionCV over settings.c_grid on grouped inner folds (a warm-started path per
    fold; the best mean accuracy, ties to the smallest C), refitted on the whole training fold; None when the
    training fold has one class only (its prediction is that class)."""
    from sklearn.linear_model import LogisticRegressionCV

    if np.unique(y).size < 2:
        return None
    model = LogisticRegressionCV(Cs=list(settings.c_grid), cv=inner_folds(y, groups, settings, seed),
                                 scoring="accuracy", max_iter=settings.max_iter, refit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence at large C on separable data: the fit is still usable
        model.fit(x, y)
    return model


def nested_cv_predictions(features, labels: np.ndarray, groups: np.ndarray,
                          folds: list[tuple[np.ndarray, np.ndarray]], settings: ProbeSettings,
                          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions of a logistic-regression probe whose C is chosen inside each training fold (nested
    cross-validation), and the C chosen per fold (NaN where a training fold had one class)."""
    from threadpoolctl import threadpool_limits

    predictions = np.empty(len(labels), dtype=np.int64)
    chosen = []
    with threadpool_limits(limits=1):  # many small fits: threads only contend
        for train, test in folds:
            x = _scaled(features, train)
            model = fit_probe(x[train], labels[train], groups[train], settings, seed)
            predictions[test] = labels[train][0] if model is None else model.predict(x[test])
            chosen.append(np.nan if model is None else float(np.ravel(model.C_)[0]))
    return predictions, np.asarray(chosen)


def chosen_c(features, labels: np.ndarray, groups: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
             settings: ProbeSettings, seed: int) -> np.ndarray:
    """Per outer fold, the C that the inner grouped folds of its training rows choose (NaN where the training fold
    has one class): the regularisation then held fixed for every layer and for the control task of a pool."""
    from threadpoolctl import threadpool_limits

    chosen = []
    with threadpool_limits(limits=1):
        for train, _ in folds:
            x = _scaled(features, train)
            model = fit_probe(x[train], labels[train], groups[train], settings, seed)
            chosen.append(np.nan if model is None else float(np.ravel(model.C_)[0]))
    return np.asarray(chosen)


def fixed_c_predictions(features, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                        cs: np.ndarray, settings: ProbeSettings) -> np.ndarray:
    """Out-of-fold predictions of a logistic regression with each outer fold's fixed C (a one-class training fold
    predicts its only class)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    predictions = np.empty(len(labels), dtype=np.int64)
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence at large C on separable data: the fit is still usable
        for (train, test), c in zip(folds, cs):
            if np.unique(labels[train]).size < 2 or not np.isfinite(c):
                predictions[test] = labels[train][0]
                continue
            x = _scaled(features, train)
            model = LogisticRegression(C=c, max_iter=settings.max_iter).fit(x[train], labels[train])
            predictions[test] = model.predict(x[test])
    return predictions


def bag_of_tokens(input_ids: list[list[int]]) -> sparse.csr_matrix:
    """Token-frequency rows (count / length) of the ids fed: what a probe could learn from the words alone."""
    rows = np.repeat(np.arange(len(input_ids)), [len(x) for x in input_ids])
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids])
    weights = np.concatenate([np.full(len(x), 1.0 / len(x)) for x in input_ids])
    _, cols = np.unique(cols, return_inverse=True)
    return sparse.csr_matrix((weights, (rows, cols)), shape=(len(input_ids), int(cols.max()) + 1))


def unit_sums(correct: np.ndarray, groups: np.ndarray, kinds: np.ndarray,
              unit_order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per matching unit (in `unit_order`), the sum of `correct` [..., prompts] and the number of its prompts."""
    code = pd.Categorical(groups, categories=unit_order).codes
    onehot = np.zeros((len(groups), len(unit_order)))
    onehot[np.arange(len(groups)), code] = 1.0
    return np.asarray(correct, dtype=float) @ onehot, onehot.sum(axis=0)


def resampled_means(correct: np.ndarray, groups: np.ndarray, kinds: np.ndarray, indices: np.ndarray,
                    unit_order: np.ndarray) -> np.ndarray:
    """[B, ...] the mean of `correct` [..., prompts] over the prompts of each bootstrap resample of matching units
    (`indices` [B, units] from stratified_bootstrap_indices)."""
    sums, counts = unit_sums(correct, groups, kinds, unit_order)
    weight = index_counts(indices, len(unit_order)).astype(float)  # [B, units]
    return np.moveaxis(np.tensordot(sums, weight, axes=([-1], [1])), -1, 0) / (weight @ counts)[
        (slice(None),) + (None,) * (sums.ndim - 1)]


@dataclass
class UnitDraws:
    """The matching units of a task design (one order), their strata, and the bootstrap and permutation draws over
    them (same for every checkpoint: they depend on the seed and the prompt set)."""

    order: np.ndarray
    indices: np.ndarray
    signs: np.ndarray


def unit_draws(design: TaskDesign, settings: ProbeSettings, seed: int) -> UnitDraws:
    units = pd.DataFrame({"unit": design.groups, "kind": design.kinds}).drop_duplicates("unit").sort_values("unit")
    order = units["unit"].to_numpy()
    key = "\x1f".join(order)
    indices = stratified_bootstrap_indices(units["kind"].to_numpy(), settings.n_resamples,
                                           rng_for(seed, "probe-bootstrap", design.task, key))
    signs = sign_flips(len(order), settings.n_permutations, rng_for(seed, "probe-permutation", design.task, key))
    return UnitDraws(order, indices, signs)


def accuracy_rows(correct: np.ndarray, control: np.ndarray, baseline: np.ndarray, design: TaskDesign,
                  draws: UnitDraws, confidence: float) -> list[dict]:
    """Per language (and all together): accuracy, control accuracy, selectivity and baseline accuracy with
    prompt-bootstrap intervals (resampling matching units); `correct`, `control`, `baseline` are 0/1 per prompt."""
    rows = []
    for language in [ALL_LANGUAGES, *dict.fromkeys(design.languages)]:
        keep = np.ones(len(correct), bool) if language == ALL_LANGUAGES else design.languages == language
        stacked = np.stack([correct, control, correct - control, baseline]).astype(float) * keep
        means = stacked.sum(axis=1) / keep.sum()
        # prompts of other languages count 0 and weigh 0: resample units with their prompts of this language only
        sums, _ = unit_sums(stacked, design.groups, design.kinds, draws.order)
        n_keep, _ = unit_sums(keep.astype(float), design.groups, design.kinds, draws.order)
        weight = index_counts(draws.indices, len(draws.order)).astype(float)
        boot = (weight @ sums.T) / (weight @ n_keep)[:, None]  # [B, 4]
        lo, hi = percentile_ci(boot, confidence)
        row = {"language": language, "n_prompts": int(keep.sum())}
        for i, name in enumerate(("accuracy", "control_accuracy", "selectivity", "baseline_accuracy")):
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = float(means[i]), float(lo[i]), float(hi[i])
        rows.append(row)
    return rows


def reference_layer(n_layers: int) -> int:
    """The layer whose inner cross-validation chooses a pool's C: the last one (where a model's representation of
    the prompt is most complete; the layers before it share its regularisation)."""
    return n_layers - 1


def probe_checkpoint(residuals, prompts: pd.DataFrame, settings: ProbeSettings, stats: StatsSettings,
                     family: str, variant: str) -> tuple[pd.DataFrame, dict]:
    """Every task, pool and layer of one checkpoint: the rows of probes.parquet and, per (task, pool, layer), the 0/1
    correctness of the real and the control probe per prompt (for the base-vs-instruct change)."""
    ordered = prompts.set_index("prompt_id").loc[residuals.prompt_ids].reset_index()
    rows, outcomes = [], {}
    for task in TASKS:
        design = task_design(ordered, task, stats.seed)
        folds = outer_folds(design, settings, stats.seed)
        draws = unit_draws(design, settings, stats.seed)
        tokens = bag_of_tokens([residuals.input_ids[i] for i in design.rows])
        base_pred, _ = nested_cv_predictions(tokens, design.labels, design.groups, folds, settings, stats.seed)
        baseline = (base_pred == design.labels).astype(float)
        majority = float(np.bincount(design.labels).max() / len(design.labels))
        for pool in settings.pools:
            layers = [residuals.features[pool][layer][design.rows].astype(np.float64)
                      for layer in range(residuals.n_layers)]
            # C per outer fold by the inner folds at the pool's reference layer, then fixed for every layer and for
            # the control task: probes of one complexity (Hewitt & Liang 2019), at a fraction of per-layer nested CV
            chosen = chosen_c(layers[reference_layer(residuals.n_layers)], design.labels, design.groups, folds,
                              settings, stats.seed)
            for layer, x in enumerate(layers):
                real = fixed_c_predictions(x, design.labels, folds, chosen, settings)
                ctrl = fixed_c_predictions(x, design.control, folds, chosen, settings)
                correct = (real == design.labels).astype(float)
                control = (ctrl == design.control).astype(float)
                outcomes[(task, pool, layer)] = (correct, control, design, draws)
                for row in accuracy_rows(correct, control, baseline, design, draws, stats.confidence):
                    rows.append({"family": family, "variant": variant, "checkpoint": residuals.checkpoint,
                                 "task": task, "pool": pool, "layer": layer, "n_layers": residuals.n_layers,
                                 "depth": float(relative_depth(residuals.n_layers)[layer]), **row,
                                 "majority_share": majority, "c_median": float(np.nanmedian(chosen)) if np.isfinite(chosen).any() else None})
    return pd.DataFrame(rows), outcomes


def selectivity_change(base: tuple, instruct: tuple, confidence: float) -> dict:
    """Instruct − base selectivity over one task's prompts, with a bootstrap interval and a permutation p (base and
    instruct swapped per matching unit: the null is that tuning leaves each unit's selectivity as it was)."""
    (correct_b, control_b, design, draws), (correct_i, control_i, _, _) = base, instruct
    diff = (correct_i - control_i) - (correct_b - control_b)
    n = len(diff)
    sums, _ = unit_sums(diff, design.groups, design.kinds, draws.order)
    observed = float(sums.sum() / n)
    null = draws.signs.astype(float) @ sums / n
    boot = resampled_means(diff, design.groups, design.kinds, draws.indices, draws.order)
    lo, hi = percentile_ci(boot, confidence)
    return {"selectivity_base": float((correct_b - control_b).mean()),
            "selectivity_instruct": float((correct_i - control_i).mean()), "delta_selectivity": observed,
            "delta_selectivity_lo": float(lo), "delta_selectivity_hi": float(hi),
            "p_value": float(permutation_pvalue(np.asarray(observed), null))}


def change_table(outcomes: dict[str, dict], stages: dict[str, tuple[str, ...]], n_layers: dict[str, int],
                 settings: ProbeSettings, stats: StatsSettings) -> pd.DataFrame:
    """Per family with a base and an instruct checkpoint, task, pool and layer: the change of selectivity, its
    interval, p and BH q across the family's layers (per task and pool)."""
    frames = []
    for family, order in stages.items():
        if len(order) < 2:
            continue
        base, instruct = outcomes[checkpoint_name(family, order[0])], outcomes[checkpoint_name(family, order[-1])]
        for task in TASKS:
            for pool in settings.pools:
                layers = range(n_layers[family])
                rows = [{"family": family, "task": task, "pool": pool, "layer": layer,
                         "n_layers": n_layers[family], "depth": float(relative_depth(n_layers[family])[layer]),
                         **selectivity_change(base[(task, pool, layer)], instruct[(task, pool, layer)],
                                              stats.confidence)} for layer in layers]
                frame = pd.DataFrame(rows)
                frame["q_value"] = fdr_bh(frame["p_value"].to_numpy())
                frame["significant"] = frame["q_value"] < stats.alpha
                frames.append(frame)
    columns = ["family", "task", "pool", "layer", "n_layers", "depth", "selectivity_base", "selectivity_instruct",
               "delta_selectivity", "delta_selectivity_lo", "delta_selectivity_hi", "p_value", "q_value", "significant"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def correlation_table(changes: pd.DataFrame, deltas: pd.DataFrame, stats: StatsSettings) -> pd.DataFrame:
    """Per family, task and pool: the correlation across layers of the selectivity-change profile with the ΔRFC
    profile (headline definition and format, English), circular-shift p (analysis.statistics.correlation)."""
    headline = deltas[(deltas["definition"] == stats.headline_definition) & (deltas["format"] == stats.headline_format)]
    if "language" in headline:
        headline = headline[headline["language"] == "en"]
    rows = []
    for (family, task, pool), part in changes.groupby(["family", "task", "pool"], sort=True):
        rfc = headline[headline["family"] == family].sort_values("layer")["delta_rfc"].to_numpy()
        if rfc.size != len(part):
            continue
        row = {"family": family, "task": task, "pool": pool}
        row.update(compare_profiles(part.sort_values("layer")["delta_selectivity"].to_numpy(), rfc,
                                    depth_grid=stats.depth_grid, confidence=stats.confidence,
                                    floor=stats.noise_floor["delta_rfc"], names=("Δselectivity", "ΔRFC")))
        rows.append(row)
    return pd.DataFrame(rows)


def probe_metrics(probes: pd.DataFrame, changes: pd.DataFrame, correlations: pd.DataFrame) -> dict:
    """data/probes/metrics.json: per checkpoint, task and pool the layer of the largest selectivity and its value
    (all languages), the first layer whose interval lies above 0, the baseline; per family the change summary."""
    out: dict = {"checkpoints": {}, "families": {}}
    every = probes[probes["language"] == ALL_LANGUAGES]
    for (ckpt, task, pool), part in every.groupby(["checkpoint", "task", "pool"], sort=True):
        part = part.sort_values("layer")
        best = part.loc[part["selectivity"].round(4).idxmax()]
        above = part[part["selectivity_lo"] > 0]
        out["checkpoints"].setdefault(ckpt, {}).setdefault(task, {})[pool] = {
            "max_selectivity": metric_value(best["selectivity"]), "max_selectivity_layer": int(best["layer"]),
            "max_accuracy": metric_value(part["accuracy"].max()),
            "first_selective_layer": int(above["layer"].iloc[0]) if len(above) else None,
            "mean_control_accuracy": metric_value(part["control_accuracy"].mean()),
            "baseline_accuracy": metric_value(part["baseline_accuracy"].iloc[0])}
    for (family, task, pool), part in changes.groupby(["family", "task", "pool"], sort=True):
        entry = {"n_layers_significant": int(part["significant"].sum()), "n_layers": int(len(part)),
                 "mean_delta_selectivity": metric_value(part["delta_selectivity"].mean())}
        corr = correlations[(correlations["family"] == family) & (correlations["task"] == task)
                            & (correlations["pool"] == pool)] if len(correlations) else correlations
        if len(corr):
            entry["pearson_r_with_delta_rfc"] = metric_value(corr["pearson_r"].iloc[0])
            entry["pearson_p_shift"] = metric_value(corr["pearson_p_shift"].iloc[0])
            reason = corr["undefined_reason"].iloc[0]  # a missing reason reads back from parquet as NaN
            entry["correlation_undefined_reason"] = reason if isinstance(reason, str) else None
        out["families"].setdefault(family, {}).setdefault(task, {})[pool] = entry
    return out
