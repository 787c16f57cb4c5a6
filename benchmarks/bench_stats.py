"""How long the `stats` stage's computation takes at the paper suite's shape.

Synthetic entropy tables stand in for the extracted ones: positive values (gamma head levels, a few
sink-like low-entropy heads, a multiplicative prompt effect per layer that grows with token count,
independent noise per variant, and a planted self_referent change in some layers of instruct).
Like `selfref stats` (analysis/cli.py), `build_statistics` runs once per prompt format (raw, chat)
with all three entropy definitions and the `stats` settings of params.yaml (10,000 resamples,
10,000 permutations), then `length_control` and `split_half` run on the headline table.

    python benchmarks/bench_stats.py            # paper shape: 3 families x 32 layers x 32 heads x 160 prompts
    python benchmarks/bench_stats.py --quick    # seconds: a reduced shape and few resamples (smoke test)
    python benchmarks/bench_stats.py --suite demo   # the demo suite's shape (params.yaml suites.demo)

`measure(quick=False) -> dict` returns timings in seconds (keys ending in `_s`), the shape and the
settings used, and the peak resident memory of the process; benchmarks/run.py imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis import params as params_mod  # noqa: E402
from analysis import robustness  # noqa: E402
from analysis.metrics import build_statistics  # noqa: E402
from analysis.prompts import CATEGORIES  # noqa: E402

FORMATS = ("raw", "chat")
DEFINITION_COLUMNS = {"raw": "entropy", "no_bos": "entropy_no_bos", "normalised": "entropy_normalised"}

# The paper suite at the shape the brief fixes: 3 families x 32 layers x 32 query heads, 40 prompts per category.
PAPER_SHAPE = {"families": {"llama31_8b": (32, 32), "mistral_7b": (32, 32), "qwen25_7b": (32, 32)},
               "prompts_per_category": 40}
QUICK_SHAPE = {"families": {"quick_a": (6, 4), "quick_b": (4, 4)}, "prompts_per_category": 12}
QUICK_SETTINGS = {"n_resamples": 200, "n_permutations": 200, "split_half_splits": 50}


def demo_shape(params: dict) -> dict:
    """Layers and heads of every demo family (params.yaml suites.demo), 45 prompts per category (data/prompts.csv)."""
    families = {}
    for family, spec in params["suites"]["demo"]["families"].items():
        demo = spec["base"]["demo"]
        families[family] = (int(demo["layers"]), int(demo["heads"]))
    return {"families": families, "prompts_per_category": 45}


def synthetic_entropy(shape: dict, seed: int, prompt_format: str) -> pd.DataFrame:
    """An entropy table in the extract stage's long format (one row per checkpoint, prompt, layer, head)."""
    rng = np.random.default_rng([seed, FORMATS.index(prompt_format)])
    n_cat = int(shape["prompts_per_category"])
    categories = np.repeat(np.array(CATEGORIES), n_cat)
    prompt_ids = np.array([f"{c[:4]}_{i:03d}" for c in CATEGORIES for i in range(n_cat)])
    n_p = categories.size
    n_tokens = rng.integers(8, 20, size=n_p) + (6 if prompt_format == "chat" else 0)
    frames = []
    for family, (n_l, n_h) in shape["families"].items():
        level = rng.gamma(4.0, 0.5, size=(n_l, n_h))
        sinks = rng.random((n_l, n_h)) < 0.2
        level[sinks] *= 0.05  # attention-sink heads: entropy close to 0
        length = np.log(n_tokens)[:, None, None] / np.log(n_tokens).mean()
        prompt = np.exp(rng.normal(0.0, 0.1, size=(n_p, n_l, 1)))
        base = level * prompt * length * np.exp(rng.normal(0.0, 0.05, size=(n_p, n_l, n_h)))
        instruct = level * prompt * length * np.exp(rng.normal(0.0, 0.05, size=(n_p, n_l, n_h)))
        planted = rng.random(n_l) < 0.3
        instruct[np.ix_(categories == CATEGORIES[0], planted, np.arange(n_h))] *= 1.05
        p, layer, head = (a.ravel() for a in np.meshgrid(np.arange(n_p), np.arange(n_l), np.arange(n_h),
                                                          indexing="ij"))
        for variant, values in (("base", base), ("instruct", instruct)):
            e = values.ravel()
            frames.append(pd.DataFrame({
                "checkpoint": f"{family}-{variant}", "family": family, "variant": variant,
                "prompt_id": prompt_ids[p], "category": categories[p],
                "layer": layer.astype(np.int32), "head": head.astype(np.int32),
                "entropy": e, "entropy_no_bos": e * 1.15 + 0.02, "entropy_normalised": e / np.log(n_tokens[p] + 1.0),
                "n_tokens": n_tokens[p].astype(np.int32), "prompt_format": prompt_format}))
    return pd.concat(frames, ignore_index=True)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def measure(quick: bool = False, suite: str = "paper") -> dict:
    """Time the stats stage's computation; returns {name: seconds, ...} plus shape and settings.

    quick=True: a 2-family toy shape with 200 resamples/permutations and 50 half-splits (a few seconds).
    suite: "paper" (3 x 32 layers x 32 heads, 160 prompts) or "demo" (params.yaml's demo suite shape);
    ignored when quick. Timings: build_statistics_<format>_s per prompt format, build_statistics_s (both),
    length_control_s, split_half_s, total_s (all of these together: the stage's computation, without
    reading and writing files); make_tables_s (synthetic data, not part of the stage).
    """
    params = params_mod.load(REPO / "params.yaml")
    settings = dict(params["stats"])
    if quick:
        shape = QUICK_SHAPE
        settings.update(QUICK_SETTINGS)
    elif suite == "paper":
        shape = PAPER_SHAPE
    elif suite == "demo":
        shape = demo_shape(params)
    else:
        raise ValueError(f"suite must be 'paper' or 'demo', not {suite!r}")

    start = time.perf_counter()
    tables = {fmt: synthetic_entropy(shape, int(settings["seed"]), fmt) for fmt in FORMATS}
    out: dict = {"make_tables_s": time.perf_counter() - start}

    results = {}
    for fmt in FORMATS:
        start = time.perf_counter()
        results[fmt] = build_statistics(tables[fmt], settings)
        robustness.family_summaries(results[fmt], fmt)
        out[f"build_statistics_{fmt}_s"] = time.perf_counter() - start
    out["build_statistics_s"] = sum(out[f"build_statistics_{fmt}_s"] for fmt in FORMATS)

    headline = settings["headline_format"]
    definition = settings["headline_definition"]
    entropy = tables[headline]
    deltas = results[headline]["deltas"]
    deltas = deltas[deltas["definition"] == definition]
    start = time.perf_counter()
    robustness.length_control(entropy, DEFINITION_COLUMNS[definition], deltas, float(settings["alpha"]))
    out["length_control_s"] = time.perf_counter() - start
    start = time.perf_counter()
    robustness.split_half(entropy, DEFINITION_COLUMNS[definition], int(settings["split_half_splits"]),
                          int(settings["seed"]))
    out["split_half_s"] = time.perf_counter() - start
    out["total_s"] = out["build_statistics_s"] + out["length_control_s"] + out["split_half_s"]

    n_rows = int(sum(len(t) for t in tables.values()))
    out.update({
        "peak_rss_mb": _peak_rss_mb(),
        "suite": "quick" if quick else suite,
        "n_families": len(shape["families"]),
        "layers_heads": {f: list(lh) for f, lh in shape["families"].items()},
        "prompts_per_category": int(shape["prompts_per_category"]),
        "n_prompts": int(shape["prompts_per_category"]) * len(CATEGORIES),
        "formats": list(FORMATS),
        "definitions": list(settings["definitions"]),
        "n_resamples": int(settings["n_resamples"]),
        "n_permutations": int(settings["n_permutations"]),
        "split_half_splits": int(settings["split_half_splits"]),
        "entropy_rows": n_rows,
        "cpu_count": os.cpu_count(),
    })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced shape and resamples (a few seconds)")
    parser.add_argument("--suite", choices=("paper", "demo"), default="paper", help="shape to time (default paper)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(quick=args.quick, suite=args.suite), indent=2))


if __name__ == "__main__":
    main()
