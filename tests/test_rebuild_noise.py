"""Another CPU, simulated on this one: entropies that differ at float32 noise must change no conclusion.

Two CPUs give entropies that differ in the last bits (other SIMD widths and summation orders); that is what
flipped demo_stages' tied planted heads between machines. Here every entropy and attention mass of the demo
suite is multiplied by (1 + eps * u), u uniform in [-1, 1], seeded per (family, format, prompt, layer, head) and
the same for every stage of a family (one CPU computes both, so what is exactly equal there stays equal), and the
statistics are rebuilt: every rank, class, candidate set and significance decision must stand
(analysis/audit/build_comparison.py), and every number must agree at the printed precision.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import cli
from analysis.core import config
from analysis.audit.build_comparison import compare_folders
from analysis.core.layout import project_paths
from analysis.core.quantities import ENTROPY_COLUMNS, MASS_COLUMNS
from analysis.statistics.study import entropy_tables, write_study
from analysis.statistics.study import build_study

REPO = Path(__file__).resolve().parent.parent
EPS = 4 * float(np.finfo(np.float32).eps)  # about 5e-7: a few float32 units, more than two CPUs differ by


def perturbed(entropy: pd.DataFrame, seed: int, eps: float = EPS) -> pd.DataFrame:
    """Every entropy and mass column times (1 + eps * u), u seeded per (family, prompt, layer, head): the same
    for every stage of a family."""
    keys = pd.util.hash_pandas_object(entropy[["family", "prompt_id", "layer", "head"]], index=False).to_numpy()
    u = np.random.default_rng(seed).uniform(-1.0, 1.0, size=2 ** 16)[keys % (2 ** 16)]
    out = entropy.copy()
    for column in (*ENTROPY_COLUMNS.values(), *MASS_COLUMNS.values()):
        if column in out.columns:
            out[column] = out[column] * (1.0 + eps * u)
    return out


def test_perturbation_keeps_exact_equalities_and_moves_values_at_float32_noise():
    table = pd.DataFrame({"family": ["f"] * 4, "prompt_id": ["a", "a", "b", "b"], "layer": [0, 0, 0, 0],
                          "head": [0, 0, 0, 1], "variant": ["base", "instruct", "base", "base"],
                          "entropy": [1.5, 1.5, 1.5, 1.5]})
    out = perturbed(table, seed=1)["entropy"].to_numpy()
    assert out[0] == out[1], "the same prompt and head in two stages of a family moves the same way"
    assert out[2] != out[3], "two heads tied by construction are untied at noise level"
    assert np.all(np.abs(out / 1.5 - 1.0) <= EPS) and np.any(out != 1.5)


@pytest.fixture(scope="module")
def demo_entropy(tmp_path_factory):
    """The demo suite's entropy tables (every checkpoint, both prompt formats), extracted in process."""
    root = tmp_path_factory.mktemp("demo-project")
    (root / "data").mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copy(REPO / "data" / "prompts.csv", root / "data" / "prompts.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFREF_ROOT", str(root))
        mp.setenv("SELFREF_DEMO_MODELS", str(root / "models"))
        cfg = config.load(project_paths(root))
        for ckpt in cfg.checkpoints:  # every manifest first: the chat format reads the family's instruct one
            cli.pull(ckpt.name, update=False)
        for ckpt in cfg.checkpoints:
            cli.extract(ckpt.name, None)  # every format the checkpoint has
        return cfg, entropy_tables(cfg)


@pytest.mark.slow
def test_float_noise_changes_no_rank_class_candidate_or_decision(demo_entropy, tmp_path):
    cfg, tables = demo_entropy
    paths = cfg.paths
    for name, entropy in (("published", tables),
                          ("rebuilt", {f: perturbed(t, seed=i + 1) for i, (f, t) in enumerate(tables.items())})):
        study = build_study(entropy, cfg.stats, cfg.stages)
        write_study(study, paths, tmp_path / name / "data" / "stats")
    comparison = compare_folders(tmp_path / "published", tmp_path / "rebuilt", cfg.stats)
    report = "\n".join(comparison.lines("the unperturbed build")[:60])
    assert comparison.n_conclusions > 10_000 and comparison.n_numbers > 50_000, report
    assert comparison.changed == [], report
    assert comparison.beyond_tolerance == [], report
    assert comparison.borderline == [], report
