"""Stage `figures`: the report's charts from data/stats, written to report/figures as one unit."""

from __future__ import annotations

import pandas as pd
import typer

from analysis.report import charts
from analysis.core.artefacts import atomic_dir, read_parquet
from analysis.core.config import Config


def run(config: Config) -> None:
    """Build every chart of the report for the headline definition and prompt format."""
    paths = config.paths
    tables = {name: read_parquet(paths.stats_table(name)) for name in ("layers", "deltas", "heads", "token_lengths",
                                                                       "stage_deltas", "attention_mass")}
    # one patch@<family> table per family of the suite (the figures stage runs after all of them)
    patching = pd.concat([read_parquet(paths.patch_table(f)) for f in config.families], ignore_index=True)
    with atomic_dir(paths.figures) as staging:
        built = charts.build_all(tables["layers"], tables["deltas"], tables["heads"], tables["token_lengths"],
                                 staging, config.stats.headline_definition, config.stats.headline_format,
                                 config.figures.width, config.figures.columns,
                                 stage_deltas=tables["stage_deltas"], attention_mass=tables["attention_mass"],
                                 patching=patching, top_k=config.patch.top_k,
                                 probes=read_parquet(paths.probe_table("probes")))
    typer.echo(f"{len(built)} charts -> {paths.relative(paths.figures)}/")
