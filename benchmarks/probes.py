"""Cost of the probe stage: wall time of probing each checkpoint of the active suite (both tasks, every pool and
layer, real and control labels, the token baseline), from its residual file. Run: python benchmarks/probes.py"""

from __future__ import annotations

import time

from analysis.core.config import load
from analysis.core.prompts import load_prompts
from analysis.extraction.residuals import read_residuals
from analysis.statistics.probes import probe_checkpoint


def main() -> None:
    config = load()
    prompts = load_prompts(config.paths.prompts, config.prompts.min_per_category)
    total = 0.0
    for ckpt in config.checkpoints:
        residuals = read_residuals(config.paths.residual_file(ckpt.name))
        started = time.perf_counter()
        probe_checkpoint(residuals, prompts, config.probe, config.stats, ckpt.family, ckpt.variant)
        elapsed = time.perf_counter() - started
        total += elapsed
        size = config.paths.residual_file(ckpt.name).stat().st_size / 1e6
        print(f"{ckpt.name}: {residuals.n_layers} layers, k = {residuals.features['mean'].shape[2]}, "
              f"{size:.2f} MB residual file, probed in {elapsed:.1f} s")
    print(f"suite {config.suite}: {len(config.checkpoints)} checkpoints probed in {total:.0f} s")


if __name__ == "__main__":
    main()
