"""Stage `patch@<family>`: ablation and base<->instruct activation patching of the family's top candidate
heads and their random controls; data/patching/<family>.parquet, .prompts.parquet and .json."""

from __future__ import annotations

import time

import typer

from analysis.models import checkpoints
from analysis.core.artefacts import read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.layout import checkpoint_name
from analysis.extraction.runner import encode_prompts, open_checkpoint
from analysis.interventions.patching import PATCH_CATEGORIES, check_identical_ids, interventions_for, run_interventions
from analysis.interventions.summary import HEADS_COLUMNS, heads_table, selection_for, summaries
from analysis.core.prompts import load_prompts
from analysis.core.quantities import SOURCE_LANGUAGE, VARIANTS

def run(config: Config, family: str) -> None:
    """Intervene on one family's candidate and control heads and write its patching tables and summary."""
    if family not in config.families:
        raise UserError(f"family {family!r} is not in suite {config.suite}; use one of {', '.join(config.families)}")
    paths, settings, stats = config.paths, config.patch, config.stats
    started = time.perf_counter()
    variants = [v for v in VARIANTS if v in config.stages[family]]
    single = len(variants) == 1  # a family of one checkpoint: its most self-focused heads, ablation only
    selection = selection_for(config, family, read_parquet(paths.stats_table(heads_table(config, family)),
                                                           HEADS_COLUMNS))

    every = load_prompts(paths.prompts, config.prompts.min_per_category)
    corpus = checkpoints.tokenizer_corpus(paths, config.prompts.min_per_category)
    # The headline language and the two categories the statistics compare (docs/method.md, "Interventions on heads")
    prompts = every[(every["language"] == SOURCE_LANGUAGE) & every["category"].isin(PATCH_CATEGORIES)]
    prompts = prompts.reset_index(drop=True)
    local = {}
    for variant in variants:
        ckpt = config.checkpoint(checkpoint_name(family, variant))
        local[variant] = (ckpt, checkpoints.read_manifest(paths, ckpt.name))
    dirs = {v: checkpoints.local_dir(m, c.demo, corpus, paths) for v, (c, m) in local.items()}
    if stats.headline_format == "chat" and "instruct" not in dirs:
        raise UserError(f"{family}: stats.headline_format chat needs an instruct chat template, and the family is "
                        f"the {variants[0]} checkpoint alone; use headline_format raw")
    chat_dir = dirs["instruct"] if stats.headline_format == "chat" else None
    loaded = {v: open_checkpoint(dirs[v], checkpoint=local[v][0].name, settings=config.extract, chat_dir=chat_dir,
                                 expected_shape=(local[v][1]["n_layers"], local[v][1]["n_heads"])) for v in variants}
    encoded = {v: encode_prompts(loaded[v].tokenizer, prompts, stats.headline_format, config.extract,
                                 loaded[v].chat_tokenizer) for v in variants}
    if not single:
        check_identical_ids(encoded["base"], encoded["instruct"], list(prompts["prompt_id"]), family)

    per_prompt, _, _ = run_interventions({v: loaded[v].runner for v in variants}, encoded[variants[0]], prompts,
                                         selection, settings.batch_size, stats.headline_definition, family)
    table, summary = summaries(config, family, per_prompt, selection)
    write_parquet(per_prompt, paths.patch_prompts(family))
    write_parquet(table, paths.patch_table(family))
    write_json(summary, paths.patch_summary(family))
    typer.echo(f"{family}: {summary['n_candidates']} candidates, {summary['n_controls']} control heads, "
               f"{len(interventions_for(variants))} interventions in {time.perf_counter() - started:.1f} s "
               f"-> {paths.relative(paths.patch_table(family))}")
