"""dvc.yaml runs exactly what the code says: every stage depends on every module its verb runs, so a code
change re-runs the stages it affects and no others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stage_modules import REPO, stage_files

STAGE_MODULES = {"prompts": "prompts_check", "pull": "pull", "extract": "extract", "extract_chat": "extract",
                 "stats": "stats", "original": "original", "figures": "figures", "report": "report",
                 "patch": "patch"}
DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_calls_its_verb_through_the_launcher():
    for name, stage in _stages().items():
        body = stage.get("do", stage)
        assert body["cmd"].startswith("sh analysis/selfref.sh "), name


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_stage_deps_list_exactly_the_modules_its_verb_runs(stage):
    body = _stages()[stage]
    body = body.get("do", body)
    listed = {d for d in body["deps"] if d.startswith("analysis/")}
    expected = set(stage_files(STAGE_MODULES[stage])) | {"analysis/selfref.sh"}
    assert sorted(expected - listed) == [], f"{stage}: modules it runs but does not depend on"
    assert sorted(listed - expected) == [], f"{stage}: modules it depends on but does not run"


def test_every_stage_module_is_a_stage():
    modules = {p.stem for p in (REPO / "analysis" / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == set(STAGE_MODULES.values())


def test_verbs_that_are_no_stage_re_run_no_stage():
    """verify, explain and noise-floor live in library modules the CLI imports inside their verbs: no stage depends
    on them."""
    for stage_module in set(STAGE_MODULES.values()):
        files = stage_files(stage_module)
        assert not {"analysis/verification.py", "analysis/provenance.py", "analysis/noise_floor.py"} & set(files), \
            stage_module


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
    assert "analysis/heads.py" not in before.get("stats", set())
    with open(clone / "analysis" / "heads.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    after = changed_deps()
    assert "analysis/heads.py" in after["stats"]
    users = {name for name, stage in _stages().items()
             if "analysis/heads.py" in stage.get("do", stage)["deps"]}
    # a foreach stage (patch@<family>) counts under its name in dvc.yaml
    assert {s.split("@")[0] for s, deps in after.items() if "analysis/heads.py" in deps} == users
    assert "stats" in users and "figures" not in users and not any(u.startswith("extract") for u in users)
