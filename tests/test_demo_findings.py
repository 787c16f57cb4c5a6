"""Known answers: the statistics recover the effects planted in the demo suite, and nothing else.

The first tests read the tracked artefacts of the demo suite (data/stats), which the slow end-to-end
test regenerates from scratch and compares; the calibration test builds its own null checkpoints.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import params as params_mod
from analysis import synthetic
from analysis.inference import extract_checkpoint
from analysis.metrics import build_statistics
from analysis.paths import DELTAS, HEADS, METRICS, ROBUSTNESS, SPLIT_HALF
from analysis.artefacts import read_json

REPO = Path(__file__).resolve().parent.parent
PARAMS = params_mod.load(REPO / "params.yaml")
ALPHA = PARAMS["stats"]["alpha"]


def _kind(family: str) -> str:
    """What the demo spec plants: compression (base focuses, instruct does not), preservation (both), null."""
    spec = PARAMS["suites"]["demo"]["families"][family]
    base, instruct = spec["base"]["demo"], spec["instruct"]["demo"]
    if not base["planted"]:
        return "null"
    return "compression" if base["self_focus"] and not instruct["self_focus"] else "preservation"


FAMILIES = sorted(PARAMS["suites"]["demo"]["families"])
BY_KIND = {k: [f for f in FAMILIES if _kind(f) == k] for k in ("compression", "preservation", "null")}


def _planted(family: str) -> list[tuple[int, int]]:
    return [tuple(x) for x in PARAMS["suites"]["demo"]["families"][family]["base"]["demo"]["planted"]]


@pytest.fixture(scope="module")
def deltas():
    return pd.read_parquet(DELTAS)


@pytest.fixture(scope="module")
def headline(deltas):
    s = PARAMS["stats"]
    return deltas[(deltas["definition"] == s["headline_definition"]) & (deltas["format"] == s["headline_format"])]


def test_the_demo_suite_has_every_kind_of_family():
    """Two compression families, one preservation family and one null family (issue: planted effects)."""
    assert len(BY_KIND["compression"]) == 2 and len(BY_KIND["preservation"]) == 1 and len(BY_KIND["null"]) == 1


@pytest.mark.parametrize("family", BY_KIND["compression"])
def test_compression_is_significant_at_the_planted_layers(headline, family):
    """ΔRFC < 0 with its whole CI below 0 and q < alpha at every planted layer."""
    rows = headline[headline["family"] == family].set_index("layer")
    for layer in {layer for layer, _ in _planted(family)}:
        row = rows.loc[layer]
        assert row["delta_rfc"] < 0 and row["delta_rfc_hi"] < 0 and row["q_value"] < ALPHA
        assert row["layer_class"] == "compression"


@pytest.mark.parametrize("family", BY_KIND["compression"])
def test_planted_heads_are_the_top_ranked(family):
    """The planted heads take the top ranks of the family's head table, each with q < alpha."""
    s = PARAMS["stats"]
    heads = pd.read_parquet(HEADS)
    heads = heads[(heads["family"] == family) & (heads["definition"] == s["headline_definition"])
                  & (heads["format"] == s["headline_format"])]
    planted = set(_planted(family))
    top = heads.nsmallest(len(planted), "rank")
    assert set(zip(top["layer"], top["head"])) == planted
    assert (top["q_value"] < ALPHA).all() and (top["did"] > 0).all()


@pytest.mark.parametrize("family", BY_KIND["preservation"] + BY_KIND["null"])
def test_no_layer_or_head_flagged_where_nothing_changed(headline, family):
    """Preservation (focus in both variants) and null families: no layer and no head flagged."""
    rows = headline[headline["family"] == family]
    assert (rows["layer_class"] == "no_change").all()
    heads = pd.read_parquet(HEADS)
    assert (heads.loc[heads["family"] == family, "q_value"] >= ALPHA).all()


@pytest.mark.parametrize("family", BY_KIND["compression"])
def test_planted_compression_survives_every_definition_and_format(deltas, family):
    """Issue robustness: every entropy definition and both prompt formats find it at the planted layers."""
    rows = deltas[deltas["family"] == family]
    choices = rows.groupby(["definition", "format"])
    assert len(choices) == len(PARAMS["stats"]["definitions"]) * 2
    for (definition, fmt), part in choices:
        for layer in {layer for layer, _ in _planted(family)}:
            row = part.set_index("layer").loc[layer]
            assert row["layer_class"] == "compression", (definition, fmt, layer)
    table = pd.read_parquet(ROBUSTNESS)
    mine = table[table["family"] == family]
    assert (mine["conclusion"] == "compression").all() and not mine["differs"].any()


def test_split_half_reliability_high_for_planted_and_zero_for_null():
    """A planted profile replicates across halves of the prompts; the null family's does not exist."""
    split = pd.read_parquet(SPLIT_HALF).set_index("family")
    for family in BY_KIND["compression"]:
        assert split.loc[family, "split_half_r"] > 0.9
    for family in BY_KIND["null"]:
        assert abs(split.loc[family, "split_half_r"]) < 0.2


def test_metrics_json_agrees_with_the_tables(headline):
    """Headline numbers in metrics.json are the tables' numbers (no second source of truth)."""
    metrics = read_json(METRICS)
    for family, values in metrics["families"].items():
        rows = headline[headline["family"] == family]
        assert values["mean_delta_rfc"] == pytest.approx(rows["delta_rfc"].mean(), rel=1e-5, abs=1e-9)
        assert values["share_compression"] == pytest.approx((rows["layer_class"] == "compression").mean(), abs=1e-6)
        assert values["n_layers"] == len(rows)


@pytest.mark.slow
def test_null_family_calibration_over_20_seeds(prompts, tmp_path):
    """Twenty null families (fresh seeds): mean share of FDR-flagged layers <= alpha, and in most seeds
    no head reaches q < alpha."""
    spec = PARAMS["suites"]["demo"]["families"]["demo_null"]
    subset = prompts.groupby("category", sort=False).head(12).reset_index(drop=True)
    settings = {**PARAMS["stats"], "n_resamples": 200, "n_permutations": 999, "definitions": ["raw"],
                "headline_definition": "raw"}
    flagged_share, any_head = [], []
    for seed in range(20):
        frames = []
        for variant in ("base", "instruct"):
            demo = {**spec[variant]["demo"], "seed": 5000 + seed}
            folder = tmp_path / f"{seed}-{variant}"
            synthetic.generate(demo, list(prompts["text"]), folder, where=f"null seed {seed}")
            frames.append(extract_checkpoint(folder, subset, checkpoint=f"null-{variant}", family="null",
                                             variant=variant, settings={**PARAMS["extract"], "device": "cpu"}))
        result = build_statistics(pd.concat(frames, ignore_index=True), settings)
        flagged_share.append(float((result["deltas"]["q_value"] < ALPHA).mean()))
        any_head.append(bool((result["heads"]["q_value"] < ALPHA).any()))
    assert np.mean(flagged_share) <= ALPHA
    assert sum(any_head) <= 10
