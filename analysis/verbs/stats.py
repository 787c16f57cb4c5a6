"""Stage `stats`: every statistic of the study from the entropy tables, written to data/stats as one unit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from analysis.core.artefacts import atomic_dir, read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.layout import STATS_TABLES, ProjectPaths
from analysis.statistics.layers import REQUIRED_COLUMNS
from analysis.core.quantities import ENTROPY_COLUMNS, MASS_COLUMNS, PROMPT_FORMATS
from analysis.statistics.study import build_study


def entropy_tables(config: Config) -> dict[str, pd.DataFrame]:
    """The entropy tables of every checkpoint of the active suite, per prompt format."""
    paths = config.paths
    columns = (REQUIRED_COLUMNS + ("n_tokens",) + tuple(ENTROPY_COLUMNS[d] for d in config.stats.definitions)
               + tuple(MASS_COLUMNS.values()))
    out = {}
    for prompt_format in PROMPT_FORMATS:
        frames = []
        for ckpt in config.checkpoints:
            path = paths.entropy_table(ckpt.name, prompt_format)
            if not path.exists():
                raise UserError(f"{paths.relative(path)}: missing; run `selfref extract {ckpt.name} "
                                f"--format {prompt_format}` (or `dvc repro`)")
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


def run(config: Config) -> dict:
    """Compute the study and replace data/stats with the new tables, plots and metrics in one step."""
    paths = config.paths
    study = build_study(entropy_tables(config), config.stats, config.stages)
    with atomic_dir(paths.stats) as staging:
        write_study(study, paths, staging)
    for family, values in study["metrics"]["families"].items():
        typer.echo(f"{family}: mean ΔRFC {values['mean_delta_rfc']:+.4f} "
                   f"[{values['mean_delta_rfc_lo']:+.4f}, {values['mean_delta_rfc_hi']:+.4f}], "
                   f"compression in {values['share_compression']:.0%}, gain in {values['share_gain']:.0%} of layers")
    return study
