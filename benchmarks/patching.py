"""How long the patching stage's computation takes: `analysis.interventions.patching.run_interventions` and the summaries.

Demo: every family of the demo suite, on its own checkpoints (models/demo, as `selfref patch` loads them), with
the candidates and controls the stage selects from data/stats/heads.parquet and params.yaml's `patch` settings.
Larger shape on the CPU: a synthetic Llama checkpoint of `benchmarks/extraction.py`'s CPU shape (base, and an
instruct that differs in two planted heads), 16 selected heads. The paper suite's cost is estimated from the
number of prompt-forwards it needs, against the extract stages' (docs: benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis.models import checkpoints
from analysis.models import synthetic  # noqa: E402
from analysis.core import config as config_mod  # noqa: E402
from analysis.core.artefacts import read_parquet  # noqa: E402
from analysis.extraction.runner import encode_prompts, open_checkpoint  # noqa: E402
from analysis.interventions.patching import INTERVENTIONS, PATCH_CATEGORIES, run_interventions, select_controls  # noqa: E402
from analysis.core.prompts import load_prompts  # noqa: E402
from analysis.core.quantities import SOURCE_LANGUAGE, VARIANTS  # noqa: E402
from analysis.interventions.summary import HEADS_COLUMNS, selection_for, summaries  # noqa: E402

# The paper suite: 3 families, 160 English prompts (40 per category), the stage's default selection.
PAPER = {"families": 3, "prompts_per_category": 40, "checkpoints": 6, "formats": 2}
CPU_SPEC = {"architecture": "llama", "layers": 8, "hidden": 512, "heads": 8, "kv_heads": 8, "seed": 7}
QUICK_SPEC = {**CPU_SPEC, "layers": 4, "hidden": 128}


def _patched_prompts(config: config_mod.Config) -> tuple[pd.DataFrame, list[str]]:
    every = load_prompts(config.paths.prompts, config.prompts.min_per_category)
    prompts = every[(every["language"] == SOURCE_LANGUAGE) & every["category"].isin(PATCH_CATEGORIES)]
    return prompts.reset_index(drop=True), checkpoints.tokenizer_corpus(config.paths, config.prompts.min_per_category)


def _timed_family(config, family, loaded, prompts, selection) -> dict[str, Any]:
    encoded = encode_prompts(loaded["base"].tokenizer, prompts, config.stats.headline_format, config.extract,
                             loaded["base"].chat_tokenizer)
    start = time.perf_counter()
    per_prompt, _, _ = run_interventions({v: loaded[v].runner for v in VARIANTS}, encoded, prompts, selection,
                                         config.patch.batch_size, config.stats.headline_definition, family)
    forward = time.perf_counter() - start
    summaries(config, family, per_prompt, selection)
    n_heads = len(selection[["layer", "head"]].drop_duplicates())
    rows = 2 * len(prompts) + len(INTERVENTIONS) * n_heads * len(prompts)
    return {"heads": n_heads, "prompts": len(prompts), "forward_rows": rows, "forward_s": forward,
            "summaries_s": time.perf_counter() - start - forward, "total_s": time.perf_counter() - start,
            "ms_per_row": 1000 * forward / rows}


def demo(config: config_mod.Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Each demo family as its patch stage computes it (checkpoint loading not timed)."""
    prompts, texts = _patched_prompts(config)
    heads = read_parquet(config.paths.stats_table("heads"), HEADS_COLUMNS)
    out = {}
    for family in config.families:
        loaded = {}
        for v in VARIANTS:
            ckpt = config.checkpoint(f"{family}-{v}")
            local = checkpoints.local_dir(checkpoints.read_manifest(config.paths, ckpt.name), ckpt.demo, texts,
                                          config.paths)
            loaded[v] = open_checkpoint(local, checkpoint=ckpt.name, settings=config.extract)
        out[family] = _timed_family(config, family, loaded, prompts, selection_for(config, family, heads))
        log(f"patching {family}: {out[family]['total_s']:.1f} s")
    return out


def larger(config: config_mod.Config, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """A synthetic checkpoint pair of extraction.py's CPU shape, 16 heads (4 candidates, 3 controls each)."""
    spec = QUICK_SPEC if quick else CPU_SPEC
    prompts, texts = _patched_prompts(config)
    planted = [[2, 1], [3, 5]]
    with tempfile.TemporaryDirectory(prefix="selfref-bench-patch-") as tmp:
        loaded = {}
        for v in VARIANTS:
            local = Path(tmp) / v
            synthetic.generate({**spec, "planted": planted, "self_focus": planted if v == "base" else []},
                               texts, local, where=f"benchmark-{v}")
            loaded[v] = open_checkpoint(local, checkpoint=f"bench-{v}",
                                        settings=dataclasses.replace(config.extract, device="cpu", dtype="float32"))
        rng = np.random.default_rng(0)
        layer, head = np.meshgrid(np.arange(spec["layers"]), np.arange(spec["heads"]), indexing="ij")
        heads = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "base_entropy": rng.random(layer.size),
                              "position": rng.permutation(layer.size) + 1})
        selection = select_controls(heads, 4, 3, 0, "bench")
        log(f"patching a synthetic {spec['layers']}-layer d_model {spec['hidden']} pair")
        return {"checkpoint": spec, **_timed_family(config, "bench", loaded, prompts, selection)}


def paper_estimate(config: config_mod.Config) -> dict[str, Any]:
    """Prompt-forwards the paper suite's patch stages need, against its extract stages' (same device, same model
    size: the ratio is what patching adds to the extraction time measured or estimated for that suite)."""
    top_k, per = config.patch.top_k, config.patch.max_controls
    heads = top_k * (1 + per)  # at most: candidates of one layer share their controls
    prompts = len(PATCH_CATEGORIES) * PAPER["prompts_per_category"]
    patch_rows = PAPER["families"] * (2 * prompts + len(INTERVENTIONS) * heads * prompts)
    extract_rows = PAPER["checkpoints"] * PAPER["formats"] * 4 * PAPER["prompts_per_category"]
    return {"families": PAPER["families"], "heads_per_family": heads, "prompts": prompts,
            "patch_forward_rows": patch_rows, "extract_forward_rows": extract_rows,
            "patch_over_extract": patch_rows / extract_rows}


def measure(quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    config = config_mod.load()
    out: dict[str, Any] = {"batch_size": config.patch.batch_size, "threads": torch.get_num_threads(),
                           "paper_estimate": paper_estimate(config)}
    out["demo"] = demo(config, log) if config.suite == "demo" else {"not_run": f"active suite is {config.suite}"}
    out["larger"] = larger(config, quick, log)
    out["demo_max_family_s"] = max((v["total_s"] for v in out["demo"].values() if isinstance(v, dict)), default=None)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure("--quick" in sys.argv), indent=2))
