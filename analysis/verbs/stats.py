"""Stage `stats`: every statistic of the study from the entropy tables, written to data/stats as one unit."""

from __future__ import annotations

import typer
from threadpoolctl import threadpool_limits

from analysis.core.artefacts import atomic_dir
from analysis.core.config import Config
from analysis.core.threads import cpu_threads
from analysis.statistics.study import build_study, entropy_tables, write_study


def run(config: Config) -> dict:
    """Compute the study and replace data/stats with the new tables, plots and metrics in one step."""
    paths = config.paths
    tables = entropy_tables(config)
    with threadpool_limits(limits=1):  # one BLAS thread per process, as many processes as free cores: faster than
        # two threads in one process on 2 cores, and the same arithmetic for any number of workers or cores
        study = build_study(tables, config.stats, config.stages, workers=cpu_threads(config.stats.workers) or 1,
                            scratch=paths.scratch)
    with atomic_dir(paths.stats) as staging:
        write_study(study, paths, staging)
    for family, values in study["metrics"]["families"].items():
        typer.echo(f"{family}: mean ΔRFC {values['mean_delta_rfc']:+.4f} "
                   f"[{values['mean_delta_rfc_lo']:+.4f}, {values['mean_delta_rfc_hi']:+.4f}], "
                   f"compression in {values['share_compression']:.0%}, gain in {values['share_gain']:.0%} of layers")
    for family, values in study["metrics"]["checkpoints"].items():
        typer.echo(f"{family} ({values['variant']} alone): mean RFC {values['mean_rfc']:+.4f} "
                   f"[{values['mean_rfc_lo']:+.4f}, {values['mean_rfc_hi']:+.4f}], "
                   f"{values['n_heads_significant']} heads self vs neutral at q < alpha")
    return study
