"""Known answers: the statistics recover the effects planted in the demo suite, and nothing else.

The study is recomputed here from entropy tables extracted afresh from the demo checkpoints (with fewer
resamples than params.yaml asks, for speed), so these tests fail when the statistics code is wrong,
whatever the tracked artefacts say. The calibration test builds its own null checkpoints.
"""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analysis.core import config
from analysis.models import synthetic
from analysis.extraction.runner import extract_checkpoint
from analysis.statistics.layers import build_statistics
from analysis.core.quantities import PROMPT_FORMATS, choice_rows
from analysis.statistics.study import build_study
from conftest import REPO_CONFIG

pytestmark = pytest.mark.slow  # extracts every demo family (make test-fast leaves it out)

STATS = dataclasses.replace(REPO_CONFIG.stats, n_resamples=1000, n_permutations=1000, split_half_splits=200)
EXTRACT = dataclasses.replace(REPO_CONFIG.extract, device="cpu")
ALPHA = STATS.alpha
SUITE = {c.name: c for c in REPO_CONFIG.suites["demo"]}


def _kind(family: str) -> str:
    """What the demo spec plants: compression (base focuses, instruct does not), gain (instruct focuses, base does
    not), kept_focus (both focus: nothing changes), null (nothing planted)."""
    base, instruct = SUITE[f"{family}-base"].demo, SUITE[f"{family}-instruct"].demo
    if not base["planted"]:
        return "null"
    if base["self_focus"] and instruct["self_focus"]:
        return "kept_focus"
    return "compression" if base["self_focus"] else "gain"


# The base-vs-instruct families; the staged demo family has its own known answers (tests/test_stages.py).
FAMILIES = sorted(f for f, stages in config.family_stages(REPO_CONFIG.suites["demo"]).items() if len(stages) == 2)
BY_KIND = {k: [f for f in FAMILIES if _kind(f) == k] for k in ("compression", "gain", "kept_focus", "null")}


def _planted(family: str) -> list[tuple[int, int]]:
    return [tuple(x) for x in SUITE[f"{family}-base"].demo["planted"]]


def _entropy(demo_dir, prompts, families) -> dict[str, pd.DataFrame]:
    """Entropy tables of the demo checkpoints of `families`, per prompt format, extracted now."""
    out = {}
    for prompt_format in PROMPT_FORMATS:
        frames = []
        for family in families:
            for variant in ("base", "instruct"):
                frames.append(extract_checkpoint(
                    demo_dir(family, variant), prompts, checkpoint=f"{family}-{variant}", family=family,
                    variant=variant, settings=EXTRACT, prompt_format=prompt_format,
                    chat_dir=demo_dir(family, "instruct") if prompt_format == "chat" else None))
        out[prompt_format] = pd.concat(frames, ignore_index=True)
    return out


@pytest.fixture(scope="module")
def entropy(demo_dir, prompts):
    return _entropy(demo_dir, prompts, FAMILIES)


@pytest.fixture(scope="module")
def study(entropy):
    return build_study(entropy, STATS)


@pytest.fixture(scope="module")
def deltas(study):
    return study["deltas"]


@pytest.fixture(scope="module")
def headline(deltas):
    return choice_rows(deltas, STATS.headline_definition, STATS.headline_format)


def test_the_demo_suite_has_every_kind_of_family():
    """Two compression families, one gain family, one family whose planted heads keep their focus and two null
    families among the base-vs-instruct families (demo_null, and demo_probe, whose base and instruct differ only in
    what a head writes to the residual stream: tests/test_probes.py); the staged family is tested in
    tests/test_stages.py."""
    assert [len(BY_KIND[k]) for k in ("compression", "gain", "kept_focus", "null")] == [2, 1, 1, 2]


@pytest.mark.parametrize("family", BY_KIND["gain"])
def test_gain_is_significant_at_the_planted_layers_and_classed_gain(study, headline, family):
    """Instruct gains a self-focus head: ΔRFC > 0 with its whole CI above 0 and q < alpha at the planted layer,
    classed `gain`, and by far the largest |ΔRFC| of the family (the layers after it only feel its changed output:
    measured |ΔRFC| < 0.002 against 0.13); the layers before it do not change at all; the planted head ranks
    first with q < alpha and did < 0 (self entropy falls)."""
    rows = headline[headline["family"] == family].set_index("layer")
    planted_layers = {layer for layer, _ in _planted(family)}
    for layer in planted_layers:
        row = rows.loc[layer]
        assert row["delta_rfc"] > 0 and row["delta_rfc_lo"] > 0 and row["q_value"] < ALPHA
        assert row["layer_class"] == "gain"
        others = rows.drop(index=list(planted_layers))
        assert others["delta_rfc"].abs().max() * 10 < row["delta_rfc"]
        before = rows[rows.index < layer]
        assert (before["delta_rfc"] == 0).all() and (before["layer_class"] == "no_change").all()
    heads = choice_rows(study["heads"], STATS.headline_definition, STATS.headline_format)
    top = heads[heads["family"] == family].nsmallest(1, "rank")
    assert set(zip(top["layer"], top["head"])) == set(_planted(family))
    assert (top["q_value"] < ALPHA).all() and (top["did"] < 0).all()
    assert study["metrics"]["families"][family]["share_gain"] > 0


@pytest.mark.parametrize("family", BY_KIND["compression"])
def test_compression_is_significant_at_the_planted_layers(headline, family):
    """ΔRFC < 0 with its whole CI below 0 and q < alpha at every planted layer."""
    rows = headline[headline["family"] == family].set_index("layer")
    for layer in {layer for layer, _ in _planted(family)}:
        row = rows.loc[layer]
        assert row["delta_rfc"] < 0 and row["delta_rfc_hi"] < 0 and row["q_value"] < ALPHA
        assert row["layer_class"] == "compression"


@pytest.mark.parametrize("family", BY_KIND["compression"])
def test_planted_heads_are_the_top_ranked(study, family):
    """The planted heads take the top ranks of the family's head table, each with q < alpha."""
    heads = choice_rows(study["heads"], STATS.headline_definition, STATS.headline_format)
    heads = heads[heads["family"] == family]
    planted = set(_planted(family))
    top = heads.nsmallest(len(planted), "rank")
    assert set(zip(top["layer"], top["head"])) == planted
    assert (top["q_value"] < ALPHA).all() and (top["did"] > 0).all()


@pytest.mark.parametrize("family", BY_KIND["kept_focus"] + BY_KIND["null"])
def test_no_layer_or_head_flagged_where_nothing_changed(study, headline, family):
    """Kept-focus (focus in both variants) and null families: no layer and no head flagged, and no correlation
    with any other family (their ΔRFC profiles carry no signal)."""
    rows = headline[headline["family"] == family]
    assert (rows["layer_class"] == "no_change").all()
    heads = study["heads"]
    assert not (heads.loc[heads["family"] == family, "q_value"] < ALPHA).any()  # null q: no change to test
    assert rows.loc[rows["delta_rfc"] == 0, "p_value"].isna().all()  # exact zeros get no p (docs/method.md)
    for key, pair in study["metrics"]["pairs"].items():
        if family in key.split("~"):
            assert pair["pearson_r"] is None and pair["pearson_p_shift"] is None
            assert pair["undefined_reason"].startswith("no signal"), (key, pair["undefined_reason"])


@pytest.mark.parametrize("family", BY_KIND["compression"])
def test_planted_compression_survives_every_definition_and_format(study, deltas, family):
    """Issue robustness: every entropy definition and both prompt formats find it at the planted layers."""
    rows = deltas[deltas["family"] == family]
    choices = rows.groupby(["definition", "format"])
    assert len(choices) == len(STATS.definitions) * len(PROMPT_FORMATS)
    for (definition, fmt), part in choices:
        for layer in {layer for layer, _ in _planted(family)}:
            row = part.set_index("layer").loc[layer]
            assert row["layer_class"] == "compression", (definition, fmt, layer)
    table = study["robustness"]
    mine = table[table["family"] == family]
    assert (mine["conclusion"] == "compression").all() and not mine["differs"].any()


def test_split_half_reliability_high_for_planted_and_undefined_for_null(study):
    """A planted profile replicates across halves of the prompts; the exact null has no profile at all
    (ΔRFC is 0 in every layer of every half), so its reliability is undefined, not 0."""
    split = study["split_half"].set_index("family")
    for family in BY_KIND["compression"]:
        assert split.loc[family, "split_half_r"] > 0.9
    for family in BY_KIND["null"]:
        assert np.isnan(split.loc[family, "split_half_r"]) and split.loc[family, "n_splits_defined"] == 0
        assert study["metrics"]["robustness"][family]["split_half_r"] is None


def test_adding_a_family_leaves_the_others_numbers_unchanged(demo_dir, prompts, study):
    """Every family draws from its own random streams: the study of two families gives those two
    families exactly the numbers they have in the study of all four."""
    pair = BY_KIND["compression"]
    small = build_study(_entropy(demo_dir, prompts, pair), STATS)
    for key in ("deltas", "heads", "split_half", "length_control"):
        full = study[key][study[key]["family"].isin(pair)].reset_index(drop=True)
        pd.testing.assert_frame_equal(small[key].reset_index(drop=True), full, check_exact=True)
    for family in pair:
        assert small["metrics"]["families"][family] == study["metrics"]["families"][family]


def test_metrics_agree_with_the_tables(study, headline):
    """Headline numbers in metrics.json are the tables' numbers (no second source of truth)."""
    metrics = study["metrics"]
    for family, values in metrics["families"].items():
        rows = headline[headline["family"] == family]
        assert values["mean_delta_rfc"] == pytest.approx(rows["delta_rfc"].mean(), rel=1e-5, abs=1e-9)
        assert values["share_compression"] == pytest.approx((rows["layer_class"] == "compression").mean(), abs=1e-6)
        assert values["n_layers"] == len(rows)


@pytest.mark.slow
def test_null_family_calibration_over_20_seeds(prompts, tmp_path):
    """Twenty null families (fresh seeds): mean share of FDR-flagged layers <= alpha, and in most seeds
    no head reaches q < alpha."""
    subset = prompts.groupby("category", sort=False).head(12).reset_index(drop=True)
    settings = dataclasses.replace(STATS, n_resamples=200, n_permutations=999, definitions=("raw",),
                                   headline_definition="raw")
    flagged_share, any_head = [], []
    for seed in range(20):
        frames = []
        for variant in ("base", "instruct"):
            demo = {**SUITE[f"demo_null-{variant}"].demo, "seed": 5000 + seed}
            folder = tmp_path / f"{seed}-{variant}"
            synthetic.generate(demo, list(prompts["text"]), folder, where=f"null seed {seed}")
            frames.append(extract_checkpoint(folder, subset, checkpoint=f"null-{variant}", family="null",
                                             variant=variant, settings=EXTRACT))
        result = build_statistics(pd.concat(frames, ignore_index=True), settings)
        flagged_share.append(float((result["deltas"]["q_value"] < ALPHA).mean()))
        any_head.append(bool((result["heads"]["q_value"] < ALPHA).any()))
    assert np.mean(flagged_share) <= ALPHA
    assert sum(any_head) <= 10
