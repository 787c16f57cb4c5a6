"""Nothing lost, nothing silently wrong: a refused input leaves every previous artefact in place, output
sets are replaced as one unit, and each failure is one line naming the input and the fix."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.core import config
from analysis.core.artefacts import read_parquet
from analysis.core.errors import UserError
from analysis.core.layout import STATS_TABLES
from conftest import REPO

pytestmark = pytest.mark.slow  # runs dvc and the renderers in subprocesses (make test-fast leaves it out)

BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN))


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone of the committed repository (what a new user has)."""
    if DVC is None or shutil.which("git") is None:
        pytest.skip("needs dvc and git")
    root = tmp_path_factory.mktemp("failures") / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True)
    return root


def _repro(clone: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SELFREF_ROOT": str(clone)}
    return subprocess.run([DVC, "repro", "--single-item", stage], cwd=clone, env=env, capture_output=True, text=True)


def _restore(clone: Path) -> None:
    subprocess.run(["git", "checkout", "--quiet", "--", "."], cwd=clone, check=True)


@pytest.mark.parametrize(("edit", "stage", "outputs", "message"), [
    (("params.yaml", "n_resamples: 10000", "n_resamples: 0"), "stats", "data/stats",
     "params.yaml stats.n_resamples: 0 is out of range"),
    (("data/prompts.csv", "prompt_id,category", "prompt,category"), "prompts", "data/prompts",
     "missing column(s) prompt_id"),
    (("params.yaml", "suite: default", "suite: nosuch"), "extract@demo_llama", "data/models", "nosuch"),
])
def test_a_refused_input_under_dvc_repro_deletes_nothing(clone, edit, stage, outputs, message):
    """The recipes of the issue: every previous output is byte-identical after the failed stage, and
    `git status` shows only the edit."""
    before = _digests(clone / outputs)
    file, old, new = edit
    text = (clone / file).read_text()
    assert old in text
    (clone / file).write_text(text.replace(old, new, 1))
    try:
        done = _repro(clone, stage)
        assert done.returncode != 0
        assert message in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert _digests(clone / outputs) == before
        status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
        assert status.split() == ["M", file]
    finally:
        _restore(clone)


def test_the_launcher_finds_the_venv_or_says_what_to_do(tmp_path):
    """`dvc repro` runs verbs through analysis/selfref.sh: with no environment activated it uses the project's
    .venv; with neither it fails in one line saying to run `make install`."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    launcher = REPO / "analysis" / "selfref.sh"
    if (REPO / ".venv" / "bin" / "selfref").exists():
        done = subprocess.run(["sh", str(launcher), "--help"], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "one verb per pipeline stage" in done.stdout
    lone = tmp_path / "analysis"
    lone.mkdir()
    shutil.copy(launcher, lone / "selfref.sh")
    done = subprocess.run(["sh", str(lone / "selfref.sh"), "stats"], env=env, capture_output=True, text=True)
    assert done.returncode == 127
    assert done.stderr.strip().splitlines() == [
        "error: selfref is not installed: run `make install` in the project root (or activate the environment "
        "that has it)"]


@pytest.fixture
def stats_project(project):
    """A project holding the tracked statistics, as a stats run finds them."""
    shutil.copytree(REPO / "data" / "stats", project / "data" / "stats")
    return project


def _tracked_study() -> dict:
    study = {name: pd.read_parquet(REPO / "data" / "stats" / f"{name}.parquet") for name in STATS_TABLES}
    study["delta_rfc_plot"] = pd.read_csv(REPO / "data" / "stats" / "plots" / "delta_rfc.csv")
    study["metrics"] = {"families": {}, "pairs": {}, "checkpoints": {}, "marker": "new"}
    return study


def test_a_stats_run_killed_between_two_writes_leaves_the_old_set(stats_project, monkeypatch):
    """A fault injected after the third table is written: every file of data/stats is the old one; the
    same run without the fault replaces every file; no temporary file is left in data/."""
    from analysis.verbs import stats as stage

    cfg = config.load()
    before = _digests(stats_project / "data" / "stats")
    monkeypatch.setattr(stage, "entropy_tables", lambda cfg: {})
    monkeypatch.setattr(stage, "build_study", lambda entropy, settings, stages, **lanes: _tracked_study())
    from analysis.statistics import study as library  # write_study writes through its write_parquet

    writes = {"n": 0}
    real_write = library.write_parquet

    def dying_write(frame, path):
        writes["n"] += 1
        if writes["n"] == 4:
            raise KeyboardInterrupt
        real_write(frame, path)

    monkeypatch.setattr(library, "write_parquet", dying_write)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cfg)
    assert _digests(stats_project / "data" / "stats") == before
    monkeypatch.setattr(library, "write_parquet", real_write)
    stage.run(cfg)
    after = _digests(stats_project / "data" / "stats")
    assert set(after) == set(before) and after["metrics.json"] != before["metrics.json"]
    assert not [p for p in (stats_project / "data").rglob("*") if p.name.endswith(".tmp")]


def test_a_report_killed_between_html_and_pdf_keeps_both_old_files(project, monkeypatch):
    """The HTML and PDF of report/_output always come from the same build."""
    from analysis.report.rendering import RenderResult
    from analysis.verbs import report as stage

    out = project / "report" / "_output"
    out.mkdir(parents=True)
    (out / "index.html").write_text("old html")
    (out / "index.pdf").write_text("old pdf")

    def render(qmd, outdir, renderer, root, fail):
        (outdir / "index.html").write_text("new html")
        if fail:
            raise KeyboardInterrupt
        (outdir / "index.pdf").write_text("new pdf")
        return RenderResult("test", outdir / "index.html", outdir / "index.pdf")

    monkeypatch.setattr(stage, "render_report", lambda *a, **k: render(*a, **k, fail=True))
    with pytest.raises(KeyboardInterrupt):
        stage.run(config.load(), "auto")
    assert (out / "index.html").read_text() == "old html" and (out / "index.pdf").read_text() == "old pdf"
    monkeypatch.setattr(stage, "render_report", lambda *a, **k: render(*a, **k, fail=False))
    stage.run(config.load(), "auto")
    assert (out / "index.html").read_text() == "new html" and (out / "index.pdf").read_text() == "new pdf"


def test_what_a_killed_run_left_in_scratch_is_removed_next_time(project):
    from analysis.core.artefacts import clean_scratch

    scratch = project / ".selfref-tmp"
    scratch.mkdir(exist_ok=True)  # the project fixture's `selfref suite use` already wrote through it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (scratch / f"{dead.pid}-abc-layers.parquet").write_text("partial")
    (scratch / f"{dead.pid}-def-stats").mkdir()
    mine = scratch / f"{os.getpid()}-ghi-deltas.parquet"
    mine.write_text("in use")
    removed = clean_scratch()
    assert sorted(p.name for p in removed) == sorted([f"{dead.pid}-abc-layers.parquet", f"{dead.pid}-def-stats"])
    assert mine.exists()


def test_a_truncated_or_incomplete_table_is_named_with_the_fix(tmp_path):
    good = tmp_path / "t.parquet"
    pd.DataFrame({"layer": [0, 1], "x": [1.0, 2.0]}).to_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(UserError, match=r"cut.parquet: not a readable parquet file .*rebuild it with `dvc repro`"):
        read_parquet(cut)
    with pytest.raises(UserError, match=r"t.parquet: lacks column\(s\) head; .*rebuild it with `dvc repro`"):
        read_parquet(good, ("layer", "head"))
    with pytest.raises(UserError, match=r"nothing.parquet: missing; run `dvc repro`"):
        read_parquet(tmp_path / "nothing.parquet")


def test_a_read_only_output_folder_is_one_line(project, tmp_path):
    """Writing into a folder that cannot be written names the file and the fix, and changes nothing."""
    from analysis.core.artefacts import write_json

    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file cannot be created by anyone
        blocker = project / "data" / "stats"
        blocker.write_text("not a folder")
        with pytest.raises(UserError, match=r"cannot write .*metrics.json"):
            write_json({}, blocker / "metrics.json")
        assert blocker.read_text() == "not a folder"
        return
    folder = project / "data" / "stats"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"cannot write .*metrics.json: permission denied"):
            write_json({}, folder / "metrics.json")
    finally:
        folder.chmod(0o700)
