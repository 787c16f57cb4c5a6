"""Stage `probe`: linear probes of the prompt category on every checkpoint's pooled residual stream, the base-vs-
instruct change of selectivity and its correlation with ΔRFC; data/probes/*.parquet and metrics.json. Families are
probed side by side, one process per free core (`probe.workers`); the result does not depend on how many."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import typer
from threadpoolctl import threadpool_limits

from analysis.core.artefacts import atomic_dir, read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.lanes import plan_lanes, run_lanes
from analysis.core.prompts import load_prompts
from analysis.core.threads import cpu_threads
from analysis.extraction.residuals import read_residuals
from analysis.statistics import probes

PARTS = ("probes", "probe_changes")  # what each family's probing writes: its rows of these two tables


def run(config: Config) -> dict:
    """Probe every checkpoint of the active suite and replace data/probes in one step."""
    paths = config.paths
    started = time.perf_counter()
    prompts = load_prompts(paths.prompts, config.prompts.min_per_category)
    members = {f: config.family_checkpoints(f) for f in config.families}
    # a family's cost is about the size of its residual files (layers x prompts x width)
    costs = {f: float(sum(_size(paths.residual_file(c.name)) for c in cs)) for f, cs in members.items()}
    lanes = plan_lanes(costs, cpu_threads(config.probe.workers) or 1)

    def probe_families(families: Sequence[str], folder: Path) -> None:
        """Probe each family of one lane and write its rows of both tables in `folder`."""
        with threadpool_limits(limits=1):  # one BLAS thread per process: faster for these small fits, and the
            for family in families:        # same arithmetic whichever number of lanes runs
                tables, outcomes, n_layers = [], {}, {}
                for ckpt in members[family]:
                    residuals = read_residuals(paths.residual_file(ckpt.name))
                    table, outcomes[ckpt.name] = probes.probe_checkpoint(residuals, prompts, config.probe,
                                                                         config.stats, ckpt.family, ckpt.variant)
                    n_layers[family] = residuals.n_layers
                    tables.append(table)
                    typer.echo(f"{ckpt.name}: probed {residuals.n_layers} layers "
                               f"({time.perf_counter() - started:.0f} s)")
                changes = probes.change_table(outcomes, {family: config.stages[family]}, n_layers, config.probe,
                                              config.stats)
                write_parquet(pd.concat(tables, ignore_index=True), folder / f"{family}.probes.parquet")
                write_parquet(changes, folder / f"{family}.probe_changes.parquet")

    paths.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=paths.scratch) as scratch:
        folders = run_lanes(lanes, probe_families, Path(scratch))
        lane_of = {family: folder for lane, folder in zip(lanes, folders) for family in lane}
        table, changes = (_concat([read_parquet(lane_of[f] / f"{f}.{part}.parquet") for f in config.families])
                          for part in PARTS)
    deltas = read_parquet(paths.stats_table("deltas"), ("definition", "format", "family", "layer", "delta_rfc"))
    correlations = probes.correlation_table(changes, deltas, config.stats)
    metrics = probes.probe_metrics(table, changes, correlations)
    with atomic_dir(paths.probes) as staging:
        for name, frame in (("probes", table), ("probe_changes", changes), ("probe_correlations", correlations)):
            write_parquet(frame, staging / paths.probe_table(name).relative_to(paths.probes))
        write_json(metrics, staging / paths.probe_metrics.relative_to(paths.probes))
    typer.echo(f"probed {len(config.checkpoints)} checkpoints in {len(lanes)} lane(s) in "
               f"{time.perf_counter() - started:.0f} s -> {paths.relative(paths.probes)}")
    return metrics


def _size(path: Path) -> int:
    """A residual file's size; 0 when missing (reading it then names the file and the fix)."""
    return path.stat().st_size if path.exists() else 0


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The families' rows in suite order (a family without rows, e.g. no base/instruct pair, adds none)."""
    kept = [f for f in frames if len(f)]
    return pd.concat(kept, ignore_index=True) if kept else frames[0]
