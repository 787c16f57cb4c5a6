"""How long the stats stage's computation, `analysis.statistics.study.build_study`, takes on synthetic entropy tables.

Shapes: the paper suite's (3 families x 32 layers x 32 heads x 160 prompts, 40 per category) and the demo
suite's (its families' layers and heads from params.yaml, every prompt of data/prompts.csv). The tables are
built by `analysis.extraction.runner.entropy_frame` from real prompts, in both prompt formats, with positive
entropies: head levels, a few sink-like heads, a prompt effect per layer that grows with token count, and a
planted self-referent change in some instruct layers. `build_study` runs with params.yaml's `stats` settings.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis.core import config as config_mod  # noqa: E402
from analysis.extraction.runner import EncodedPrompt, entropy_frame  # noqa: E402
from analysis.core.prompts import load_prompts  # noqa: E402
from analysis.core.quantities import PROMPT_FORMATS, SELF, VARIANTS  # noqa: E402
from analysis.statistics.study import build_study  # noqa: E402

PAPER = {"families": {"llama31_8b": (32, 32), "mistral_7b": (32, 32), "qwen25_7b": (32, 32)}, "per_category": 40}
QUICK_SETTINGS = {"n_resamples": 200, "n_permutations": 200, "split_half_splits": 20}


def demo_shape(config: config_mod.Config) -> dict[str, Any]:
    """Layers and heads of each demo family (params.yaml suites.demo, base spec), every prompt."""
    families = {c.family: (int(c.demo["layers"]), int(c.demo["heads"]))
                for c in config.suites["demo"] if c.variant == "base"}
    return {"families": families, "per_category": None}


def synthetic_tables(shape: dict[str, Any], prompts: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """Entropy tables of every checkpoint of `shape`, per prompt format, in the extract stage's columns."""
    if shape["per_category"]:
        prompts = prompts.groupby("category", sort=False).head(shape["per_category"]).reset_index(drop=True)
    n_p = len(prompts)
    self_rows = (prompts["category"] == SELF).to_numpy()
    out = {}
    for k, fmt in enumerate(PROMPT_FORMATS):
        rng = np.random.default_rng([seed, k])
        tokens = rng.integers(8, 20, size=n_p) + 6 * k
        encoded = [EncodedPrompt([0] * int(t), [True] * int(t)) for t in tokens]
        frames = []
        for family, (n_l, n_h) in shape["families"].items():
            level = rng.gamma(4.0, 0.5, size=(n_l, n_h)) * np.where(rng.random((n_l, n_h)) < 0.2, 0.05, 1.0)
            common = level * np.exp(rng.normal(0.0, 0.1, size=(n_p, n_l, 1))) * (np.log(tokens) / np.log(tokens).mean())[:, None, None]
            planted = np.where(rng.random(n_l) < 0.3, 1.05, 1.0)
            for variant in VARIANTS:
                raw = common * np.exp(rng.normal(0.0, 0.05, size=(n_p, n_l, n_h)))
                if variant == "instruct":
                    raw[self_rows] *= planted[None, :, None]
                values = {"raw": raw, "no_bos": raw * 1.15 + 0.02, "normalised": raw / np.log(tokens + 1.0)[:, None, None]}
                frames.append(entropy_frame(prompts, encoded, values, f"{family}-{variant}", family, variant,
                                            ["<bos>"] * n_p, fmt))
        out[fmt] = pd.concat(frames, ignore_index=True)
    return out


def measure(suite: str = "paper", quick: bool = False) -> dict[str, Any]:
    """Seconds `build_study` takes on synthetic tables of the suite's shape (table building not included)."""
    config = config_mod.load()
    settings = config.stats
    if quick:
        settings = dataclasses.replace(settings, **QUICK_SETTINGS)
    shape = PAPER if suite == "paper" else demo_shape(config)
    tables = synthetic_tables(shape, load_prompts(config.paths.prompts, config.prompts.min_per_category), settings.seed)
    start = time.perf_counter()
    build_study(tables, settings)
    seconds = time.perf_counter() - start
    headline = tables[settings.headline_format]
    return {"seconds": seconds, "families": {f: list(lh) for f, lh in shape["families"].items()},
            "prompts": int(headline["prompt_id"].nunique()), "rows_per_format": len(headline),
            "formats": list(tables), "definitions": list(settings.definitions), "n_resamples": settings.n_resamples,
            "n_permutations": settings.n_permutations, "split_half_splits": settings.split_half_splits}


if __name__ == "__main__":
    import json

    print(json.dumps({s: measure(s, "--quick" in sys.argv) for s in ("demo", "paper")}, indent=2))
