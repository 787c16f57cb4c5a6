"""`selfref verify` and `selfref explain` on a small project in tmp_path: a clean build reproduces, one
perturbed number (in metrics.json or in an entropy table) is named; every key has one provenance entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import importlib
import re

from analysis import cli
from analysis.core import config
from analysis.core.errors import UserError
from analysis.core.layout import project_paths
from analysis.audit.provenance import REGISTRY, all_keys, explain, lookup
from analysis.core.quantities import CATEGORIES as CATS, LANGUAGES
from entropy_tables import entropy_table as factory_table, prompt_frame
from analysis.audit.verification import numbers_agree, tolerance, verify_workspace

pytestmark = pytest.mark.slow  # runs the stats and original stages for every test (make test-fast leaves it out)

REPO = Path(__file__).resolve().parent.parent
SMALL = {"n_resamples": 100, "n_permutations": 100, "split_half_splits": 10}


def entropy_table(checkpoint: str, family: str, variant: str, seed: int, prompt_format: str,
                  language: str = "en") -> pd.DataFrame:
    """A small positive entropy table in the extract stage's long format: 3 prompts per category, 3 x 2 heads;
    a translation (`language` other than en) has its own prompt_ids and the English ones as source_id."""
    rng = np.random.default_rng(seed)
    categories = np.repeat(CATS, 3)
    sources = [f"{c[:4]}_{i:02d}" for i, c in enumerate(categories)]
    ids = sources if language == "en" else [f"{s}_{language}" for s in sources]
    shape = (categories.size, 3, 2)
    e = 1.5 + rng.gamma(4.0, 0.1, size=shape)
    n_tokens = 8 + np.arange(categories.size) % 4 + (0 if language == "en" else 2)
    return factory_table(e, prompt_frame(categories, ids, language=language, source_ids=sources), family=family,
                         variant=variant, checkpoint=checkpoint, prompt_format=prompt_format, n_tokens=n_tokens,
                         mass_first=rng.uniform(0.2, 0.8, size=shape), mass_marker=rng.uniform(0.0, 0.2, size=shape),
                         token_seed=language)  # the same token ids at every stage of a family


@pytest.fixture
def built(project):
    """The project with small stats settings, synthetic entropy tables of English prompts and English's
    translations for every checkpoint, and the stats and original stages run once."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["stats"].update(SMALL)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    paths = project_paths()
    for i, ckpt in enumerate(config.load(paths).checkpoints):
        for j, fmt in enumerate(("raw", "chat")):
            target = paths.entropy_table(ckpt.name, fmt)
            target.parent.mkdir(parents=True, exist_ok=True)
            pd.concat([entropy_table(ckpt.name, ckpt.family, ckpt.variant, 100 * k + 10 * i + j, fmt, language)
                       for k, language in enumerate(LANGUAGES)], ignore_index=True).to_parquet(target)
    shutil.copytree(REPO / "data" / "original", project / "data" / "original",
                    ignore=shutil.ignore_patterns("reanalysis*"))
    shutil.copy(REPO / "dvc.lock", project / "dvc.lock")
    cli.stats()
    cli.original()
    return project


def test_tolerance_is_one_unit_of_the_sixth_significant_digit():
    assert tolerance(12.3456, 12.3457) == pytest.approx(1e-4)
    assert tolerance(123456.0, 0.0) == pytest.approx(1.0)
    assert numbers_agree(-2.32687, -2.326871) and not numbers_agree(-2.32687, -2.32689)
    assert numbers_agree(-0.0232687, -0.0232689)  # 2e-7: below the absolute floor
    assert numbers_agree(None, None) and numbers_agree(float("nan"), float("nan"))
    assert not numbers_agree(None, 0.0) and not numbers_agree(1.0, float("nan"))
    assert numbers_agree(0.0, 1e-7) and not numbers_agree(0.0, 2e-6)
    assert tolerance(1e-3, 1e-3) == pytest.approx(1e-6)


def test_clean_build_reproduces_and_workspace_is_untouched(built):
    before = {p: p.read_bytes() for p in (built / "data").rglob("*") if p.is_file()}
    result = CliRunner().invoke(cli.app, ["verify"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    n = int(first.split()[0])
    assert first.startswith(f"{n} of {n} numbers reproduce") and n > 1000
    assert "Not checked: The entropy tables" in result.output and "dvc repro" in result.output
    after = {p: p.read_bytes() for p in (built / "data").rglob("*") if p.is_file()}
    assert after == before


def test_perturbed_metric_is_named(built):
    paths = project_paths()
    metrics = json.loads(paths.metrics.read_text())
    metrics["families"]["demo_llama"]["mean_delta_rfc"] *= 1.01
    paths.metrics.write_text(json.dumps(metrics))
    result = CliRunner().invoke(cli.app, ["verify"])
    assert result.exit_code == 1
    bad = [line for line in result.output.splitlines() if "MISMATCH" in line]
    assert bad == [line for line in bad if "families.demo_llama.mean_delta_rfc" in line] and len(bad) == 1
    assert "data/stats/metrics.json: families.demo_llama.mean_delta_rfc" in bad[0]


def test_perturbed_entropy_value_is_caught(built):
    paths = project_paths()
    target = paths.entropy_table("demo_mistral-instruct", "raw")
    table = pd.read_parquet(target)
    row = table.index[(table["category"] == "self_referent") & (table["layer"] == 1)][0]
    table.loc[row, "entropy"] += 0.5
    table.to_parquet(target)
    report = verify_workspace()
    assert not report.ok
    keys = [key for key, _, _ in report.mismatches]
    assert any(k.startswith("data/stats/metrics.json: families.demo_mistral.mean_delta_rfc") for k in keys)
    assert any("data/stats/deltas.parquet[definition=raw, format=raw, family=demo_mistral" in k and
               k.endswith(".delta_rfc") for k in keys)
    assert not any("demo_llama" in k and "metrics.json: families" in k for k in keys)


def test_perturbed_language_numbers_are_named(built):
    """A translation's metric and a cell of language_contrasts.parquet are recomputed and named by key."""
    paths = project_paths()
    metrics = json.loads(paths.metrics.read_text())
    metrics["languages"]["zh"]["families"]["demo_llama"]["mean_delta_rfc"] *= 1.01
    paths.metrics.write_text(json.dumps(metrics))
    target = paths.stats_table("language_contrasts")
    table = pd.read_parquet(target)
    row = table.index[(table["family"] == "demo_qwen") & (table["language"] == "es") & (table["layer"] == 2)][0]
    table.loc[row, "contrast_hi"] += 0.01
    table.to_parquet(target)
    keys = sorted(k for k, _, _ in verify_workspace().mismatches)
    assert len(keys) == 2 and keys[1] == "data/stats/metrics.json: languages.zh.families.demo_llama.mean_delta_rfc"
    assert keys[0].startswith("data/stats/language_contrasts.parquet[definition=") and keys[0].endswith(
        "family=demo_qwen, language=es, layer=2].contrast_hi")


def test_perturbed_translation_entropy_changes_that_language_only(built):
    paths = project_paths()
    target = paths.entropy_table("demo_mistral-instruct", "raw")
    table = pd.read_parquet(target)
    row = table.index[(table["language"] == "zh") & (table["category"] == "self_referent") & (table["layer"] == 1)][0]
    table.loc[row, "entropy"] += 0.5
    table.to_parquet(target)
    keys = [key for key, _, _ in verify_workspace().mismatches]
    assert any(k.startswith("data/stats/metrics.json: languages.zh.families.demo_mistral.mean_delta_rfc") for k in keys)
    assert any(k.startswith("data/stats/metrics.json: language_contrasts.demo_mistral.zh.") for k in keys)
    assert not any(k.startswith(("data/stats/metrics.json: families.", "data/stats/metrics.json: languages.es."))
                   for k in keys)
    assert not any("language=en" in k or "language=es" in k for k in keys if "deltas.parquet" in k)


def test_perturbed_reanalysis_is_named(built):
    paths = project_paths()
    document = json.loads(paths.reanalysis.read_text())
    document["pairs"]["llama~mistral"]["pearson_p_shift"] = 0.01
    paths.reanalysis.write_text(json.dumps(document))
    report = verify_workspace()
    assert [k for k, _, _ in report.mismatches] == ["data/original/reanalysis.json: pairs.llama~mistral.pearson_p_shift"]


def test_every_key_has_exactly_one_provenance_entry(built):
    paths = project_paths()
    metrics = json.loads(paths.metrics.read_text())
    reanalysis = json.loads(paths.reanalysis.read_text())
    keys = all_keys(metrics) + ["original." + k for k in all_keys(reanalysis)]
    for key in keys:
        bare = key.removeprefix("original.")
        artefact = "reanalysis" if key.startswith("original.") else "metrics"
        hits = [s for s in REGISTRY if s.artefact == artefact and re.fullmatch(s.pattern, bare)]
        assert len(hits) == 1, f"{key}: {len(hits)} registry entries"
    with pytest.raises(UserError, match="no such key"):
        lookup("families.demo_llama.not_a_metric")


def test_every_registry_function_exists():
    """Each `module:function` of the registry imports and names a callable (a renamed function fails here)."""
    for source in REGISTRY:
        module, function = source.function.split(":")
        assert callable(getattr(importlib.import_module(module), function, None)), source.function
        assert isinstance(getattr(type(project_paths()), source.artefact), property), source.artefact


def test_data_readme_documents_every_registry_function_and_key():
    readme = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    for source in REGISTRY:
        assert source.function.split(":")[1] in readme or source.function in readme, source.function


@pytest.mark.parametrize("key, expect", [
    ("families.demo_llama.mean_delta_rfc", ["data/stats/metrics.json", "deltas.parquet: delta_rfc",
                                            "analysis.statistics.layers:family_metrics", "stats.n_resamples=100",
                                            "dep data/entropy"]),
    ("pairs.demo_llama~demo_mistral.pearson_p_shift", ["cross_family.parquet: pearson_p_shift",
                                                       "analysis.statistics.correlation:compare_profiles", "stats.depth_grid=20"]),
    ("robustness.demo_null.split_half_r", ["split_half.parquet: split_half_r", "analysis.statistics.robustness:split_half",
                                           "stats.split_half_splits=10"]),
    ("families.demo_qwen.top_heads.rank_1", ["heads.parquet: position, rank, tied", "stats.top_k_heads=10",
                                            "stats.rank_decimals=4"]),
    ("languages.zh.families.demo_mistral.mean_delta_rfc", ["deltas.parquet: delta_rfc (mean over layers) where "
                                                           "language == zh", "in language zh", "stats.n_resamples=100"]),
    ("language_contrasts.demo_mistral.es.n_layers_significant", ["language_contrasts.parquet: significant",
                                                                 "language_summary.parquet", "ΔRFC_es differs from ΔRFC_en",
                                                                 "stats.n_permutations=100"]),
    ("original.claims.mean_delta_rfc:qwen.recomputed", ["= 0.142385", "data/original/reanalysis.json",
                                                         "analysis.statistics.original_study:reanalyse"]),
    ("original.source.sha256.figures/llama/comparison/detailed_comparison.csv", ["a08f67be9598"]),
])
def test_explain(built, key, expect):
    result = CliRunner().invoke(cli.app, ["explain", key])
    assert result.exit_code == 0, result.output
    for text in expect:
        assert text in result.output, f"{text!r} not in\n{result.output}"
    value = explain(key)[0].split(" = ", 1)[1]
    assert value != ""


def _patched(project_root) -> str:
    """A per-prompt patching table for demo_llama (what `selfref patch` would measure; synthetic effects), and
    the table and summary the stage writes from it. Returns the family."""
    from analysis.core.artefacts import read_parquet
    from analysis.interventions.patching import INTERVENTIONS, PATCH_CATEGORIES
    from analysis.interventions.summary import HEADS_COLUMNS, selection_for, summaries

    family, paths = "demo_llama", project_paths()
    params = yaml.safe_load(paths.params.read_text())
    params["patch"].update({"top_k": 1, "max_controls": 3})  # the test tables have 3 x 2 heads
    paths.params.write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = config.load(paths)
    selection = selection_for(cfg, family, read_parquet(paths.stats_table("heads"), HEADS_COLUMNS))
    rng = np.random.default_rng(3)
    rows = []
    for iv in INTERVENTIONS:
        for layer, head in sorted(set(zip(selection["layer"], selection["head"]))):
            for i, category in enumerate(np.repeat(PATCH_CATEGORIES, 4)):
                rows.append({"family": family, "intervention": iv.name, "variant": iv.variant, "kind": iv.kind,
                             "layer": layer, "head": head, "prompt_id": f"p{i}", "category": category,
                             "kl": rng.gamma(2.0, 1e-3), "h_later_clean": 2.0 + rng.normal(0, 0.01),
                             "h_later": 2.0 + rng.normal(0, 0.01), "h_later_other": 2.1 + rng.normal(0, 0.01)})
    per_prompt = pd.DataFrame(rows)
    paths.patching.mkdir(parents=True, exist_ok=True)
    per_prompt.to_parquet(paths.patch_prompts(family))
    table, summary = summaries(cfg, family, per_prompt, selection)
    table.to_parquet(paths.patch_table(family))
    paths.patch_summary(family).write_text(json.dumps(summary))
    return family


def test_patching_summary_is_recomputed_and_every_key_explained(built):
    family = _patched(built)
    paths = project_paths()
    assert verify_workspace().ok
    summary = json.loads(paths.patch_summary(family).read_text())
    keys = [f"patching.{family}.{k}" for k in all_keys(summary)]
    for key in keys:
        hits = [s for s in REGISTRY if s.artefact == "patching" and re.fullmatch(s.pattern, key)]
        assert len(hits) == 1, f"{key}: {len(hits)} registry entries"
    entry = summary["interventions"]["patch_base_into_instruct"]["entropy_later"]["heads"]
    head = next(iter(entry))
    lines = explain(f"patching.{family}.interventions.patch_base_into_instruct.entropy_later.heads.{head}.effect_self")
    assert f"data/patching/{family}.json" in lines[1] and "selfref patch demo_llama" in lines[1]
    assert "analysis.interventions.patching:summarise" in "\n".join(lines)
    entry[head]["effect_self"] *= 1.01
    paths.patch_summary(family).write_text(json.dumps(summary))
    mismatches = [k for k, _, _ in verify_workspace().mismatches]
    assert mismatches == [f"data/patching/{family}.json: interventions.patch_base_into_instruct.entropy_later."
                          f"heads.{head}.effect_self"]
