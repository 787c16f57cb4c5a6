"""Layer-level statistics of one prompt format: `build_statistics` from an entropy table.

Per family and entropy definition, prompt-level layer entropies (mean over the layer's query heads)
are reduced to category means H_c(l), from which RFC = 1 - H_self/H_neutral, RSI = (H_conf - H_self)
/ H_neutral and the plain difference H_self - H_neutral follow (analysis.core.quantities). Uncertainty comes from
resampling prompts with a paired design (docs/method.md, "Inference"): bootstrap prompt indices within category,
applied to base and instruct alike; permutation tests swap base and instruct per prompt.
Resamples depend only on the seed and the family's prompt set (category and prompt id of every
prompt), so every definition of a family sees the same resamples, and families run on the same
prompts are resampled jointly (which the cross-family interval of r uses).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from analysis.statistics.correlation import cross_family_table
from analysis.core.errors import UserError
from analysis.statistics.heads import COLUMNS as HEAD_COLUMNS
from analysis.statistics.heads import SELF_FOCUS_COLUMNS, head_scores, self_focus_heads
from analysis.core.config import StatsSettings
from analysis.core.ranking import ordered, rounded, tie_label
from analysis.core.quantities import (CATEGORIES, DELTAS, RATIOS, ENTROPY_COLUMNS, NEUTRAL, NO_CHANGE, SELF, VARIANTS,
                                 layer_ratios, head_label, original_class, relative_depth, rfc)
from analysis.core.quantities import deltas as ratio_deltas
from analysis.statistics.resampling import (bootstrap_group_means, fdr_bh, group_means, label_permutations,
                                            paired_permutation_test, percentile_ci, rng_for, sign_flips,
                                            stratified_bootstrap_indices)

REQUIRED_COLUMNS = ("family", "variant", "prompt_id", "category", "layer", "head")
SIGNIFICANT_DIGITS = 6
N_TOP_LAYERS = 5

LAYER_COLUMNS = (["definition", "family", "variant", "layer", "n_layers", "depth"]
                 + [f"h_{c}{s}" for c in CATEGORIES for s in ("", "_lo", "_hi")]
                 + [f"{m}{s}" for m in RATIOS for s in ("", "_lo", "_hi")]
                 + [f"n_prompts_{c}" for c in CATEGORIES] + ["low_neutral"])
DELTA_COLUMNS = ["definition", "family", "layer", "n_layers", "depth",
                 "delta_rfc", "delta_rfc_lo", "delta_rfc_hi", "delta_rsi", "delta_rsi_lo", "delta_rsi_hi",
                 "delta_diff", "delta_diff_lo", "delta_diff_hi", "rfc_base", "rfc_instruct",
                 "h_neutral_base", "h_neutral_instruct", "p_value", "q_value", "p_reason", "layer_class",
                 "p_value_diff", "q_value_diff", "near_zero", "original_class",
                 "head_mean_delta_rfc", "head_t_lo", "head_t_hi", "low_neutral"]


@dataclass
class FamilyArrays:
    """One family's entropies as arrays: stages[stage][definition] is [prompts, layers, heads], stages in
    training order (base first, instruct last); `base` and `instruct` are the two endpoints. A family of a single
    checkpoint (`single`) has one stage, base or instruct: `only` is its arrays.

    Prompts are ordered by category (CATEGORIES order) then prompt id; `design` names that prompt set.
    """

    family: str
    prompt_ids: np.ndarray
    categories: np.ndarray
    stages: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def base(self) -> dict[str, np.ndarray]:
        return self.stages[VARIANTS[0]]

    @property
    def instruct(self) -> dict[str, np.ndarray]:
        return self.stages[VARIANTS[1]]

    @property
    def single(self) -> bool:
        return len(self.stages) == 1

    @property
    def variant(self) -> str:
        """The first stage: the checkpoint of a single-checkpoint family."""
        return next(iter(self.stages))

    @property
    def only(self) -> dict[str, np.ndarray]:
        return self.stages[self.variant]

    @property
    def n_layers(self) -> int:
        return next(iter(self.only.values())).shape[1]

    @property
    def n_heads(self) -> int:
        return next(iter(self.only.values())).shape[2]

    @property
    def design(self) -> str:
        return "\x1f".join(f"{c}\x1e{p}" for c, p in zip(self.categories, self.prompt_ids))

    def n_prompts(self, category: str) -> int:
        return int(np.sum(self.categories == category))


def family_arrays(entropy: pd.DataFrame, definitions: list[str],
                  stages: dict[str, tuple[str, ...]] | None = None) -> dict[str, FamilyArrays]:
    """Check the entropy table and reshape it per family; raises UserError naming what is wrong.

    `stages`: family -> its stages in training order; a family not named there (or None) must have
    exactly a base and an instruct checkpoint. A family named with one stage is a single checkpoint.
    """
    missing = [c for c in REQUIRED_COLUMNS + tuple(ENTROPY_COLUMNS[d] for d in definitions)
               if c not in entropy.columns]
    if missing:
        raise UserError(f"entropy table lacks column(s) {', '.join(missing)}")
    if entropy.empty:
        raise UserError("entropy table is empty")
    out = {}
    for family, frame in entropy.groupby("family", sort=True):
        where = f"family {family}"
        order = tuple((stages or {}).get(str(family), VARIANTS))
        variants = sorted(frame["variant"].unique())
        if variants != sorted(order):
            if len(order) == 1:
                raise UserError(f"{where}: is the single checkpoint {order[0]}, found variants {variants}")
            if order == VARIANTS:
                raise UserError(f"{where}: needs exactly a base and an instruct checkpoint, found variants {variants}")
            raise UserError(f"{where}: needs one checkpoint per stage {', '.join(order)}, found variants {variants}")
        unknown = sorted(set(frame["category"].unique()) - set(CATEGORIES))
        if unknown:
            raise UserError(f"{where}: unknown categories {unknown}; use {', '.join(CATEGORIES)}")
        prompts = frame[["prompt_id", "category"]].drop_duplicates()
        if prompts["prompt_id"].duplicated().any():
            bad = prompts.loc[prompts["prompt_id"].duplicated(), "prompt_id"].iloc[0]
            raise UserError(f"{where}: prompt {bad} appears under more than one category")
        absent = [c for c in CATEGORIES if c not in set(prompts["category"])]
        if absent:
            raise UserError(f"{where}: no prompts in categories {absent}")
        by_variant = frame.groupby("variant")["prompt_id"].agg(lambda s: frozenset(s))
        for stage in order[1:]:
            if by_variant[order[0]] != by_variant[stage]:
                diff = sorted(by_variant[order[0]] ^ by_variant[stage])[:5]
                raise UserError(f"{where}: {order[0]} and {stage} must see the same prompts; differing: {diff}")
        prompts = prompts.assign(order=pd.Categorical(prompts["category"], categories=list(CATEGORIES)).codes)
        prompts = prompts.sort_values(["order", "prompt_id"])
        ids = prompts["prompt_id"].to_numpy()
        layer = frame["layer"].to_numpy(dtype=np.int64)
        head = frame["head"].to_numpy(dtype=np.int64)
        if layer.min() < 0 or head.min() < 0:
            raise UserError(f"{where}: layer and head indices must be >= 0")
        n_s, n_p, n_l, n_h = len(order), len(ids), int(layer.max()) + 1, int(head.max()) + 1
        code = pd.Categorical(frame["prompt_id"], categories=ids).codes.astype(np.int64)
        variant = pd.Categorical(frame["variant"], categories=list(order)).codes.astype(np.int64)
        flat = ((variant * n_p + code) * n_l + layer) * n_h + head
        n_cells = n_s * n_p * n_l * n_h
        if len(frame) != n_cells or np.unique(flat).size != len(frame):
            raise UserError(f"{where}: expected one row per (variant, prompt, layer, head) for {n_p} prompts x "
                            f"{n_l} layers x {n_h} heads x {n_s} variants = {n_cells} rows, found "
                            f"{len(frame)} rows ({len(frame) - np.unique(flat).size} duplicated)")
        arrays = FamilyArrays(str(family), ids, prompts["category"].to_numpy().astype(str))
        for stage in order:
            arrays.stages[stage] = {}
        for definition in definitions:
            values = np.empty(n_cells)
            values[flat] = frame[ENTROPY_COLUMNS[definition]].to_numpy(dtype=float)
            if not np.all(np.isfinite(values)):
                raise UserError(f"{where}: {np.sum(~np.isfinite(values))} non-finite values in column "
                                f"{ENTROPY_COLUMNS[definition]} (definition {definition})")
            values = values.reshape(n_s, n_p, n_l, n_h)
            for i, stage in enumerate(order):
                arrays.stages[stage][definition] = values[i]
        out[str(family)] = arrays
    return out


def _change(base_means: dict[str, np.ndarray], instruct_means: dict[str, np.ndarray]) -> np.ndarray:
    """[k, 2, L]: ΔRFC and Δ(H_self - H_neutral), instruct - base; the permutation test's statistics."""
    change = ratio_deltas(layer_ratios(base_means), layer_ratios(instruct_means))
    return np.stack([change["delta_rfc"], change["delta_diff"]], axis=1)


def head_t_interval(base: np.ndarray, instruct: np.ndarray, categories: np.ndarray,
                    confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The original study's interval, kept only for comparison: per layer, mean and t-interval of the
    per-head ΔRFC across the layer's heads. Heads are not samples of anything, so this
    describes the spread of heads, not the uncertainty of ΔRFC (docs/method.md). Heads with H_neutral = 0 are left out."""
    rfc_b = rfc(base[categories == SELF].mean(0), base[categories == NEUTRAL].mean(0))
    rfc_i = rfc(instruct[categories == SELF].mean(0), instruct[categories == NEUTRAL].mean(0))
    per_head = np.where(np.isfinite(rfc_i - rfc_b), rfc_i - rfc_b, np.nan)  # [L, H]
    n = np.sum(np.isfinite(per_head), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layers with fewer than two usable heads give NaN
        mean = np.nanmean(per_head, axis=1)
        sd = np.nanstd(per_head, axis=1, ddof=1)
    half = stats.t.ppf((1 + confidence) / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1))
    half = np.where(n > 1, half, np.nan)
    return mean, mean - half, mean + half


def stage_ratios(prompt_values: np.ndarray, categories: np.ndarray,
                 indices: np.ndarray) -> tuple[dict, dict, dict, dict]:
    """One checkpoint's per-layer ratios from prompt-level layer entropies [P, L]: point ratios (with
    h_neutral), bootstrap ratios [B, L], point category means and bootstrap category means."""
    means = {c: m[0] for c, m in group_means(prompt_values, categories).items()}
    resampled = bootstrap_group_means(prompt_values, categories, indices)
    point, boot = layer_ratios(means), layer_ratios(resampled)
    point["h_neutral"] = means[NEUTRAL]
    return point, boot, means, resampled


def contrast_statistics(before: tuple[np.ndarray, dict, dict], after: tuple[np.ndarray, dict, dict],
                        categories: np.ndarray, signs: np.ndarray,
                        settings: StatsSettings) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """ΔRFC, ΔRSI and Δ(H_self - H_neutral), after - before, of two checkpoints of one family on the same prompts.

    before, after: (prompt-level layer entropies [P, L], point ratios, bootstrap ratios) as `stage_ratios`
    gives them, bootstrapped with the same prompt indices (paired). Returns the columns (each delta with
    its percentile interval, paired permutation p and BH q across layers for ΔRFC and Δdiff, layer_class)
    and the bootstrap deltas [B, L] by name. Used for base -> instruct and for every pair of training stages.
    """
    (prompt_a, point_a, boot_a), (prompt_b, point_b, boot_b) = before, after
    columns, resampled = {}, {}
    for name, metric in DELTAS.items():
        columns[name] = point_b[metric] - point_a[metric]
        resampled[name] = boot_b[metric] - boot_a[metric]
        columns[f"{name}_lo"], columns[f"{name}_hi"] = percentile_ci(resampled[name], settings.confidence)
    _, p = paired_permutation_test(prompt_a, prompt_b, categories, _change, signs)
    # a change within the noise floor is no change: no p and no q (docs/method.md, "Noise floor")
    still = {name: np.abs(columns[name]) <= settings.noise_floor[name] for name in ("delta_rfc", "delta_diff")}
    p_rfc, p_diff = np.where(still["delta_rfc"], np.nan, p[0]), np.where(still["delta_diff"], np.nan, p[1])
    columns["p_value"], columns["q_value"] = p_rfc, fdr_bh(p_rfc)
    columns["p_reason"] = np.where(still["delta_rfc"], NO_CHANGE, None)
    flagged = columns["q_value"] < settings.alpha
    columns["layer_class"] = np.where(flagged & (columns["delta_rfc"] < 0), "compression",
                                      np.where(flagged & (columns["delta_rfc"] > 0), "gain", "no_change"))
    columns["p_value_diff"], columns["q_value_diff"] = p_diff, fdr_bh(p_diff)
    return columns, resampled


def checkpoint_layers(arrays: FamilyArrays, variant: str, definition: str, values: np.ndarray, indices: np.ndarray,
                      settings: StatsSettings) -> tuple[pd.DataFrame, dict, dict]:
    """Layers rows of one checkpoint (category means, RFC, RSI, H_self − H_neutral with prompt-bootstrap
    intervals) from its prompt-level layer entropies [P, L], with its point and bootstrap ratios."""
    n_layers = values.shape[1]
    point, boot, means, resampled = stage_ratios(values, arrays.categories, indices)
    frame = {"definition": definition, "family": arrays.family, "variant": variant, "layer": np.arange(n_layers),
             "n_layers": n_layers, "depth": relative_depth(n_layers)}
    for c in CATEGORIES:
        frame[f"h_{c}"] = means[c]
        frame[f"h_{c}_lo"], frame[f"h_{c}_hi"] = percentile_ci(resampled[c], settings.confidence)
    for metric in RATIOS:
        frame[metric] = point[metric]
        frame[f"{metric}_lo"], frame[f"{metric}_hi"] = percentile_ci(boot[metric], settings.confidence)
    for c in CATEGORIES:
        frame[f"n_prompts_{c}"] = arrays.n_prompts(c)
    frame["low_neutral"] = means[NEUTRAL] < settings.neutral_floor
    return pd.DataFrame(frame)[LAYER_COLUMNS], point, boot


def family_layer_statistics(arrays: FamilyArrays, definition: str, indices: np.ndarray, signs: np.ndarray,
                            settings: StatsSettings) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """Layers and deltas rows of one family and definition, plus its bootstrap ΔRFC and Δdiff [B, L]."""
    confidence = settings.confidence
    cats = arrays.categories
    base_prompt = arrays.base[definition].mean(axis=2)  # [P, L]: mean over the layer's query heads
    instruct_prompt = arrays.instruct[definition].mean(axis=2)
    n_layers = base_prompt.shape[1]
    layer = np.arange(n_layers)
    depth = relative_depth(n_layers)
    floor = settings.neutral_floor

    point, boot, layer_frames = {}, {}, []
    for variant, values in (("base", base_prompt), ("instruct", instruct_prompt)):
        frame, point[variant], boot[variant] = checkpoint_layers(arrays, variant, definition, values, indices,
                                                                 settings)
        layer_frames.append(frame)

    deltas = {"definition": definition, "family": arrays.family, "layer": layer, "n_layers": n_layers,
              "depth": depth}
    change, resampled_delta = contrast_statistics((base_prompt, point["base"], boot["base"]),
                                                  (instruct_prompt, point["instruct"], boot["instruct"]),
                                                  cats, signs, settings)
    deltas.update(change)
    deltas["rfc_base"], deltas["rfc_instruct"] = point["base"]["rfc"], point["instruct"]["rfc"]
    deltas["h_neutral_base"], deltas["h_neutral_instruct"] = point["base"]["h_neutral"], point["instruct"]["h_neutral"]
    near_zero = settings.near_zero
    deltas["near_zero"] = np.abs(deltas["delta_rfc"]) <= near_zero
    deltas["original_class"] = original_class(deltas["delta_rfc"], near_zero)
    deltas["head_mean_delta_rfc"], deltas["head_t_lo"], deltas["head_t_hi"] = head_t_interval(
        arrays.base[definition], arrays.instruct[definition], cats, confidence)
    deltas["low_neutral"] = (point["base"]["h_neutral"] < floor) | (point["instruct"]["h_neutral"] < floor)
    return (pd.concat(layer_frames, ignore_index=True), pd.DataFrame(deltas)[DELTA_COLUMNS],
            resampled_delta["delta_rfc"], resampled_delta["delta_diff"])


FORMAT_CONTRAST_COLUMNS = ["definition", "family", "variant", "layer", "n_layers", "depth", "n_prompts",
                           "rfc_raw", "rfc_chat", "delta_rfc", "delta_rfc_lo", "delta_rfc_hi", "delta_rsi",
                           "delta_rsi_lo", "delta_rsi_hi", "delta_diff", "delta_diff_lo", "delta_diff_hi",
                           "p_value", "q_value", "p_reason", "p_value_diff", "q_value_diff"]


def format_contrasts(raw: pd.DataFrame, chat: pd.DataFrame, settings: StatsSettings,
                     variant: str = VARIANTS[1]) -> pd.DataFrame:
    """Chat minus raw within each family's instruct checkpoint, per definition and layer: the same prompts alone
    and inside the chat template (paired over prompts: `contrast_statistics` with the prompt format in place of
    the checkpoint; its permutation swaps the two formats of a prompt, BH across the family's layers). A format
    contrast is no tuning effect and gets no compression/gain class."""
    raw, chat = raw[raw["variant"] == variant], chat[chat["variant"] == variant]
    common = sorted(set(raw["family"]) & set(chat["family"]))
    if not common:
        return pd.DataFrame(columns=FORMAT_CONTRAST_COLUMNS)
    only = {f: (variant,) for f in common}
    before = family_arrays(raw[raw["family"].isin(common)], list(settings.definitions), only)
    after = family_arrays(chat[chat["family"].isin(common)], list(settings.definitions), only)
    indices, signs = resampling_draws(before, settings)
    frames = []
    for family in common:
        a, b = before[family], after[family]
        if a.design != b.design:
            raise UserError(f"family {family}: the raw and chat entropy tables of {variant} hold different prompts")
        for definition in settings.definitions:
            values = [x.only[definition].mean(axis=2) for x in (a, b)]
            (pa, ba), (pb, bb) = [stage_ratios(v, a.categories, indices[a.design])[:2] for v in values]
            columns, _ = contrast_statistics((values[0], pa, ba), (values[1], pb, bb), a.categories,
                                             signs[a.design], settings)
            columns.pop("layer_class")
            n_layers = values[0].shape[1]
            frames.append(pd.DataFrame({"definition": definition, "family": family, "variant": variant,
                                        "layer": np.arange(n_layers), "n_layers": n_layers,
                                        "depth": relative_depth(n_layers), "n_prompts": len(a.prompt_ids),
                                        "rfc_raw": pa["rfc"], "rfc_chat": pb["rfc"], **columns})
                          [FORMAT_CONTRAST_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def metric_value(value):
    """A JSON-ready scalar: None for None/NaN/inf (undefined), floats to SIGNIFICANT_DIGITS significant digits."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _mean_with_ci(values: np.ndarray, resampled: np.ndarray, confidence: float, key: str) -> dict:
    """{key, key_lo, key_hi}: mean over layers and the percentile interval of the resampled layer means."""
    if values.size == 0:
        return {key: None, f"{key}_lo": None, f"{key}_hi": None}
    with np.errstate(invalid="ignore"):
        lo, hi = percentile_ci(resampled.mean(axis=1), confidence)
    return {key: metric_value(values.mean()), f"{key}_lo": metric_value(lo), f"{key}_hi": metric_value(hi)}


def top_compression_layers(layers: np.ndarray, delta_rfc: np.ndarray, decimals: int,
                           n: int = N_TOP_LAYERS) -> dict[str, int]:
    """Up to n layers with the most negative ΔRFC at `decimals` precision, keyed rank_1 … (a list would be
    skipped by `dvc metrics show`); layers tied at that precision in layer order (analysis/core/ranking.py). A layer
    whose rounded ΔRFC is not negative is no compression layer."""
    frame = pd.DataFrame({"layer": np.asarray(layers), "delta_rfc": rounded(delta_rfc, decimals)})
    frame = ordered(frame[frame["delta_rfc"] < 0], "delta_rfc", decimals).head(n)
    return {f"rank_{i}": int(x) for i, x in enumerate(frame["layer"], start=1)}


def family_metrics(arrays: FamilyArrays, deltas: pd.DataFrame, boot_rfc: np.ndarray, boot_diff: np.ndarray,
                   heads: pd.DataFrame, settings: StatsSettings) -> dict:
    """metrics.json entry of one family (headline definition); plain JSON values, no NaN."""
    confidence, alpha = settings.confidence, settings.alpha
    d = deltas.sort_values("layer")
    delta_rfc = d["delta_rfc"].to_numpy()
    keep = ~d["low_neutral"].to_numpy()
    out = {"n_layers": arrays.n_layers, "n_heads": arrays.n_heads,
           "n_prompts": {c: arrays.n_prompts(c) for c in CATEGORIES}}
    out.update(_mean_with_ci(delta_rfc, boot_rfc, confidence, "mean_delta_rfc"))
    out.update(_mean_with_ci(delta_rfc[keep], boot_rfc[:, keep], confidence, "mean_delta_rfc_excl_low_neutral"))
    out.update(_mean_with_ci(d["delta_diff"].to_numpy(), boot_diff, confidence, "mean_delta_diff"))
    for cls in ("compression", "gain", "no_change"):
        out[f"share_{cls}"] = metric_value(np.mean(d["layer_class"] == cls))
    out["share_near_zero"] = metric_value(np.mean(d["near_zero"]))
    out["share_below_minus_near_zero"] = metric_value(np.mean(d["original_class"] == "compression"))
    out["top_compression_layers"] = top_compression_layers(d["layer"].to_numpy(), delta_rfc, settings.rank_decimals)
    out["n_low_neutral"] = int(d["low_neutral"].sum())
    out["n_heads_significant"] = int((heads["q_value"] < alpha).sum())
    top = heads[heads["top_k"]].sort_values("position")
    out["top_heads"] = {f"rank_{int(p)}": tie_label(head_label(l, h), r, t)
                        for p, l, h, r, t in zip(top["position"], top["layer"], top["head"], top["rank"], top["tied"])}
    return out


def checkpoint_metrics(arrays: FamilyArrays, layers: pd.DataFrame, boot: dict, heads: pd.DataFrame,
                       settings: StatsSettings) -> dict:
    """metrics.json `checkpoints` entry of a single-checkpoint family (headline definition): its profile within
    the one model (mean RFC and RSI over layers with prompt-bootstrap intervals, RFC > 0 and < 0 layers by their
    interval) and its most self-focused heads. No change, no class: there is nothing to compare it with."""
    d = layers.sort_values("layer")
    out = {"variant": arrays.variant, "n_layers": arrays.n_layers, "n_heads": arrays.n_heads,
           "n_prompts": {c: arrays.n_prompts(c) for c in CATEGORIES}}
    out.update(_mean_with_ci(d["rfc"].to_numpy(), boot["rfc"], settings.confidence, "mean_rfc"))
    out.update(_mean_with_ci(d["rsi"].to_numpy(), boot["rsi"], settings.confidence, "mean_rsi"))
    out["n_layers_rfc_above_0"] = int((d["rfc_lo"] > 0).sum())
    out["n_layers_rfc_below_0"] = int((d["rfc_hi"] < 0).sum())
    out["n_low_neutral"] = int(d["low_neutral"].sum())
    out["n_heads_significant"] = int((heads["q_value"] < settings.alpha).sum())
    top = heads[heads["top_k"]].sort_values("position")
    out["top_heads"] = {f"rank_{int(p)}": tie_label(head_label(l, h), r, t)
                        for p, l, h, r, t in zip(top["position"], top["layer"], top["head"], top["rank"], top["tied"])}
    return out


PAIR_KEYS = ("pearson_r", "pearson_p", "pearson_p_shift", "pearson_r_lo", "pearson_r_hi", "spearman_r",
             "spearman_p", "spearman_p_shift", "spearman_r_lo", "spearman_r_hi", "n_points", "grid", "n_layers_a",
             "n_layers_b", "undefined_reason", "parametric_p_reason")


def resampling_draws(families: dict[str, FamilyArrays],
                     settings: StatsSettings) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Bootstrap prompt indices [B, P] and permutation signs [n_perm, P] per prompt set (`design`): they depend
    only on the seed and the prompt set, so every family, definition and stage contrast on it sees the same draws."""
    indices, signs = {}, {}
    for arrays in families.values():
        if arrays.design not in indices:
            indices[arrays.design] = stratified_bootstrap_indices(
                arrays.categories, settings.n_resamples, rng_for(settings.seed, "bootstrap", arrays.design))
            signs[arrays.design] = sign_flips(len(arrays.prompt_ids), settings.n_permutations,
                                              rng_for(settings.seed, "permutation", arrays.design))
    return indices, signs


def self_focus_labels(families: dict[str, FamilyArrays], settings: StatsSettings) -> dict[str, np.ndarray]:
    """Relabellings of self-referent and neutral prompts (self first) per prompt set of a single-checkpoint family,
    from the seed and the prompt set only (`label_permutations`)."""
    out = {}
    for arrays in families.values():
        if arrays.single and arrays.design not in out:
            out[arrays.design] = label_permutations(arrays.n_prompts(SELF), arrays.n_prompts(NEUTRAL),
                                                    settings.n_permutations,
                                                    rng_for(settings.seed, "self-focus", arrays.design))
    return out


def build_statistics(entropy: pd.DataFrame, settings: StatsSettings,
                     stages: dict[str, tuple[str, ...]] | None = None) -> dict:
    """All statistics of the study from the entropy table.

    `stages` names the families of a single checkpoint (family -> (variant,)); the others must have a base and an
    instruct checkpoint. A single checkpoint goes through the same layer statistics (its `layers` rows) with every
    comparison left out: no deltas, no cross-family row, no head change; instead its most self-focused heads
    (`self_focus_heads`, analysis.statistics.heads.self_focus_heads) and metrics["checkpoints"] (`checkpoint_metrics`).

    Returns {"layers", "deltas", "cross_family", "heads": DataFrames with a `definition` column, one
    block per definition in settings.definitions; "metrics": the headline definition's numbers,
    {"families": {family: {...}}, "pairs": {"famA~famB": {...}}}, JSON-ready, None where undefined;
    "summaries": {definition: {family: {...}}}, the same family numbers for every definition}.

    layers (per definition, family, variant, layer): n_layers, depth = (layer+0.5)/n_layers; h_<c>,
      h_<c>_lo, h_<c>_hi for each category c (mean entropy and bootstrap CI over prompts); rfc, rsi,
      diff_self_neutral (H_self - H_neutral), each with _lo/_hi; n_prompts_<c>; low_neutral
      (this variant's H_neutral below neutral_floor).
    deltas (per definition, family, layer): n_layers, depth; delta_rfc, delta_rsi, delta_diff (instruct
      - base of RFC, RSI and H_self - H_neutral), each with paired-bootstrap _lo/_hi; rfc_base,
      rfc_instruct, h_neutral_base, h_neutral_instruct; p_value (paired permutation test of ΔRFC = 0),
      q_value (BH over the family's layers), layer_class (compression / gain / no_change by
      q < alpha and the sign of ΔRFC); p_value_diff, q_value_diff (the same test for delta_diff);
      near_zero (|ΔRFC| <= near_zero); original_class (the ORIGINAL STUDY'S RULE, no test: compression
      if ΔRFC < -near_zero, gain if > near_zero, else near_zero); head_mean_delta_rfc,
      head_t_lo, head_t_hi (the original study's t-interval across heads: not valid inference, for
      comparison only); low_neutral (H_neutral of base or instruct below neutral_floor).
    cross_family: see analysis.statistics.correlation.cross_family_table, plus definition.
    heads: see analysis.statistics.heads.head_scores, plus definition and family.
    """
    definitions = settings.definitions
    singles = {f: tuple(s) for f, s in (stages or {}).items() if len(s) == 1}
    families = family_arrays(entropy, definitions, singles)
    indices, signs = resampling_draws(families, settings)
    labels = self_focus_labels(families, settings)

    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in ("layers", "deltas", "cross_family", "heads",
                                                             "self_focus_heads")}
    metrics: dict = {"families": {}, "pairs": {}, "checkpoints": {}}
    summaries: dict[str, dict] = {d: {} for d in definitions}
    for definition in definitions:
        profiles, resamples = {}, {}
        for family, arrays in families.items():
            if arrays.single:
                values = arrays.only[definition]
                layers, _, boot = checkpoint_layers(arrays, arrays.variant, definition, values.mean(axis=2),
                                                    indices[arrays.design], settings)
                order = np.concatenate([np.flatnonzero(arrays.categories == SELF),
                                        np.flatnonzero(arrays.categories == NEUTRAL)])
                heads = self_focus_heads(values[order], arrays.categories[order], labels[arrays.design],
                                         top_k=settings.top_k_heads, decimals=settings.rank_decimals,
                                         floor=settings.noise_floor["delta_diff"])
                heads.insert(0, "variant", arrays.variant)
                heads.insert(0, "family", family)
                heads.insert(0, "definition", definition)
                tables["layers"].append(layers)
                tables["self_focus_heads"].append(heads)
                if definition == settings.headline_definition:
                    metrics["checkpoints"][family] = checkpoint_metrics(arrays, layers, boot, heads, settings)
                continue
            layers, deltas, boot_rfc, boot_diff = family_layer_statistics(
                arrays, definition, indices[arrays.design], signs[arrays.design], settings)
            heads = head_scores(arrays.base[definition], arrays.instruct[definition], arrays.categories,
                                signs[arrays.design], top_k=settings.top_k_heads,
                                decimals=settings.rank_decimals, floor=settings.noise_floor["delta_diff"])
            heads.insert(0, "family", family)
            heads.insert(0, "definition", definition)
            tables["layers"].append(layers)
            tables["deltas"].append(deltas)
            tables["heads"].append(heads)
            profiles[family], resamples[family] = deltas["delta_rfc"].to_numpy(), boot_rfc
            summaries[definition][family] = family_metrics(arrays, deltas, boot_rfc, boot_diff, heads, settings)
        joint = {(a, b): families[a].design == families[b].design for a in families for b in families}
        cross = cross_family_table(profiles, depth_grid=settings.depth_grid,
                                   confidence=settings.confidence, resamples=resamples, joint=joint,
                                   floor=settings.noise_floor["delta_rfc"])
        cross.insert(0, "definition", definition)
        tables["cross_family"].append(cross)
        if definition == settings.headline_definition:
            for row in cross.to_dict("records"):
                metrics["pairs"][f"{row['family_a']}~{row['family_b']}"] = {k: metric_value(row[k]) for k in PAIR_KEYS}
    metrics["families"] = summaries[settings.headline_definition]
    empty = {"self_focus_heads": ["definition", "family", "variant", *SELF_FOCUS_COLUMNS],
             "deltas": DELTA_COLUMNS, "heads": ["definition", "family", *HEAD_COLUMNS]}
    out = {k: pd.concat(v, ignore_index=True) if v else pd.DataFrame(columns=empty.get(k, []))
           for k, v in tables.items()}
    out["metrics"] = metrics
    out["summaries"] = summaries
    return out
