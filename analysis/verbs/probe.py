"""Stage `probe`: linear probes of the prompt category on every checkpoint's pooled residual stream, the base-vs-
instruct change of selectivity and its correlation with ΔRFC; data/probes/*.parquet and metrics.json."""

from __future__ import annotations

import time

import pandas as pd
import typer

from analysis.core.artefacts import atomic_dir, read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.prompts import load_prompts
from analysis.extraction.residuals import read_residuals
from analysis.statistics import probes


def run(config: Config) -> dict:
    """Probe every checkpoint of the active suite and replace data/probes in one step."""
    paths = config.paths
    started = time.perf_counter()
    prompts = load_prompts(paths.prompts, config.prompts.min_per_category)
    tables, outcomes, n_layers = [], {}, {}
    for ckpt in config.checkpoints:
        residuals = read_residuals(paths.residual_file(ckpt.name))
        table, outcomes[ckpt.name] = probes.probe_checkpoint(residuals, prompts, config.probe, config.stats,
                                                             ckpt.family, ckpt.variant)
        n_layers[ckpt.family] = residuals.n_layers
        tables.append(table)
        typer.echo(f"{ckpt.name}: probed {residuals.n_layers} layers ({time.perf_counter() - started:.0f} s)")
    table = pd.concat(tables, ignore_index=True)
    changes = probes.change_table(outcomes, config.stages, n_layers, config.probe, config.stats)
    deltas = read_parquet(paths.stats_table("deltas"), ("definition", "format", "family", "layer", "delta_rfc"))
    correlations = probes.correlation_table(changes, deltas, config.stats)
    metrics = probes.probe_metrics(table, changes, correlations)
    with atomic_dir(paths.probes) as staging:
        for name, frame in (("probes", table), ("probe_changes", changes), ("probe_correlations", correlations)):
            write_parquet(frame, staging / paths.probe_table(name).relative_to(paths.probes))
        write_json(metrics, staging / paths.probe_metrics.relative_to(paths.probes))
    typer.echo(f"probed {len(config.checkpoints)} checkpoints in {time.perf_counter() - started:.0f} s "
               f"-> {paths.relative(paths.probes)}")
    return metrics
