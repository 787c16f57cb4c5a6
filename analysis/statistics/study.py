"""Everything the stats stage writes, from the entropy tables of each prompt format: `build_study`.

Layer, delta, cross-family and head tables for every entropy definition and prompt format, token
lengths, the robustness checks on the headline choice, and metrics.json.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.statistics import languages as language_statistics
from analysis.statistics import selections
from analysis.statistics import robustness
from analysis.statistics import training_stages as stage_statistics
from analysis.core.config import StatsSettings, staged_families
from analysis.statistics.mass_summary import mass_changes
from analysis.core.artefacts import read_json, read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.layout import STATS_TABLES, ProjectPaths
from analysis.statistics.layers import (FORMAT_CONTRAST_COLUMNS, REQUIRED_COLUMNS, build_statistics, format_contrasts,
                                        metric_value)
from analysis.core.quantities import (CATEGORIES, ENTROPY_COLUMNS, LANGUAGES, MASS_COLUMNS, PROMPT_FORMATS, SOURCE_LANGUAGE,
                                 VARIANTS, choice_rows)

STAGE_TABLES = ("stage_deltas", "stage_shares", "stage_heads")
# Tables computed per prompt language (a `language` column); the others describe the headline language, English.
LANGUAGE_TABLES = ("layers", "deltas", "cross_family", "heads", "token_lengths", "attention_mass", "self_focus_heads",
                   "format_contrasts", *STAGE_TABLES)


def token_length_table(entropy: pd.DataFrame) -> pd.DataFrame:
    """Per family and category: count, mean, sd, min and max of the tokens fed per prompt."""
    per_prompt = entropy[entropy["variant"] == "base"].drop_duplicates(["family", "prompt_id"])
    out = per_prompt.groupby(["family", "category"])["n_tokens"].agg(["count", "mean", "std", "min", "max"])
    return out.reset_index()


def endpoints(entropy: pd.DataFrame) -> pd.DataFrame:
    """The rows of the base and instruct checkpoints: every family's endpoints, what base vs instruct compares."""
    keep = entropy["variant"].isin(VARIANTS)
    return entropy if keep.all() else entropy[keep].reset_index(drop=True)


def languages_of(entropy: pd.DataFrame) -> list[str]:
    """The prompt languages of an entropy table, in LANGUAGES order (a table without `language` is English)."""
    if "language" not in entropy:
        return [SOURCE_LANGUAGE]
    present = set(entropy["language"])
    return [x for x in LANGUAGES if x in present]


def build_study(entropy_by_format: dict[str, pd.DataFrame], settings: StatsSettings,
                stages: dict[str, tuple[str, ...]] | None = None, workers: int = 1,
                scratch: Path | None = None) -> dict:
    """Everything the stats stage writes, per prompt language (docs/method.md, "Languages").

    The English study (`study_of_language`) gives every table and the headline metrics unchanged; each other
    language's layers, deltas, cross_family, heads, token_lengths and stage tables join them with a `language`
    column, its family metrics go to metrics["languages"][language]; language_contrasts holds ΔRFC_L − ΔRFC_en
    per family and layer (analysis.statistics.languages) and language_summary the family × language table.
    With `workers` > 1 the other languages are computed in forked processes (lanes under `scratch`) while this
    one computes English; each hands back its tables and metrics as files, and the result is the same.
    """
    languages = sorted({x for e in entropy_by_format.values() for x in languages_of(e)}, key=LANGUAGES.index)
    if SOURCE_LANGUAGE not in languages:
        raise UserError(f"the entropy tables have no {SOURCE_LANGUAGE} prompts; prompts.languages must include it")

    def part(language: str) -> dict[str, pd.DataFrame]:
        if "language" not in next(iter(entropy_by_format.values())):
            return entropy_by_format
        return {f: e[e["language"] == language].reset_index(drop=True) for f, e in entropy_by_format.items()}

    others = [x for x in languages if x != SOURCE_LANGUAGE]
    if workers > 1 and others and scratch is not None:
        studies = _studies_in_lanes(part, others, settings, stages, workers - 1, scratch)
    else:
        studies = {x: study_of_language(part(x), settings, stages) for x in languages}
    out = studies[SOURCE_LANGUAGE]
    for key in LANGUAGE_TABLES:
        out[key] = pd.concat([studies[x][key].assign(language=x) for x in languages], ignore_index=True)
    out["metrics"]["languages"] = {x: {"families": studies[x]["metrics"]["families"],
                                       "pairs": studies[x]["metrics"]["pairs"],
                                       "checkpoints": studies[x]["metrics"]["checkpoints"]}
                                   for x in languages if x != SOURCE_LANGUAGE}
    contrasts = []
    for prompt_format, entropy in entropy_by_format.items():
        contrasts.append(language_statistics.language_contrasts(endpoints(entropy), settings, stages)
                         .assign(format=prompt_format))
    out["language_contrasts"] = pd.concat(contrasts, ignore_index=True)
    out["language_summary"] = language_statistics.language_summary(out["deltas"], out["language_contrasts"])
    headline = choice_rows(out["language_contrasts"], settings.headline_definition, settings.headline_format,
                           None) if len(out["language_contrasts"]) else out["language_contrasts"]
    # the comparison section's peaks: ΔRFC contrasts of families with base and instruct (a single checkpoint's RFC
    # contrasts are reported in its own section)
    pairs = headline[headline["quantity"] == "delta_rfc"] if len(headline) else headline
    out["language_contrast_peaks"] = selections.language_contrast_peaks(pairs, settings.rank_decimals)
    lengths = out["token_lengths"]
    out["language_token_counts"] = selections.language_token_counts(
        lengths[lengths["format"] == settings.headline_format])
    if len(headline):
        out["metrics"]["language_contrasts"] = language_statistics.contrast_metrics(headline)
    return out


LANGUAGE_METRICS = ("families", "pairs", "checkpoints")  # what build_study keeps of another language's metrics


def _studies_in_lanes(part, others: list[str], settings: StatsSettings, stages: dict[str, tuple[str, ...]] | None,
                      n_lanes: int, scratch: Path) -> dict[str, dict]:
    """Every language's study: the `others` in forked lanes while this process computes English. Each lane writes
    what build_study keeps of its languages (LANGUAGE_TABLES and LANGUAGE_METRICS) as files, read back here."""
    import tempfile

    from analysis.core.lanes import plan_lanes, start_lanes

    def work(keys, folder: Path) -> None:
        for language in keys:
            study = study_of_language(part(language), settings, stages)
            for key in LANGUAGE_TABLES:
                write_parquet(study[key], folder / f"{language}.{key}.parquet")
            write_json({k: study["metrics"][k] for k in LANGUAGE_METRICS}, folder / f"{language}.metrics.json")

    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stats-", dir=scratch) as tmp:
        lanes = plan_lanes({x: 1.0 for x in others}, n_lanes)
        started = start_lanes(lanes, work, Path(tmp))
        try:
            studies = {SOURCE_LANGUAGE: study_of_language(part(SOURCE_LANGUAGE), settings, stages)}
        finally:
            folders = started.join()  # a lane's failure is raised here, after every lane has ended
        for lane, folder in zip(lanes, folders):
            for x in lane:
                studies[x] = {key: read_parquet(folder / f"{x}.{key}.parquet") for key in LANGUAGE_TABLES}
                studies[x]["metrics"] = read_json(folder / f"{x}.metrics.json")
    return studies


def study_of_language(entropy_by_format: dict[str, pd.DataFrame], settings: StatsSettings,
                      stages: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Everything the stats stage writes for one prompt language, from the entropy tables of each prompt format.

    The tables of `build_statistics` for every format with a `format` column, computed on each family's
    endpoints (base and instruct); token_lengths; the robustness table of every (definition, format)
    conclusion; length control and split-half reliability on the headline definition and format; the
    headline ΔRFC for `dvc plots`; the stage tables of families with more than two training stages
    (`stages`: family -> stages in order; analysis.statistics.training_stages); and metrics; the report's
    selections (analysis.statistics.selections).
    """
    stages = stages or {}
    full_by_format = entropy_by_format
    entropy_by_format = {f: endpoints(e) for f, e in full_by_format.items()}
    definition, headline_format = settings.headline_definition, settings.headline_format
    if headline_format not in entropy_by_format:
        raise UserError(f"stats.headline_format {headline_format!r}: use one of {', '.join(entropy_by_format)}")
    tables: dict[str, list[pd.DataFrame]] = {k: [] for k in ("layers", "deltas", "cross_family", "heads",
                                                                "self_focus_heads", "attention_mass", *STAGE_TABLES)}
    summaries, lengths = [], []
    for prompt_format, entropy in entropy_by_format.items():
        result = build_statistics(entropy, settings, stages)
        result.update(stage_statistics.stage_statistics(full_by_format[prompt_format], stages, result["heads"],
                                                        settings, prompt_format))
        result["attention_mass"] = mass_changes(entropy, n_resamples=settings.n_resamples,
                                                confidence=settings.confidence, seed=settings.seed)
        for key in tables:
            tables[key].append(result[key].assign(format=prompt_format))
        summaries.append(robustness.family_summaries(result, prompt_format))
        lengths.append(token_length_table(entropy).assign(format=prompt_format))
        if prompt_format == headline_format:
            metrics = result["metrics"]
    out: dict = {key: pd.concat(frames, ignore_index=True) for key, frames in tables.items()}
    out["format_contrasts"] = (format_contrasts(entropy_by_format["raw"], entropy_by_format["chat"], settings)
                               if {"raw", "chat"} <= set(entropy_by_format) else
                               pd.DataFrame(columns=FORMAT_CONTRAST_COLUMNS))
    headline = choice_rows(out["deltas"], definition, headline_format)
    entropy, column = entropy_by_format[headline_format], ENTROPY_COLUMNS[definition]
    # length control and split-half test a change between base and instruct: families with both only
    entropy = entropy[entropy["family"].isin(set(headline["family"]))]
    out["length_control"] = robustness.length_control(entropy, column, headline, settings.alpha)
    out["split_half"] = robustness.split_half(entropy, column, settings.split_half_splits,
                                              settings.seed)
    out["robustness"] = robustness.robustness_table(pd.concat(summaries, ignore_index=True), definition,
                                                    headline_format)
    entries = robustness.metrics_entries(out["robustness"], out["split_half"], out["length_control"])
    metrics["robustness"] = {f: {k: metric_value(v) for k, v in e.items()} for f, e in entries.items()}
    if staged_families(stages):
        metrics["stages"] = stage_statistics.stage_metrics(choice_rows(out["stage_shares"], definition, headline_format),
                                                           choice_rows(out["stage_heads"], definition, headline_format))
    token_lengths = pd.concat(lengths, ignore_index=True)
    token_lengths["category"] = pd.Categorical(token_lengths["category"], categories=list(CATEGORIES))
    out["token_lengths"] = token_lengths.sort_values(["format", "family", "category"], ignore_index=True)
    out["delta_rfc_plot"] = headline[["family", "layer", "depth", "delta_rfc", "delta_rfc_lo", "delta_rfc_hi",
                                      "layer_class"]]
    out.update(selections.build(choice_rows(out["heads"], definition, headline_format), out["length_control"],
                                   choice_rows(out["cross_family"], definition, headline_format), settings))
    out["metrics"] = metrics
    return out


def entropy_tables(config: Config) -> dict[str, pd.DataFrame]:
    """The entropy tables of every checkpoint of the active suite, per prompt format."""
    paths = config.paths
    columns = (REQUIRED_COLUMNS + ("n_tokens",) + tuple(ENTROPY_COLUMNS[d] for d in config.stats.definitions)
               + tuple(MASS_COLUMNS.values()))
    out = {}
    for prompt_format in PROMPT_FORMATS:
        frames = []
        for ckpt in config.checkpoints:
            if prompt_format == "chat" and config.chat_template_source(ckpt) is None:
                continue  # a family without an instruct checkpoint has no chat format
            path = paths.entropy_table(ckpt.name, prompt_format)
            if not path.exists():
                raise UserError(f"{paths.relative(path)}: missing; run `selfref extract {ckpt.family}` (or `dvc repro`)")
            frames.append(read_parquet(path, columns))
        out[prompt_format] = pd.concat(frames, ignore_index=True)
    return out


def write_study(study: dict, paths: ProjectPaths, folder: Path) -> None:
    """The stage's tables, plot and metrics under `folder`, laid out as data/stats (the stage's staging
    folder, or verification's temporary one)."""
    for key in STATS_TABLES:
        write_parquet(study[key], folder / paths.stats_table(key).relative_to(paths.stats))
    plot = folder / paths.delta_rfc_plot.relative_to(paths.stats)
    plot.parent.mkdir(parents=True, exist_ok=True)
    study["delta_rfc_plot"].to_csv(plot, index=False, float_format="%.6g")
    write_json(study["metrics"], folder / paths.metrics.relative_to(paths.stats))
