"""Ranks that float noise cannot flip (analysis/core/ranking.py) and the comparison of a rebuild with published
artefacts (analysis/audit/build_comparison.py), on hand-made cases."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from analysis.audit.build_comparison import compare_folders, compare_with_revision, is_published
from analysis.core.errors import UserError
from analysis.statistics.heads import head_scores
from analysis.statistics.layers import top_compression_layers
from analysis.core.layout import project_paths
from analysis.core.ranking import first_by, ordered, positions_and_ranks, rounded, tie_label
from analysis.statistics.resampling import rng_for, sign_flips
from test_stats import settings

SETTINGS = settings(rank_decimals=4, alpha=0.05, n_permutations=10_000)


def test_rounding_decides_ties_and_the_key_breaks_them():
    table = pd.DataFrame({"layer": [2, 2, 2, 0], "head": [2, 0, 1, 3],
                          "score": [1.00000004, 0.99999997, 1.00000001, 0.5]})
    position, rank, tied = positions_and_ranks(table, "score", 4)
    # the three near-equal scores are one tie at 4 decimals, ordered L2H0, L2H1, L2H2
    assert list(position) == [3, 1, 2, 4] and list(rank) == [1, 1, 1, 4]
    assert list(tied) == [True, True, True, False]
    # at 9 decimals they differ and the score decides
    position, rank, tied = positions_and_ranks(table, "score", 9)
    assert list(position) == [1, 3, 2, 4] and list(rank) == [1, 3, 2, 4] and not tied.any()


def test_orders_do_not_depend_on_noise_below_the_precision():
    rng = np.random.default_rng(3)
    base = pd.DataFrame({"layer": np.repeat(np.arange(4), 4), "head": np.tile(np.arange(4), 4),
                         "score": np.round(rng.normal(size=16), 2)})
    base.loc[[1, 6, 9], "score"] = 0.37  # a three-way tie
    for seed in range(20):
        noisy = base.assign(score=base["score"] * (1 + 1e-7 * np.random.default_rng(seed).uniform(-1, 1, 16)))
        assert list(ordered(noisy, "score", 4, descending=True).index) == list(ordered(base, "score", 4, descending=True).index)
        assert [list(x) for x in positions_and_ranks(noisy, "score", 4)] == \
               [list(x) for x in positions_and_ranks(base, "score", 4)]


def test_rounded_and_first_by_and_labels():
    assert list(rounded([0.123449, -0.00001, np.nan], 4)[:2]) == [0.1234, 0.0]
    assert str(rounded([-0.00001], 4)[0]) == "0.0", "no negative zero"
    t = pd.DataFrame({"layer": [3, 1, 2], "head": [0, 0, 0], "contrast": [-0.30001, 0.3, 0.1]})
    assert first_by(t, "contrast", 4, absolute=True)["layer"] == 1, "tied |contrast|: the lower layer"
    assert first_by(t, "contrast", 6, absolute=True)["layer"] == 3
    assert tie_label("L2H0", 1, True) == "L2H0 (=1)" and tie_label("L3H5", 2, False) == "L3H5"


def test_top_compression_layers_round_before_ranking():
    layers = np.arange(5)
    delta = np.array([-0.02, -0.05000001, -0.04999999, 0.01, -0.00001])
    # layers 1 and 2 tie at 4 decimals (layer order); layer 4 prints as 0.0000: no compression layer
    assert top_compression_layers(layers, delta, 4) == {"rank_1": 1, "rank_2": 2, "rank_3": 0}
    assert top_compression_layers(layers, delta, 9) == {"rank_1": 1, "rank_2": 2, "rank_3": 0, "rank_4": 4}


def test_clone_heads_tie_in_the_heads_table():
    """Three heads with identical entropies up to 1e-9 (clones, as in demo_stages) share rank 1 in any order of noise."""
    rng = np.random.default_rng(0)
    categories = np.repeat(["self_referent", "neutral"], 6)
    base = rng.gamma(20.0, 0.1, size=(12, 2, 4))
    base[:, 1, 1] = base[:, 1, 2] = base[:, 1, 3] = base[:, 1, 0]
    instruct = base.copy()
    instruct[:6, 1, :] += 0.5  # every clone loses focus on self-referent prompts alike
    signs = sign_flips(12, 50, rng_for(1, "t"))
    for seed in range(5):
        noise = 1 + 1e-9 * np.random.default_rng(seed).uniform(-1, 1, size=base.shape)
        t = head_scores(base * noise, instruct * noise, categories, signs, top_k=2, decimals=4)
        clones = t[t["layer"] == 1]
        assert list(clones["rank"]) == [1, 1, 1, 1] and clones["tied"].all()
        assert list(clones["position"]) == [1, 2, 3, 4] and list(t["top_k"]) == [False] * 4 + [True, True, False, False]


def _write(root, name, payload):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, pd.DataFrame):
        payload.to_parquet(path)
    else:
        path.write_text(json.dumps(payload))


def _build(root, delta_rfc, q, rank, top_heads, lo):
    _write(root, "data/stats/deltas.parquet", pd.DataFrame({
        "family": ["a", "a"], "layer": [0, 1], "delta_rfc": delta_rfc, "delta_rfc_lo": lo, "delta_rfc_hi": [0.02, 0.03],
        "q_value": q, "layer_class": ["compression", "no_change"]}))
    _write(root, "data/stats/heads.parquet", pd.DataFrame({"family": ["a", "a"], "layer": [0, 1], "head": [0, 0],
                                                           "rank": rank, "position": rank}))
    _write(root, "data/stats/metrics.json", {"families": {"a": {"mean_delta_rfc": float(np.mean(delta_rfc)),
                                                                 "top_heads": top_heads}}})


def test_a_rebuild_within_noise_changes_nothing(tmp_path):
    _build(tmp_path / "pub", [-0.0200001, 0.0], [0.01, 0.5], [1, 2], {"rank_1": "L0H0"}, [-0.03, -0.01])
    _build(tmp_path / "new", [-0.0199999, 1e-9], [0.0100001, 0.5], [1, 2], {"rank_1": "L0H0"}, [-0.03, -0.01])
    c = compare_folders(tmp_path / "pub", tmp_path / "new", SETTINGS)
    assert c.ok and not c.beyond_tolerance and not c.borderline and not c.changed, c.lines("pub")
    assert c.n_numbers == 9 and c.n_conclusions > 8


def test_changed_conclusions_are_named(tmp_path):
    _build(tmp_path / "pub", [-0.02, 0.0], [0.01, 0.5], [1, 2], {"rank_1": "L0H0"}, [-0.03, -0.01])
    _build(tmp_path / "new", [-0.02, 0.0], [0.06, 0.5], [2, 1], {"rank_1": "L1H0"}, [0.001, -0.01])
    c = compare_folders(tmp_path / "pub", tmp_path / "new", SETTINGS)
    kinds = {(where.split(": ", 1)[0], kind) for where, kind, _, _ in c.changed}
    assert ("data/stats/deltas.parquet[family=a, layer=0].q_value", "significance (< 0.05)") in \
           {(w, k) for w, k, _, _ in c.changed}
    assert ("data/stats/metrics.json", "rank") in kinds
    assert any(k == "interval sign" for _, k, _, _ in c.changed)
    assert sum(k == "rank" for _, k, _, _ in c.changed) == 5  # two rank and two position cells, one metric
    assert not c.ok and any("CHANGED rank" in line for line in c.lines("pub"))


def test_a_threshold_crossed_within_tolerance_is_borderline(tmp_path):
    _build(tmp_path / "pub", [-0.02, 0.00006], [0.04999, 0.5], [1, 2], {"rank_1": "L0H0"}, [-0.03, -0.01])
    _build(tmp_path / "new", [-0.02, 0.00004], [0.05001, 0.5], [1, 2], {"rank_1": "L0H0"}, [-0.03, -0.01])
    c = compare_folders(tmp_path / "pub", tmp_path / "new", SETTINGS)
    assert c.ok and not c.changed
    assert {k for _, k, _, _ in c.borderline} == {"significance (< 0.05)", "sign"}


def test_published_artefacts_are_the_built_ones():
    assert is_published("data/stats/heads.parquet") and is_published("data/patching/demo_llama.json")
    assert not is_published("data/patching/demo_llama.prompts.parquet")
    assert not is_published("data/prompts.csv") and not is_published("data/models/demo_llama/demo_llama-base.json")
    assert is_published("data/original/reanalysis.json") and not is_published("data/original/claims.yaml")


def test_against_a_revision_reads_it_with_git(tmp_path):
    root = tmp_path / "repo"
    _build(root, [-0.02, 0.0], [0.01, 0.5], [1, 2], {"rank_1": "L0H0"}, [-0.03, -0.01])
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=root, check=True)
    _build(root, [-0.02, 0.0], [0.01, 0.5], [2, 1], {"rank_1": "L0H0"}, [-0.03, -0.01])
    sha, c = compare_with_revision(project_paths(root), "HEAD", SETTINGS)
    assert len(sha) == 40 and {k for _, k, _, _ in c.changed} == {"rank"}
    with pytest.raises(UserError, match="--against nope: not a commit"):
        compare_with_revision(project_paths(root), "nope", SETTINGS)
