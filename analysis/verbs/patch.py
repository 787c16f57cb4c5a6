"""Stage `patch@<family>`: ablation and base<->instruct activation patching of the family's top candidate
heads and their random controls; data/patching/<family>.parquet, .prompts.parquet and .json."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import typer

from analysis.models import checkpoints
from analysis.core.artefacts import read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.extraction.runner import encode_prompts, open_checkpoint
from analysis.interventions.patching import (INTERVENTIONS, METRICS, PATCH_CATEGORIES, check_identical_ids,
                                    run_interventions, select_controls, summarise)
from analysis.statistics.layers import metric_value
from analysis.core.prompts import load_prompts
from analysis.core.quantities import SOURCE_LANGUAGE, VARIANTS, choice_rows, head_label

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
    for iv in INTERVENTIONS:
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


def selection_for(config: Config, family: str, heads: pd.DataFrame) -> pd.DataFrame:
    """The family's candidate heads and their random controls, from the stats stage's heads table."""
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


def run(config: Config, family: str) -> None:
    """Intervene on one family's candidate and control heads and write its patching tables and summary."""
    if family not in config.families:
        raise UserError(f"family {family!r} is not in suite {config.suite}; use one of {', '.join(config.families)}")
    paths, settings, stats = config.paths, config.patch, config.stats
    started = time.perf_counter()
    selection = selection_for(config, family, read_parquet(paths.stats_table("heads"), HEADS_COLUMNS))

    every = load_prompts(paths.prompts, config.prompts.min_per_category)
    texts = list(every["text"])  # a demo tokenizer is trained on every language's prompts, as `pull` did
    # The headline language and the two categories the statistics compare (docs/method.md, "Interventions on heads")
    prompts = every[(every["language"] == SOURCE_LANGUAGE) & every["category"].isin(PATCH_CATEGORIES)]
    prompts = prompts.reset_index(drop=True)
    local = {}
    for variant in VARIANTS:
        ckpt = config.checkpoint(f"{family}-{variant}")
        local[variant] = (ckpt, checkpoints.read_manifest(paths, ckpt.name))
    dirs = {v: checkpoints.local_dir(m, c.demo, texts, paths) for v, (c, m) in local.items()}
    chat_dir = dirs["instruct"] if stats.headline_format == "chat" else None
    loaded = {v: open_checkpoint(dirs[v], checkpoint=local[v][0].name, settings=config.extract, chat_dir=chat_dir,
                                 expected_shape=(local[v][1]["n_layers"], local[v][1]["n_heads"])) for v in VARIANTS}
    encoded = {v: encode_prompts(loaded[v].tokenizer, prompts, stats.headline_format, config.extract,
                                 loaded[v].chat_tokenizer) for v in VARIANTS}
    check_identical_ids(encoded["base"], encoded["instruct"], list(prompts["prompt_id"]), family)

    per_prompt, _, _ = run_interventions({v: loaded[v].runner for v in VARIANTS}, encoded["base"], prompts,
                                         selection, settings.batch_size, stats.headline_definition, family)
    table, summary = summaries(config, family, per_prompt, selection)
    write_parquet(per_prompt, paths.patch_prompts(family))
    write_parquet(table, paths.patch_table(family))
    write_json(summary, paths.patch_summary(family))
    typer.echo(f"{family}: {summary['n_candidates']} candidates, {summary['n_controls']} control heads, "
               f"{len(INTERVENTIONS)} interventions in {time.perf_counter() - started:.1f} s "
               f"-> {paths.relative(paths.patch_table(family))}")
