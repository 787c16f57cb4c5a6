"""Stage `figures`: the report's charts from data/stats, written to report/figures as one unit."""

from __future__ import annotations

import typer

from analysis import charts
from analysis.artefacts import atomic_dir, read_parquet
from analysis.config import Config


def run(config: Config) -> None:
    """Build every chart of the report for the headline definition and prompt format."""
    paths = config.paths
    tables = {name: read_parquet(paths.stats_table(name)) for name in ("layers", "deltas", "heads", "token_lengths",
                                                                       "stage_deltas")}
    with atomic_dir(paths.figures) as staging:
        built = charts.build_all(tables["layers"], tables["deltas"], tables["heads"], tables["token_lengths"],
                                 staging, config.stats.headline_definition, config.stats.headline_format,
                                 config.figures.width, config.figures.columns,
                                 stage_deltas=tables["stage_deltas"])
    typer.echo(f"{len(built)} charts -> {paths.relative(paths.figures)}/")
