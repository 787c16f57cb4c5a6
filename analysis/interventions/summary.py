"""A family's patching results from its per-prompt effects: the candidate and control heads, the per-head table
and the metrics summary. The patch stage writes them and `selfref verify` recomputes them from the same inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.quantities import choice_rows, head_label
from analysis.interventions.patching import INTERVENTIONS, METRICS, select_controls, summarise
from analysis.statistics.layers import metric_value

HEADS_COLUMNS = ("family", "definition", "format", "layer", "head", "base_entropy", "position")
SUMMARY_FIELDS = ("effect_self", "effect_self_lo", "effect_self_hi", "no_effect", "specificity", "n_controls",
                  "control_percentile", "rank_p", "rank_p_min", "p_value", "q_value", "test_reason",
                  "delta_rfc_later", "delta_rfc_later_lo", "delta_rfc_later_hi")


def _field(value):
    """A summary value for JSON: a reason stays text, a flag a bool, a number goes through metric_value."""
    if isinstance(value, (str, bool, np.bool_)) or value is None:
        return value if not isinstance(value, np.bool_) else bool(value)
    return metric_value(value)


def summary_json(family: str, table, selection, definition: str, prompt_format: str, alpha: float) -> dict:
    """The family's headline patching numbers, keyed intervention -> metric -> candidate head."""
    out = {"family": family, "definition": definition, "format": prompt_format,
           "n_candidates": int((selection["role"] == "candidate").sum()),
           "n_controls": int(selection.loc[selection["role"] == "control", ["layer", "head"]].drop_duplicates().shape[0]),
           "interventions": {}}
    cands = table[table["role"] == "candidate"]
    for iv in [iv for iv in INTERVENTIONS if iv.name in set(table["intervention"])]:
        entry = {}
        for metric in METRICS:
            rows = cands[(cands["intervention"] == iv.name) & (cands["metric"] == metric)]
            entry[metric] = {
                "n_tested": int(rows["p_value"].notna().sum()),
                "n_no_effect": int(rows["no_effect"].sum()),
                "n_significant": int((rows["q_value"] < alpha).sum()),
                "heads": {head_label(r.layer, r.head): {f: _field(getattr(r, f)) for f in SUMMARY_FIELDS}
                          for r in rows.itertuples()},
            }
        out["interventions"][iv.name] = entry
    return out


def heads_table(config: Config, family: str) -> str:
    """The stats table whose ranking names a family's candidate heads: `heads` (the change base -> instruct) for a
    family with both, `self_focus_heads` (self vs neutral within the model) for a family of a single checkpoint."""
    return "self_focus_heads" if len(config.stages[family]) == 1 else "heads"


def selection_for(config: Config, family: str, heads: pd.DataFrame) -> pd.DataFrame:
    """The family's candidate heads and their controls (the other heads of each candidate's layer), from the stats
    stage's heads table (a family of a single checkpoint: its self_focus_heads table, its most self-focused heads)."""
    stats = config.stats
    heads = choice_rows(heads, stats.headline_definition, stats.headline_format)
    heads = heads[heads["family"] == family]
    if heads.empty:
        raise UserError(f"{config.paths.relative(config.paths.stats_table('heads'))}: no heads of {family}; "
                        "run `selfref stats`")
    return select_controls(heads, config.patch.top_k, config.patch.max_controls, stats.seed, family)


def summaries(config: Config, family: str, per_prompt: pd.DataFrame, selection: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The per-head table and the metrics summary from the per-prompt effects (what `selfref verify` recomputes)."""
    stats, settings = config.stats, config.patch
    table = summarise(per_prompt, selection, seed=stats.seed, n_resamples=settings.n_resamples,
                      confidence=stats.confidence, noise_floor=settings.noise_floor)
    table = table.assign(definition=stats.headline_definition, format=stats.headline_format)
    summary = summary_json(family, table, selection, stats.headline_definition, stats.headline_format, stats.alpha)
    return table, summary
