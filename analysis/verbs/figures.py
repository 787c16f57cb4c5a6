"""Stage `figures`: the report's charts and its findings tables from data/stats and data/patching, written to
report/figures as one unit."""

from __future__ import annotations

import json

import pandas as pd
import typer

from analysis.core.artefacts import atomic_dir, read_parquet, write_parquet
from analysis.core.config import Config
from analysis.report import charts, findings


def run(config: Config) -> None:
    """Build every chart of the report for the headline definition and prompt format."""
    paths = config.paths
    read = ("layers", "deltas", "heads", "token_lengths", "stage_deltas", "attention_mass", "head_families",
            "robustness", "format_contrasts")
    tables = {name: read_parquet(paths.stats_table(name)) for name in read}
    # one patch@<family> table per family of the suite (the figures stage runs after all of them)
    patching = pd.concat([read_parquet(paths.patch_table(f)) for f in config.families], ignore_index=True)
    summaries = {f: json.loads(paths.patch_summary(f).read_text()) for f in config.families}
    metrics = json.loads(paths.metrics.read_text())
    with atomic_dir(paths.figures) as staging:
        built = charts.build_all(tables["layers"], tables["deltas"], tables["heads"], tables["token_lengths"],
                                 staging, config.stats.headline_definition, config.stats.headline_format,
                                 config.figures.width, config.figures.columns,
                                 stage_deltas=tables["stage_deltas"], attention_mass=tables["attention_mass"],
                                 patching=patching, top_k=config.patch.top_k,
                                 head_families=tables["head_families"], height=config.figures.height,
                                 probes=read_parquet(paths.probe_table("probes")))
        write_parquet(findings.family_findings(config, tables["deltas"], tables["robustness"], tables["head_families"],
                                               patching, summaries), staging / paths.findings.name)
        names = dict(zip(tables["head_families"]["family"], tables["head_families"]["names_candidates"]))
        write_parquet(findings.tested_mass(tables["attention_mass"], charts.tested_heads(patching, names),
                                           config.stats.headline_format), staging / paths.tested_mass.name)
        write_parquet(findings.single_checkpoints(config, tables["attention_mass"], tables["format_contrasts"]),
                      staging / findings.SINGLE_CHECKPOINTS_FILE)
        write_parquet(findings.planted_vs_recovered(config, tables["deltas"], tables["heads"], tables["head_families"],
                                                    metrics), staging / paths.planted.name)
    typer.echo(f"{len(built)} charts -> {paths.relative(paths.figures)}/")
