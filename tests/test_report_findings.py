"""What the report states first, computed from the tracked demo artefacts: each family's findings, planted against
recovered, and one meaning of "candidate heads" for the charts, the tables and the text."""

import json

import pandas as pd
import pytest

from analysis.core import config
from analysis.core.layout import project_paths
from analysis.core.quantities import WORDS, words
from analysis.report import charts, findings
from analysis.report.findings import head_role


def _inputs():
    cfg = config.load(project_paths())
    paths = cfg.paths
    stats = {n: pd.read_parquet(paths.stats_table(n)) for n in ("deltas", "heads", "head_families", "robustness")}
    patching = pd.concat([pd.read_parquet(paths.patch_table(f)) for f in cfg.families], ignore_index=True)
    summaries = {f: json.loads(paths.patch_summary(f).read_text()) for f in cfg.families}
    return cfg, stats, patching, summaries, json.loads(paths.metrics.read_text())


def test_planted_spec_is_read_from_params():
    """The demo spec's self-focus sets give the planted heads, sign, step and languages; demo_qwen keeps its focus
    in both variants, so nothing is planted there."""
    cfg, *_ = _inputs()
    planted = findings.planted_effects(cfg)
    assert planted["demo_llama"]["heads"] == [(2, 1), (3, 5)] and planted["demo_llama"]["sign"] == "compression"
    assert planted["demo_gain"]["sign"] == "gain" and planted["demo_gain"]["layers"] == [2]
    assert planted["demo_qwen"]["heads"] == [] and planted["demo_null"]["sign"] == "none"
    assert planted["demo_stages"]["steps"] == {(2, 0): "base → sft", (2, 1): "sft → dpo", (2, 2): "sft → dpo"}
    assert planted["demo_mistral"]["languages"] == ["en"]


def test_every_planted_aspect_is_recovered_in_the_demo():
    """The demo's statistics recover what was planted: layers, heads, sign, training step and language."""
    cfg, stats, _, _, metrics = _inputs()
    table = findings.planted_vs_recovered(cfg, stats["deltas"], stats["heads"], stats["head_families"], metrics)
    demo = {c.family for c in cfg.checkpoints if c.source == "demo"}  # the real checkpoints have nothing planted
    assert set(table["family"]) == demo
    assert table["agrees"].all(), table.to_string()
    row = table.set_index("family").loc["demo_mistral"]
    assert row["layers_recovered"] == "2, 4" and row["languages_recovered"] == "English"
    assert table.set_index("family").loc["demo_stages", "step_recovered"] == \
        "L2H0: base → sft, L2H1: sft → dpo, L2H2: sft → dpo"


def test_a_miss_is_reported_not_hidden():
    """A family whose recovered layers differ from the planted ones is flagged (agrees False)."""
    cfg, stats, _, _, metrics = _inputs()
    deltas = stats["deltas"].copy()
    deltas.loc[(deltas["family"] == "demo_llama") & (deltas["layer"] == 3), "layer_class"] = "no_change"
    table = findings.planted_vs_recovered(cfg, deltas, stats["heads"], stats["head_families"], metrics)
    row = table.set_index("family").loc["demo_llama"]
    assert not row["agrees"] and row["layers_recovered"] == "2"


def test_candidate_heads_mean_one_thing_in_charts_tables_and_text():
    """demo_null and demo_qwen change no head at q < alpha: they name no candidates; the heads the patch stage tested
    there are null checks, in the findings table and in the charts' panels alike."""
    cfg, stats, patching, summaries, _ = _inputs()
    table = findings.family_findings(cfg, stats["deltas"], stats["robustness"], stats["head_families"], patching,
                                     summaries).set_index("family")
    names = dict(zip(stats["head_families"]["family"], stats["head_families"]["names_candidates"]))
    tested = charts.tested_heads(patching, names)
    for family in ("demo_null", "demo_qwen"):
        assert not table.loc[family, "names_candidates"] and table.loc[family, "candidates"] == "none"
        assert table.loc[family, "null_checks"] != "none"
        assert set(tested.loc[tested["family"] == family, "role"]) == {"null_check"}
    for family in ("demo_llama", "demo_mistral", "demo_gain", "demo_stages"):
        assert table.loc[family, "candidates"] != "none" and table.loc[family, "null_checks"] == "none"
        assert set(tested.loc[tested["family"] == family, "role"]) == {"candidate"}
    assert head_role("control", False) == "control"
    assert "L2H1" in table.loc["demo_llama", "ablation_flags"]


def test_code_names_have_words():
    """Every class, intervention and language a chart or table shows has a word in the one label map."""
    from analysis.interventions.patching import INTERVENTIONS
    for code in ["compression", "gain", "no_change", *[iv.name for iv in INTERVENTIONS], "en", "zh", "es"]:
        assert code in WORDS and "_" not in words(code) and "@" not in words(code)


def test_single_checkpoint_summary_by_hand():
    """The real-checkpoint row of report/figures/single_checkpoints.parquet: the first-token mass is the mean of the
    variant's column over layers, heads and categories (headline format, English only), chat minus raw the mean and
    the count of layers at q < alpha; a base checkpoint without a chat format says why."""
    cfg = config.load(project_paths())
    single = [f for f, stages in cfg.stages.items() if len(stages) == 1]
    assert single, "the default suite has real single-checkpoint families"
    instruct = next(f for f in single if cfg.stages[f][0] == "instruct")
    base = next(f for f in single if cfg.stages[f][0] == "base")
    fmt, definition, alpha = cfg.stats.headline_format, cfg.stats.headline_definition, cfg.stats.alpha
    rows = [{"family": instruct, "category": c, "mass": m, "layer": 0, "head": h, "base": None, "instruct": v,
             "format": f, "language": lang}
            for c, m, h, v, f, lang in [("neutral", "first", 0, 0.2, fmt, "en"), ("self_referent", "first", 1, 0.6, fmt, "en"),
                                        ("neutral", "first", 0, 0.9, fmt, "zh"), ("neutral", "marker", 0, 0.9, fmt, "en"),
                                        ("neutral", "first", 0, 0.9, "other", "en")]]
    rows.append({"family": base, "category": "neutral", "mass": "first", "layer": 0, "head": 0, "base": 0.5,
                 "instruct": None, "format": fmt, "language": "en"})
    contrasts = pd.DataFrame({"family": instruct, "definition": definition, "language": "en", "layer": [0, 1, 2],
                              "delta_rfc": [0.1, -0.4, 0.0], "q_value": [alpha / 2, alpha, 0.5]})
    table = findings.single_checkpoints(cfg, pd.DataFrame(rows), contrasts).set_index("family")
    assert table.loc[instruct, "first_token_mass"] == pytest.approx(0.4)  # (0.2 + 0.6) / 2
    assert table.loc[instruct, "chat_mean_delta_rfc"] == pytest.approx(-0.1)
    assert table.loc[instruct, ["chat_n_layers_significant", "chat_n_layers"]].tolist() == [1, 3]  # q < alpha, strictly
    assert table.loc[base, "first_token_mass"] == pytest.approx(0.5) and pd.isna(table.loc[base, "chat_mean_delta_rfc"])
    assert "no chat template" in table.loc[base, "chat_reason"]
    assert set(table.index) == set(single)
