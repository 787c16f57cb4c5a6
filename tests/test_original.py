"""The original study's tables: checksums, every recomputed value against plain numpy/scipy on its CSVs,
the claims its tables do not reproduce, and the stage end to end."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from analysis import cli
from analysis.core import config
from analysis.core.errors import UserError
from analysis.core.layout import project_paths
from analysis.statistics.original_study import Build, band_statistics, check_files, load_claims, match_build, reanalyse

REPO = Path(__file__).resolve().parent.parent
ORIGINAL = REPO / "data" / "original"
REPO_CONFIG = config.load(project_paths(REPO))
SETTINGS = dataclasses.replace(REPO_CONFIG.stats, near_zero=0.01, depth_grid=20, confidence=0.95)
NO_BUILD = Build(dict.fromkeys(("llama", "mistral", "qwen")), "no build in this test")


def profile(family: str) -> np.ndarray:
    frame = pd.read_csv(ORIGINAL / "figures" / family / "comparison" / "detailed_comparison.csv")
    return frame.sort_values("layer")["rfc_diff"].to_numpy()


@pytest.fixture(scope="module")
def result():
    return reanalyse(ORIGINAL, ORIGINAL / "SHA256SUMS", ORIGINAL / "claims.yaml", SETTINGS, NO_BUILD)


def test_checksums_match_the_copied_files_and_the_readme():
    sums = check_files(ORIGINAL, ORIGINAL / "SHA256SUMS")
    assert len(sums) == 8
    readme = (ORIGINAL / "README.md").read_text(encoding="utf-8")
    for name, digest in sums.items():
        assert digest in readme and name in readme, f"README does not list {name}"


def test_a_changed_file_is_named(tmp_path):
    copy = tmp_path / "original"
    shutil.copytree(ORIGINAL, copy)
    target = copy / "figures" / "qwen" / "comparison" / "detailed_comparison.csv"
    target.write_text(target.read_text().replace("0.", "1.", 1))
    with pytest.raises(UserError, match="qwen/comparison/detailed_comparison.csv: SHA-256"):
        check_files(copy, copy / "SHA256SUMS")
    target.unlink()
    with pytest.raises(UserError, match="detailed_comparison.csv: missing"):
        check_files(copy, copy / "SHA256SUMS")


def test_family_values_equal_plain_numpy(result):
    families = result["reanalysis"]["families"]
    for family in ("llama", "mistral", "qwen"):
        d = profile(family)
        got = families[family]
        assert got["n_layers"] == d.size
        assert got["n_heads"] == 28
        assert got["mean_delta_rfc"] == pytest.approx(d.mean(), rel=1e-5)
        assert got["share_below_minus_near_zero"] == pytest.approx(np.sum(d < -0.01) / d.size, rel=1e-5)
        assert got["share_near_zero"] == pytest.approx(np.sum(np.abs(d) <= 0.01) / d.size, rel=1e-5)
        assert got["share_above_near_zero"] == pytest.approx(np.sum(d > 0.01) / d.size, rel=1e-5)
        expected_top = [int(i) for i in np.argsort(d) if d[i] < 0][:5]
        assert list(got["top_compression_layers"].values()) == expected_top
    assert list(families["llama"]["top_compression_layers"].values()) == [14, 18, 13, 2, 15]


def _shift_p(x: np.ndarray, y: np.ndarray) -> float:
    """Circular-shift p by a plain loop: (1 + #{k: |r(x, roll(y, k))| >= |r|}) / n."""
    r = np.corrcoef(x, y)[0, 1]
    hits = sum(abs(np.corrcoef(x, np.roll(y, k))[0, 1]) >= abs(r) - 1e-12 for k in range(1, x.size))
    return (1 + hits) / x.size


def test_pairs_equal_scipy_on_the_same_grid(result):
    pairs = result["reanalysis"]["pairs"]
    llama, mistral, qwen = profile("llama"), profile("mistral"), profile("qwen")
    same = pairs["llama~mistral"]
    assert same["grid"] == "layer" and same["n_points"] == 32
    assert same["pearson_r"] == pytest.approx(stats.pearsonr(llama, mistral).statistic, rel=1e-5)
    assert same["pearson_p"] == pytest.approx(stats.pearsonr(llama, mistral).pvalue, rel=1e-5)
    assert same["spearman_r"] == pytest.approx(stats.spearmanr(llama, mistral).statistic, rel=1e-5)
    assert same["spearman_p"] == pytest.approx(stats.spearmanr(llama, mistral).pvalue, rel=1e-5)
    assert same["pearson_p_shift"] == pytest.approx(_shift_p(llama, mistral))
    assert same["spearman_p_shift"] == pytest.approx(_shift_p(stats.rankdata(llama), stats.rankdata(mistral)))
    # Qwen has 28 layers: both profiles interpolated at 20 relative depths both cover
    grid = np.linspace(0.5 / 28, 1 - 0.5 / 28, 20)
    x = np.interp(grid, (np.arange(32) + 0.5) / 32, mistral)
    y = np.interp(grid, (np.arange(28) + 0.5) / 28, qwen)
    other = pairs["mistral~qwen"]
    assert other["grid"] == "relative_depth" and other["n_points"] == 20
    assert other["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-5)
    assert other["pearson_p_shift"] == pytest.approx(_shift_p(x, y))


def test_published_claims_reproduced_or_not(result):
    claims = result["claims"].set_index("claim")
    not_reproduced = set(claims.index[~claims["reproduced"]])
    # the Qwen summary was computed from an earlier Qwen table; README line 197 is an older correlation
    assert not_reproduced == {"mean_delta_rfc:qwen", "share_near_zero:qwen", "pearson_r_older:llama~mistral",
                              "pearson_p_older:llama~mistral"}
    assert claims.loc["mean_delta_rfc:qwen", "recomputed_value"] == pytest.approx(profile("qwen").mean())
    assert claims.loc["mean_delta_rfc:qwen", "published_value"] == 0.0475
    assert claims.loc["pearson_r:llama~mistral", "autocorr_p"] == pytest.approx(
        _shift_p(profile("llama"), profile("mistral")))
    assert claims.loc["top_heads:mistral", "recomputed_text"] == "L27H5 L9H26 L15H16"
    assert claims.loc["prompts_per_category:llama", "recomputed_value"] == 30
    assert claims["build_note"].eq("no build in this test").all()
    assert claims["build_value"].isna().all()
    assert result["reanalysis"]["n_reproduced"] == len(claims) - 4


def test_reproduction_rule_is_half_a_unit_of_the_last_digit(tmp_path):
    spec = yaml.safe_load((ORIGINAL / "claims.yaml").read_text())
    spec["claims"] = [
        {"id": "a", "quantity": "mean_delta_rfc", "subject": "llama", "value": -0.0233, "decimals": 4, "text": "t"},
        {"id": "b", "quantity": "mean_delta_rfc", "subject": "llama", "value": -0.0232, "decimals": 4, "text": "t"},
        {"id": "c", "quantity": "mean_delta_rfc", "subject": "llama", "value": -0.02, "decimals": 2, "text": "t"}]
    copy = tmp_path / "claims.yaml"
    copy.write_text(yaml.safe_dump(spec, allow_unicode=True))
    out = reanalyse(ORIGINAL, ORIGINAL / "SHA256SUMS", copy, SETTINGS, NO_BUILD)["claims"]
    assert list(out["reproduced"]) == [True, False, True]  # mean is -0.0232687


def test_unknown_quantity_is_rejected(tmp_path):
    spec = yaml.safe_load((ORIGINAL / "claims.yaml").read_text())
    spec["claims"][0]["quantity"] = "median"
    copy = tmp_path / "claims.yaml"
    copy.write_text(yaml.safe_dump(spec, allow_unicode=True))
    with pytest.raises(UserError, match="unknown quantity 'median'"):
        load_claims(copy)


def test_band_statistics_by_hand():
    d = np.array([0.0, -0.1, -0.3, -0.2, 0.1, 0.0])
    b = band_statistics(d, (1, 3))
    assert b["min_layer"] == 2 and b["holds"]
    assert b["band_mean"] == pytest.approx(-0.2) and b["other_mean"] == pytest.approx(0.1 / 3)
    assert b["best_window"] == (1, 3)
    inside = np.array([0, 1, 1, 1, 0, 0], float)
    assert b["p_shift"] == pytest.approx(_shift_p(inside, d))
    assert not band_statistics(d, (3, 5))["holds"]


def test_build_matches_by_repository_not_by_name():
    spec = load_claims(ORIGINAL / "claims.yaml")
    suites = REPO_CONFIG.suites
    matches, reason = match_build(spec, suites["demo"], "demo")
    assert set(matches.values()) == {None} and "synthetic" in reason
    matches, reason = match_build(spec, suites["paper"], "paper")
    assert matches == {"llama": "llama31_8b", "mistral": "mistral_7b", "qwen": "qwen25_7b"} and reason is None
    matches, reason = match_build(spec, suites["laptop"], "laptop")
    assert set(matches.values()) == {None} and "laptop" in reason


def test_build_values_use_the_same_functions_on_the_build_profile():
    """A build whose families carry the original's own profiles gives back the recomputed values."""
    rows, heads = [], []
    for family in ("llama", "mistral", "qwen"):
        d = profile(family)
        rows.append(pd.DataFrame({"definition": "raw", "format": "raw", "family": f"b_{family}",
                                  "layer": np.arange(d.size), "delta_rfc": d}))
        heads.append(pd.DataFrame({"definition": "raw", "format": "raw", "family": f"b_{family}",
                                   "layer": [5, 16, 14], "head": [8, 23, 3], "position": [1, 2, 3]}))
    metrics = {"families": {f"b_{f}": {"n_prompts": {"self_referent": 40, "neutral": 41}} for f in ("llama", "mistral", "qwen")}}
    build = Build({f: f"b_{f}" for f in ("llama", "mistral", "qwen")}, None, pd.concat(rows), pd.concat(heads), metrics)
    claims = reanalyse(ORIGINAL, ORIGINAL / "SHA256SUMS", ORIGINAL / "claims.yaml", SETTINGS, build)["claims"]
    numeric = claims[claims["quantity"].isin(["mean_delta_rfc", "share_below", "share_near_zero", "pearson_r",
                                             "spearman_p", "compression_band"])]
    np.testing.assert_allclose(numeric["build_value"], numeric["recomputed_value"], rtol=1e-12)
    claims = claims.set_index("claim")
    assert claims.loc["prompts_per_category:llama", "build_value"] == 40
    assert claims.loc["top_heads:llama", "build_text"].startswith("L5H8 L16H23 L14H3")
    assert claims["build_note"].isna().all()


def test_stage_writes_both_artefacts(project):
    shutil.copytree(ORIGINAL, project / "data" / "original",
                    ignore=shutil.ignore_patterns("reanalysis*"))
    cli.original()
    paths = project_paths()
    assert paths.root == project
    document = json.loads(paths.reanalysis.read_text())
    table = pd.read_parquet(paths.reanalysis_claims)
    assert document["n_claims"] == len(table) == len(load_claims(paths.original_claims)["claims"])
    assert document["claims"]["mean_delta_rfc:llama"]["reproduced"] is True
    assert table["build_note"].str.contains("synthetic").all()
