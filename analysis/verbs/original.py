"""Stage `original`: the original study's published tables (data/original) re-analysed with this project's
statistics; writes data/original/reanalysis.json and reanalysis_claims.parquet."""

from __future__ import annotations

import typer

from analysis.core.config import Config
from analysis.statistics.original_study import load_build, reanalyse, write_reanalysis


def run(config: Config) -> dict:
    """Check the copied files' SHA-256, recompute every claim from the original's tables, write both artefacts."""
    paths = config.paths
    result = reanalyse(paths.original, paths.original_sums, paths.original_claims, config.stats, load_build(config))
    write_reanalysis(result, paths)
    claims = result["claims"]
    typer.echo(f"{int(claims['reproduced'].sum())} of {len(claims)} published claims reproduce from the "
               "original's own tables")
    for row in claims[~claims["reproduced"]].itertuples():
        typer.echo(f"  not reproduced: {row.claim}: published {row.published_text}, its tables give "
                   f"{row.recomputed_text}")
    return result
