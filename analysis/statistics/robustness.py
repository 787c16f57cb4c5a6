"""Does a conclusion survive the analysis choices? Length-controlled change and split-half reliability.

- Length control: per layer, a mixed model of prompt entropy on category x variant with the prompt's
  token count (and its interaction with variant) as covariates and a random intercept per prompt.
  The self_referent x instruct interaction is the length-adjusted change of H_self - H_neutral.
- Split-half: the prompts of each category are split at random into halves many times; the ΔRFC
  profile of one half is correlated with the other's. The mean correlation, stepped up to the full
  prompt set with Spearman-Brown, says how much of a profile is signal rather than prompt sampling.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

from analysis.core.quantities import NEUTRAL, SELF, rfc
from analysis.statistics.resampling import fdr_bh, rng_for, rowwise_pearson

FORMULA = (f"entropy ~ C(category, Treatment('{NEUTRAL}')) * C(variant, Treatment('base'))"
           " + n_tokens * C(variant, Treatment('base'))")
INTERACTION = f"C(category, Treatment('{NEUTRAL}'))[T.{SELF}]:C(variant, Treatment('base'))[T.instruct]"


def prompt_layer_entropy(entropy: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean over heads: one row per (family, variant, prompt, layer) with category and token count."""
    keys = ["family", "variant", "prompt_id", "category", "n_tokens", "layer"]
    return (entropy.groupby(keys, observed=True)[column].mean().rename("entropy").reset_index())


# Why a layer's length-controlled test is undefined (stored in `reason`; the report prints "undefined (<reason>)").
NO_CHANGE_TO_MODEL = "instruct equals base on every prompt (0/0: nothing to estimate)"


def _interaction(frame: pd.DataFrame) -> tuple[float, float, float]:
    """Length-adjusted self x instruct interaction (estimate, standard error, p) for one layer; all NaN where
    instruct equals base on every prompt (the interaction and its standard error would both be 0: 0/0)."""
    wide = frame.pivot_table(index="prompt_id", columns="variant", values="entropy")
    if np.allclose(wide["instruct"], wide["base"], rtol=0, atol=1e-12):
        return np.nan, np.nan, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm(FORMULA, frame, groups=frame["prompt_id"]).fit(reml=True)
    return float(fit.params[INTERACTION]), float(fit.bse[INTERACTION]), float(fit.pvalues[INTERACTION])


LENGTH_COLUMNS = ["family", "layer", "interaction", "interaction_se", "p_value", "adjusted_delta_rfc", "reason",
                  "q_value", "adjusted_class", "delta_rfc", "layer_class", "disagrees"]
SPLIT_COLUMNS = ["family", "n_layers", "n_splits", "n_splits_defined", "reason", "split_half_r", "split_half_r_sd",
                 "spearman_brown"]


def length_control(entropy: pd.DataFrame, column: str, deltas: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per family and layer: the length-adjusted change beside ΔRFC, and whether their conclusions differ.

    `deltas` holds the family's `layer`, `delta_rfc`, `layer_class` for the same definition and format.
    A positive interaction means self_referent entropy rose relative to neutral: compression on the
    RFC scale. `adjusted_delta_rfc` divides minus the interaction by the base H_neutral of the layer.
    """
    data = prompt_layer_entropy(entropy[entropy["category"].isin([SELF, NEUTRAL])], column)
    if data.empty:  # no family with base and instruct (a suite of single checkpoints)
        return pd.DataFrame(columns=LENGTH_COLUMNS)
    rows = []
    for (family, layer), frame in data.groupby(["family", "layer"], sort=True):
        estimate, se, p = _interaction(frame)
        h_neutral = frame.loc[(frame["variant"] == "base") & (frame["category"] == NEUTRAL), "entropy"].mean()
        rows.append({"family": family, "layer": int(layer), "interaction": estimate, "interaction_se": se,
                     "p_value": p, "adjusted_delta_rfc": -estimate / h_neutral if h_neutral > 0 else np.nan,
                     "reason": NO_CHANGE_TO_MODEL if np.isnan(p) else None})
    out = pd.DataFrame(rows)
    out["reason"] = pd.Series([row["reason"] for row in rows], dtype=object)  # text or None, for any family set
    out["q_value"] = np.nan
    for family, idx in out.groupby("family").groups.items():
        out.loc[idx, "q_value"] = fdr_bh(out.loc[idx, "p_value"].to_numpy())
    significant = out["q_value"] < alpha
    out["adjusted_class"] = np.where(significant & (out["interaction"] > 0), "compression",
                                     np.where(significant & (out["interaction"] < 0), "gain", "no_change"))
    out = out.merge(deltas[["family", "layer", "delta_rfc", "layer_class"]], on=["family", "layer"], how="left")
    out["disagrees"] = out["adjusted_class"] != out["layer_class"]
    return out


def _profiles(matrix_base: np.ndarray, matrix_instruct: np.ndarray, self_idx: np.ndarray,
              neutral_idx: np.ndarray) -> np.ndarray:
    """ΔRFC profiles for many prompt subsets at once: idx arrays are [splits, n] prompt indices."""
    def profile(m: np.ndarray) -> np.ndarray:
        return rfc(m[self_idx].mean(axis=1), m[neutral_idx].mean(axis=1))
    return profile(matrix_instruct) - profile(matrix_base)


def split_half(entropy: pd.DataFrame, column: str, n_splits: int, seed: int) -> pd.DataFrame:
    """Per family: mean split-half correlation of the ΔRFC profile and its Spearman-Brown step-up.

    Each family draws its splits from its own random stream (seed, family), so adding a family leaves
    the others' numbers unchanged. A split whose half-profile is constant has no correlation: such
    splits are left out, and a family with no usable split has an undefined (NaN) reliability.
    """
    data = prompt_layer_entropy(entropy[entropy["category"].isin([SELF, NEUTRAL])], column)
    if data.empty:  # no family with base and instruct
        return pd.DataFrame(columns=SPLIT_COLUMNS)
    rows = []
    for family, frame in data.groupby("family", sort=True):
        rng = rng_for(seed, "split_half", str(family))
        wide = frame.pivot_table(index=["variant", "prompt_id", "category"], columns="layer", values="entropy")
        base, instruct = wide.loc["base"], wide.loc["instruct"].reindex(wide.loc["base"].index)
        categories = base.index.get_level_values("category")
        self_pos = np.flatnonzero(categories == SELF)
        neutral_pos = np.flatnonzero(categories == NEUTRAL)

        def halves(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            perm = rng.permuted(np.tile(pos, (n_splits, 1)), axis=1)
            half = len(pos) // 2
            return perm[:, :half], perm[:, half: 2 * half]

        s_a, s_b = halves(self_pos)
        n_a, n_b = halves(neutral_pos)
        b, i = base.to_numpy(), instruct.to_numpy()
        r = rowwise_pearson(_profiles(b, i, s_a, n_a), _profiles(b, i, s_b, n_b))
        r = r[np.isfinite(r)]
        mean_r = float(r.mean()) if r.size else np.nan
        rows.append({"family": family, "n_layers": b.shape[1], "n_splits": n_splits, "n_splits_defined": int(r.size),
                     "reason": None if r.size else "every half-profile is constant (no ΔRFC to correlate)",
                     "split_half_r": mean_r, "split_half_r_sd": float(r.std(ddof=1)) if r.size > 1 else np.nan,
                     "spearman_brown": 2 * mean_r / (1 + mean_r) if mean_r > -1 else np.nan})
    out = pd.DataFrame(rows)
    out["reason"] = pd.Series([row["reason"] for row in rows], dtype=object)  # text or None, for any family set
    return out


SUMMARY_COLUMNS = ["family", "definition", "format", "mean_delta_rfc", "mean_delta_rfc_lo", "mean_delta_rfc_hi",
                   "share_compression", "share_gain", "conclusion"]


def conclusion(lo: float | None, hi: float | None) -> str:
    """The family-level reading of a mean ΔRFC interval: compression (all below 0), gain (all
    above 0) or no_change (the interval contains 0, or is undefined)."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "no_change"
    return "compression" if hi < 0 else "gain" if lo > 0 else "no_change"


def family_summaries(result: dict, prompt_format: str) -> pd.DataFrame:
    """One row per (family, definition) of one prompt format, from build_statistics' `summaries`."""
    rows = []
    for definition, families in result["summaries"].items():
        for family, m in families.items():
            rows.append({"family": family, "definition": definition, "format": prompt_format,
                         "mean_delta_rfc": m["mean_delta_rfc"], "mean_delta_rfc_lo": m["mean_delta_rfc_lo"],
                         "mean_delta_rfc_hi": m["mean_delta_rfc_hi"], "share_compression": m["share_compression"],
                         "share_gain": m["share_gain"],
                         "conclusion": conclusion(m["mean_delta_rfc_lo"], m["mean_delta_rfc_hi"])})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def robustness_table(summaries: pd.DataFrame, definition: str, prompt_format: str) -> pd.DataFrame:
    """Every (family, definition, format) conclusion beside the headline's.

    Adds `headline` (this row is the headline choice) and `differs` (its conclusion is not the
    family's headline conclusion). Raises ValueError when a family lacks the headline row.
    """
    table = summaries.copy()
    table["headline"] = (table["definition"] == definition) & (table["format"] == prompt_format)
    reference = table[table["headline"]].set_index("family")["conclusion"]
    missing = sorted(set(table["family"]) - set(reference.index))
    if missing:
        raise ValueError(f"no headline row ({definition}, {prompt_format}) for families {missing}")
    table["differs"] = table["conclusion"] != table["family"].map(reference)
    return table.sort_values(["family", "format", "definition"], ignore_index=True)


def metrics_entries(table: pd.DataFrame, split: pd.DataFrame, length: pd.DataFrame) -> dict:
    """metrics.json `robustness` block per family: how many choices change the conclusion, split-half
    reliability, and how many layers the length control classifies differently."""
    out = {}
    reliability = split.set_index("family")
    disagreements = length.groupby("family")["disagrees"].sum()
    for family, rows in table.groupby("family", sort=True):
        out[family] = {"n_choices": int(len(rows)), "n_choices_differing": int(rows["differs"].sum()),
                       "split_half_r": float(reliability.loc[family, "split_half_r"]),
                       "spearman_brown": float(reliability.loc[family, "spearman_brown"]),
                       "n_layers_length_disagrees": int(disagreements.get(family, 0))}
    return out
