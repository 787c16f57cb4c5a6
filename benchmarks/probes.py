"""Cost of the probe stage: wall time of probing each checkpoint of the demo suite (both tasks, every pool and
layer, real and control labels, the token baseline), from the residual files `dvc repro` wrote. Part of
`make bench`; alone: python benchmarks/run.py --only probes."""

from __future__ import annotations

import time
from typing import Any, Callable

from threadpoolctl import threadpool_limits

from analysis.core import config as config_mod
from analysis.core.errors import UserError
from analysis.core.prompts import load_prompts
from analysis.extraction.residuals import read_residuals
from analysis.statistics.probes import probe_checkpoint

SUITE = "demo"


def measure(log: Callable[[str], None] = print) -> dict[str, Any]:
    """Seconds of probing each demo checkpoint and in all, with the `probe` settings of params.yaml."""
    config = config_mod.load(check_active=False)
    prompts = load_prompts(config.paths.prompts, config.prompts.min_per_category)
    rows, total = [], 0.0
    for ckpt in config.suites[SUITE]:
        path = config.paths.residual_file(ckpt.name)
        if not path.exists():
            raise UserError(f"{config.paths.relative(path)}: missing; run `dvc repro` first (the probe benchmark reads "
                            "the residual files of the extract stages)")
        residuals = read_residuals(path)
        started = time.perf_counter()
        with threadpool_limits(limits=1):  # as the probe stage runs it (analysis/verbs/probe.py)
            probe_checkpoint(residuals, prompts, config.probe, config.stats, ckpt.family, ckpt.variant)
        elapsed = time.perf_counter() - started
        total += elapsed
        rows.append({"checkpoint": ckpt.name, "layers": residuals.n_layers,
                     "residual file (MB)": round(path.stat().st_size / 1e6, 2), "probe (s)": round(elapsed, 1)})
        log(f"probing {ckpt.name}: {elapsed:.1f} s")
    return {"suite": SUITE, "checkpoints": rows, "seconds": round(total, 1)}


if __name__ == "__main__":
    print(measure())
