"""dvc.yaml runs exactly what the code says: every stage depends on the package folders its verb runs and on its
verb module, so a code change re-runs the stages it affects and no others; the CLI wiring re-runs none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stage_modules import REPO, WIRING, imported_modules, stage_dependencies, stage_modules

STAGE_MODULES = {"prompts": "prompts_check", "extract": "extract",
                 "stats": "stats", "original": "original", "figures": "figures", "report": "report",
                 "patch": "patch", "probe": "probe", "bos_trap": "bos_trap"}
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_calls_its_verb_through_the_launcher():
    for name, stage in _stages().items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("sh analysis/selfref.sh "), name


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_list_exactly_the_package_folders_its_verb_runs(stage):
    body = _stages()[stage]
    body = body.get("do", body)
    listed = {d for d in body["deps"] if d.startswith("analysis")}
    expected = set(stage_dependencies(STAGE_MODULES[stage]))
    assert sorted(expected - listed) == [], f"{stage}: packages it runs but does not depend on"
    assert sorted(listed - expected) == [], f"{stage}: packages it depends on but does not run"
    assert all(Path(REPO / d).is_dir() or d.startswith("analysis/verbs/") for d in listed), listed


def test_the_library_is_organised_in_packages_and_the_verbs_stay_thin():
    """Sub-packages by pipeline part; only the CLI and the package init sit at the top; no module but the CLI
    imports a verb module (verbs import only the library, never another verb)."""
    top = {p.name for p in (REPO / "analysis").iterdir() if p.suffix == ".py"}
    assert top == {"__init__.py", "cli.py"}, top
    packages = {p.name for p in (REPO / "analysis").iterdir() if (p / "__init__.py").exists()}
    assert packages == {"core", "models", "extraction", "statistics", "interventions", "report", "audit", "verbs"}
    for path in (REPO / "analysis").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if name == "analysis.cli":  # the wiring: each verb of the CLI calls its module
            continue
        imported = {m for m in imported_modules(path) if m.startswith("analysis.verbs.")}
        assert not imported, f"{name} imports verb module(s) {sorted(imported)}"


LAYERS = ("core", "extraction", "models", "statistics", "interventions", "report", "audit", "verbs")


def test_sub_packages_import_only_their_own_layer_or_those_below():
    """The order of the README's package map: core at the bottom, the verbs on top (the CLI above them all)."""
    for path in (REPO / "analysis").rglob("*.py"):
        parts = path.relative_to(REPO / "analysis").parts
        if len(parts) < 2:
            continue
        level = LAYERS.index(parts[0])
        for name in imported_modules(path):
            package = name.split(".")[1] if name.count(".") >= 1 else None
            if package in LAYERS:
                assert LAYERS.index(package) <= level, f"{path.relative_to(REPO)} imports {name}"


def test_every_stage_module_is_a_stage():
    modules = {p.stem for p in (REPO / "analysis" / "verbs").glob("*.py") if p.stem != "__init__"}
    assert modules == set(STAGE_MODULES.values())


def test_verbs_that_are_no_stage_re_run_no_stage():
    """verify, explain and noise-floor live in analysis/audit, which the CLI imports inside their verbs: no stage
    depends on it, nor on the CLI wiring."""
    for stage_module in set(STAGE_MODULES.values()):
        deps = stage_dependencies(stage_module)
        assert "analysis/audit" not in deps and "analysis/cli.py" not in deps, stage_module
        assert not any(m.startswith("analysis.audit") for m in stage_modules(stage_module)), stage_module
    assert WIRING == {"analysis", "analysis.cli", "analysis.verbs"}


@pytest.mark.slow
@pytest.mark.skipif(DVC is None or shutil.which("git") is None, reason="needs dvc and git")
def test_dvc_status_reports_a_stage_changed_when_a_module_it_runs_changes(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = {**os.environ, "SELFREF_ROOT": str(clone)}

    def changed_deps() -> dict[str, set[str]]:
        """Stage -> the deps `dvc status` reports as changed."""
        done = subprocess.run([DVC, "status", "--json"], cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        out = {}
        for stage, entries in json.loads(done.stdout).items():
            for entry in entries:
                if isinstance(entry, dict):
                    out.setdefault(stage, set()).update(entry.get("changed deps", {}))
        return out

    before = changed_deps()
    heads = clone / "analysis" / "statistics" / "heads.py"
    assert "analysis/statistics" not in before.get("stats", set())
    with open(heads, "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    after = changed_deps()
    assert "analysis/statistics" in after["stats"]
    users = {name for name, stage in _stages().items() if "analysis/statistics" in stage.get("do", stage)["deps"]}
    # a foreach stage (patch@<family>) counts under its name in dvc.yaml
    assert {s.split("@")[0] for s, deps in after.items() if "analysis/statistics" in deps} == users
    assert "stats" in users and "figures" not in users and not any(u.startswith("extract") for u in users)
    subprocess.run(["git", "checkout", "--", "analysis"], cwd=clone, check=True)
    # the CLI, the launcher and Python's caches re-run nothing
    with open(clone / "analysis" / "cli.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    (clone / "analysis" / "statistics" / "__pycache__").mkdir(exist_ok=True)
    (clone / "analysis" / "statistics" / "__pycache__" / "heads.cpython-311.pyc").write_bytes(b"cache")
    assert changed_deps() == before
    # a family taken out of the suite's lists re-runs no other family's extract stage
    params = yaml.safe_load((clone / "params.yaml").read_text())
    gone = params["families"][0]
    lines = (clone / "params.yaml").read_text().splitlines(keepends=True)
    kept = [line for line in lines if f"{{family: {gone}," not in line]
    assert len(kept) < len(lines)
    text = "".join(kept).replace(f"families: [{gone}, ", "families: [")
    assert text.count("families: [") == 1 and f"[{gone}," not in text
    (clone / "params.yaml").write_text(text)
    changed = changed_deps()
    assert f"extract@{gone}" not in changed and f"extract@{params['families'][1]}" in _stage_names(clone)
    rerun = [s for s, deps in changed.items() if s.startswith("extract@") and "params.yaml" in deps]
    assert rerun == [], f"taking {gone} out of the suite re-runs {rerun}"


def _stage_names(root: Path) -> list[str]:
    """The stages of the project at `root`, foreach stages expanded, as `dvc stage list` names them."""
    done = subprocess.run([DVC, "stage", "list", "--name-only"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()
