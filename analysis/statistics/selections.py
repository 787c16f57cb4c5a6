"""What the report shows, selected from the study's tables: which families name candidate heads, the
top-ranked heads of those families, the layers where the length-adjusted conclusion differs, and the
family pairs whose profiles can be correlated.

Pure functions of the stats tables and the stats settings, called once by the stats stage
(`study.build_study`) and written to data/stats/; the report formats these tables and decides nothing.
"""

from __future__ import annotations

import pandas as pd

from analysis.core.config import StatsSettings
from analysis.core.quantities import CATEGORIES
from analysis.core.ranking import first_by

HEAD_FAMILY_COLUMNS = ["family", "n_heads", "n_heads_significant", "min_q_value", "names_candidates"]
CANDIDATE_COLUMNS = ["family", "rank", "tied", "layer", "head", "did", "did_log_ratio", "consistency", "base_entropy",
                     "score", "q_value"]
DISAGREEMENT_COLUMNS = ["family", "layer", "delta_rfc", "layer_class", "adjusted_delta_rfc", "adjusted_class"]
PAIR_COLUMNS = ["family_a", "family_b", "n_layers_a", "n_layers_b", "n_points", "grid", "defined", "undefined_reason"]
PEAK_COLUMNS = ["family", "language", "layer", "delta_rfc_en", "delta_rfc_language", "contrast", "contrast_lo",
                "contrast_hi", "q_value", "n_layers_significant", "n_layers"]


def head_families(heads: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """One row per family: its heads, how many change at q < alpha, the smallest q, and whether it names
    candidates (at least one head at q < alpha). `heads` holds one definition and format."""
    grouped = heads.groupby("family", sort=False)
    out = pd.DataFrame({
        "n_heads": grouped.size(),
        "n_heads_significant": grouped["q_value"].apply(lambda q: int((q < alpha).sum())),
        "min_q_value": grouped["q_value"].min(),
    }).reset_index()
    out["names_candidates"] = out["n_heads_significant"] > 0
    return out[HEAD_FAMILY_COLUMNS]


def candidate_heads(heads: pd.DataFrame, alpha: float, top_k: int) -> pd.DataFrame:
    """The `top_k` highest-ranked heads of every family that names candidates (`head_families`), by family
    in table order and rank. A family with no head at q < alpha has only rankings driven by base entropy,
    so it contributes no row."""
    families = head_families(heads, alpha)
    named = families.loc[families["names_candidates"], "family"]
    order = {family: i for i, family in enumerate(named)}
    top = heads[heads["family"].isin(order) & (heads["position"] <= int(top_k))]
    top = top.assign(_order=top["family"].map(order)).sort_values(["_order", "position"])
    return top[CANDIDATE_COLUMNS].reset_index(drop=True)


def length_disagreements(length_control: pd.DataFrame) -> pd.DataFrame:
    """The layers whose length-adjusted class differs from the ΔRFC class (`disagrees`)."""
    rows = length_control[length_control["disagrees"].astype(bool)]
    return rows[DISAGREEMENT_COLUMNS].sort_values(["family", "layer"]).reset_index(drop=True)


def correlation_pairs(cross_family: pd.DataFrame) -> pd.DataFrame:
    """Every pair of families of one definition and format, `defined` where a Pearson r exists (a profile without
    signal, or a constant one, has no shape to correlate: `undefined_reason` says which), with each family's
    number of real layers."""
    out = cross_family[["family_a", "family_b", "n_layers_a", "n_layers_b", "n_points", "grid",
                        "undefined_reason"]].copy()
    out["defined"] = cross_family["pearson_r"].notna().to_numpy()
    return out[PAIR_COLUMNS].reset_index(drop=True)


def language_contrast_peaks(contrasts: pd.DataFrame, decimals: int) -> pd.DataFrame:
    """Per family and translation language (one definition and format), the layer with the largest |ΔRFC_L −
    ΔRFC_en| at `decimals` precision (the lower layer where tied) with its interval and q, and how many of the family's layers differ from English at q < alpha."""
    if not len(contrasts):
        return pd.DataFrame(columns=PEAK_COLUMNS)
    rows = []
    for _, part in contrasts.groupby(["family", "language"], sort=False):
        peak = first_by(part, "contrast", decimals, absolute=True)
        rows.append({**{c: peak[c] for c in PEAK_COLUMNS[:-2]}, "n_layers_significant": int(part["significant"].sum()),
                     "n_layers": int(len(part))})
    return pd.DataFrame(rows, columns=PEAK_COLUMNS).reset_index(drop=True)


def language_token_counts(token_lengths: pd.DataFrame) -> pd.DataFrame:
    """Mean tokens per prompt by family (its tokenizer), language and category, one row per family and
    language (one prompt format): how differently the languages tokenise (docs/method.md, "Languages")."""
    wide = token_lengths.pivot_table(index=["family", "language"], columns="category", values="mean",
                                     observed=True, sort=False)
    wide.columns = [str(c) for c in wide.columns]
    return wide[[c for c in CATEGORIES if c in wide.columns]].reset_index()


def build(heads: pd.DataFrame, length_control: pd.DataFrame, cross_family: pd.DataFrame,
          settings: StatsSettings) -> dict[str, pd.DataFrame]:
    """Every report table, from the headline definition's and format's heads, length control and
    cross-family rows, with `stats.alpha` and `stats.top_k_heads`."""
    return {
        "head_families": head_families(heads, settings.alpha),
        "candidate_heads": candidate_heads(heads, settings.alpha, settings.top_k_heads),
        "length_disagreements": length_disagreements(length_control),
        "correlation_pairs": correlation_pairs(cross_family),
    }
