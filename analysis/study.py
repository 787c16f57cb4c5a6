"""Everything the stats stage writes, from the entropy tables of each prompt format: `build_study`.

Layer, delta, cross-family and head tables for every entropy definition and prompt format, token
lengths, the robustness checks on the headline choice, and metrics.json.
"""

from __future__ import annotations

import pandas as pd

from analysis import report_tables, robustness
from analysis.mass_statistics import mass_changes
from analysis.config import StatsSettings
from analysis.errors import UserError
from analysis.layer_statistics import build_statistics, metric_value
from analysis.quantities import CATEGORIES, ENTROPY_COLUMNS, choice_rows


def token_length_table(entropy: pd.DataFrame) -> pd.DataFrame:
    """Per family and category: count, mean, sd, min and max of the tokens fed per prompt."""
    per_prompt = entropy[entropy["variant"] == "base"].drop_duplicates(["family", "prompt_id"])
    out = per_prompt.groupby(["family", "category"])["n_tokens"].agg(["count", "mean", "std", "min", "max"])
    return out.reset_index()


def build_study(entropy_by_format: dict[str, pd.DataFrame], settings: StatsSettings) -> dict:
    """Everything the stats stage writes, from the entropy tables of each prompt format (raw, chat).

    The tables of `build_statistics` for every format with a `format` column; token_lengths; the
    robustness table of every (definition, format) conclusion; length control and split-half
    reliability on the headline definition and format; the headline ΔRFC for `dvc plots`; the report's
    selections (analysis.report_tables); and metrics.
    """
    definition, headline_format = settings.headline_definition, settings.headline_format
    if headline_format not in entropy_by_format:
        raise UserError(f"stats.headline_format {headline_format!r}: use one of {', '.join(entropy_by_format)}")
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in ("layers", "deltas", "cross_family", "heads",
                                                               "attention_mass")}
    summaries, lengths = [], []
    for prompt_format, entropy in entropy_by_format.items():
        result = build_statistics(entropy, settings)
        result["attention_mass"] = mass_changes(entropy, n_resamples=settings.n_resamples,
                                                confidence=settings.confidence, seed=settings.seed)
        for key in tables:
            tables[key].append(result[key].assign(format=prompt_format))
        summaries.append(robustness.family_summaries(result, prompt_format))
        lengths.append(token_length_table(entropy).assign(format=prompt_format))
        if prompt_format == headline_format:
            metrics = result["metrics"]
    out: dict = {key: pd.concat(frames, ignore_index=True) for key, frames in tables.items()}
    headline = choice_rows(out["deltas"], definition, headline_format)
    entropy, column = entropy_by_format[headline_format], ENTROPY_COLUMNS[definition]
    out["length_control"] = robustness.length_control(entropy, column, headline, settings.alpha)
    out["split_half"] = robustness.split_half(entropy, column, settings.split_half_splits,
                                              settings.seed)
    out["robustness"] = robustness.robustness_table(pd.concat(summaries, ignore_index=True), definition,
                                                    headline_format)
    entries = robustness.metrics_entries(out["robustness"], out["split_half"], out["length_control"])
    metrics["robustness"] = {f: {k: metric_value(v) for k, v in e.items()} for f, e in entries.items()}
    token_lengths = pd.concat(lengths, ignore_index=True)
    token_lengths["category"] = pd.Categorical(token_lengths["category"], categories=list(CATEGORIES))
    out["token_lengths"] = token_lengths.sort_values(["format", "family", "category"], ignore_index=True)
    out["delta_rfc_plot"] = headline[["family", "layer", "depth", "delta_rfc", "delta_rfc_lo", "delta_rfc_hi",
                                      "layer_class"]]
    out.update(report_tables.build(choice_rows(out["heads"], definition, headline_format), out["length_control"],
                                   choice_rows(out["cross_family"], definition, headline_format), settings))
    out["metrics"] = metrics
    return out
