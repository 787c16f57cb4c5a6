"""Does the language of the question matter? Per family and layer, the contrast ΔRFC_L − ΔRFC_en of a
translation language L against English, on translation-matched prompts (docs/method.md, "Languages").

The unit of replication is the English source prompt with its translation: the bootstrap resamples source
prompts within category and applies the same draw to both languages and both checkpoints; the permutation
test swaps the two languages of a source prompt (base and instruct together), the null being that the
language does not change ΔRFC. Benjamini–Hochberg across the family's layers. Contrasts between languages
should be read on the length-normalised definition too: languages tokenise to very different lengths.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.core.config import StatsSettings
from analysis.statistics.layers import metric_value
from analysis.core.quantities import (CATEGORIES, ENTROPY_COLUMNS, LANGUAGES, NEUTRAL, SELF, SOURCE_LANGUAGE, VARIANTS,
                                 relative_depth, rfc)
from analysis.statistics.resampling import (bootstrap_group_means, fdr_bh, paired_permutation_test, percentile_ci, rng_for,
                                 sign_flips, stratified_bootstrap_indices)

CONTRAST_COLUMNS = ["definition", "family", "quantity", "language", "layer", "n_layers", "depth", "n_prompts",
                    "delta_rfc_en", "delta_rfc_language", "contrast", "contrast_lo", "contrast_hi",
                    "contrast_diff", "contrast_diff_lo", "contrast_diff_hi", "p_value", "q_value", "significant"]


def _changes(means: dict) -> np.ndarray:
    """[k, 2, L]: ΔRFC and Δ(H_self − H_neutral), instruct − base, from category means [k, variant, L]; for a family
    of a single checkpoint (one variant) RFC and H_self − H_neutral themselves."""
    self_, neutral = means[SELF], means[NEUTRAL]
    if self_.shape[1] == 1:
        return np.stack([rfc(self_[:, 0], neutral[:, 0]), self_[:, 0] - neutral[:, 0]], axis=1)
    delta_rfc = rfc(self_[:, 1], neutral[:, 1]) - rfc(self_[:, 0], neutral[:, 0])
    delta_diff = (self_[:, 1] - neutral[:, 1]) - (self_[:, 0] - neutral[:, 0])
    return np.stack([delta_rfc, delta_diff], axis=1)


def language_change(english: dict, other: dict) -> np.ndarray:
    """The contrast statistic [k, 2, L]: (ΔRFC, Δdiff) of the translation minus those of English."""
    return _changes(other) - _changes(english)


def _prompt_layers(rows: pd.DataFrame, column: str, order: pd.Index, variants: tuple[str, ...] = VARIANTS) -> np.ndarray:
    """[P, V, L]: per source prompt (in `order`), each variant (base and instruct, or the single checkpoint), the
    layer entropy (mean over query heads)."""
    per = rows.groupby(["variant", "source_id", "layer"])[column].mean()
    out = [per.loc[variant].unstack("layer").reindex(order).to_numpy() for variant in variants]
    return np.stack(out, axis=1)


def language_contrasts(entropy: pd.DataFrame, settings: StatsSettings,
                       stages: dict[str, tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Rows of CONTRAST_COLUMNS for every definition, family, translation language and layer (empty without
    translations). Only source prompts present in both languages are used. A family of a single checkpoint
    (`stages`: family -> (variant,)) is contrasted on RFC itself, RFC_L − RFC_en within the one model (`quantity`
    rfc; the columns delta_rfc_en and delta_rfc_language then hold RFC), with the same resampling and test."""
    if "language" not in entropy or not (entropy["language"] != SOURCE_LANGUAGE).any():
        return pd.DataFrame(columns=CONTRAST_COLUMNS)
    frames = []
    for family, rows in entropy.groupby("family", sort=True):
        variants = tuple((stages or {}).get(str(family), VARIANTS))
        variants = variants if len(variants) == 1 else VARIANTS
        quantity = "rfc" if len(variants) == 1 else "delta_rfc"
        english = rows[rows["language"] == SOURCE_LANGUAGE]
        for language in [x for x in LANGUAGES if x != SOURCE_LANGUAGE and (rows["language"] == x).any()]:
            other = rows[rows["language"] == language]
            prompts = (english.drop_duplicates("source_id").set_index("source_id")["category"])
            prompts = prompts[prompts.index.isin(set(other["source_id"]))]
            prompts = prompts.iloc[np.lexsort((prompts.index.to_numpy(),
                                               prompts.map(CATEGORIES.index).to_numpy()))]
            categories = prompts.to_numpy()
            design = "\x1f".join(prompts.index)
            indices = stratified_bootstrap_indices(categories, settings.n_resamples,
                                                   rng_for(settings.seed, "language-bootstrap", language, design))
            signs = sign_flips(len(prompts), settings.n_permutations,
                               rng_for(settings.seed, "language-permutation", language, design))
            for definition in settings.definitions:
                column = ENTROPY_COLUMNS[definition]
                a = _prompt_layers(english, column, prompts.index, variants)
                b = _prompt_layers(other, column, prompts.index, variants)
                observed, p = paired_permutation_test(a, b, categories, language_change, signs)
                boot = language_change(bootstrap_group_means(a, categories, indices),
                                       bootstrap_group_means(b, categories, indices))
                changes_en = _changes({c: m[None] for c, m in _means(a, categories).items()})[0]
                changes_l = _changes({c: m[None] for c, m in _means(b, categories).items()})[0]
                n_layers = a.shape[2]
                frame = {"definition": definition, "family": family, "quantity": quantity, "language": language,
                         "layer": np.arange(n_layers), "n_layers": n_layers, "depth": relative_depth(n_layers),
                         "n_prompts": len(prompts), "delta_rfc_en": changes_en[0], "delta_rfc_language": changes_l[0],
                         "contrast": observed[0], "contrast_diff": observed[1]}
                frame["contrast_lo"], frame["contrast_hi"] = percentile_ci(boot[:, 0], settings.confidence)
                frame["contrast_diff_lo"], frame["contrast_diff_hi"] = percentile_ci(boot[:, 1], settings.confidence)
                frame["p_value"], frame["q_value"] = p[0], fdr_bh(p[0])
                frame["significant"] = frame["q_value"] < settings.alpha
                frames.append(pd.DataFrame(frame)[CONTRAST_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def _means(values: np.ndarray, categories: np.ndarray) -> dict:
    return {c: values[categories == c].mean(axis=0) for c in dict.fromkeys(categories)}


def language_summary(deltas: pd.DataFrame, contrasts: pd.DataFrame) -> pd.DataFrame:
    """Family × language: mean ΔRFC over layers, shares of compressing and gaining layers (deltas.parquet of
    that language), and how many layers differ significantly from English (language_contrasts.parquet)."""
    keys = ["definition", "format", "family", "language"]
    out = deltas.groupby(keys).agg(mean_delta_rfc=("delta_rfc", "mean"),
                                   share_compression=("layer_class", lambda s: float((s == "compression").mean())),
                                   share_gain=("layer_class", lambda s: float((s == "gain").mean())),
                                   n_layers=("layer", "size")).reset_index()
    if len(contrasts):
        sig = contrasts.groupby(keys)["significant"].sum().rename("n_layers_differ_from_en").reset_index()
        out = out.merge(sig, on=keys, how="left")
    else:
        out["n_layers_differ_from_en"] = np.nan
    out["n_layers_differ_from_en"] = out["n_layers_differ_from_en"].fillna(0).astype(int)
    out.loc[out["language"] == SOURCE_LANGUAGE, "n_layers_differ_from_en"] = 0
    return out


def contrast_metrics(contrasts: pd.DataFrame) -> dict:
    """metrics.json `language_contrasts`: per family and translation language (headline definition and format)."""
    out: dict = {}
    for (family, language), rows in contrasts.groupby(["family", "language"], sort=True):
        out.setdefault(family, {})[language] = {
            "mean_contrast": metric_value(rows["contrast"].mean()),
            "n_layers_significant": int(rows["significant"].sum()),
            "n_layers": int(len(rows))}
    return out
