"""The pipeline end to end on the demo suite, from a clean clone, and its behaviour when interrupted."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import cli, paths
from analysis.inference import EntropyRunner

REPO = Path(__file__).resolve().parent.parent


def test_interrupted_extract_leaves_no_partial_file_and_reruns(project, monkeypatch):
    from analysis import params as params_mod
    from analysis import checkpoints

    ckpt = params_mod.find_checkpoint(params_mod.load(), "demo_null-base")
    checkpoints.pull_demo(ckpt, list(cli._prompts(params_mod.load())["text"]))
    calls = {"n": 0}
    original = EntropyRunner._forward

    def dying(self, prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, prompts)

    monkeypatch.setattr(EntropyRunner, "_forward", dying)
    with pytest.raises(KeyboardInterrupt):
        cli.extract("demo_null-base", "raw")
    target = paths.entropy_table("demo_null-base", "raw")
    leftovers = list(target.parent.glob("*")) if target.parent.exists() else []
    assert leftovers == [], "an interrupted extract must leave neither the table nor a temporary file"

    monkeypatch.setattr(EntropyRunner, "_forward", original)
    cli.extract("demo_null-base", "raw")
    assert target.exists()


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_dvc_repro_from_a_clean_clone_reproduces_the_locked_artefacts(tmp_path):
    """`dvc repro -f` in a fresh clone regenerates the demo checkpoints and entropy tables byte for byte."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git repository")
    clone = tmp_path / "clone"
    _run(["git", "clone", "--quiet", str(REPO), str(clone)], tmp_path, dict(os.environ))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "SELFREF_DEMO_MODELS": str(tmp_path / "models"), "SELFREF_ROOT": str(clone)}
    env.pop("HF_TOKEN", None)
    _run(["dvc", "repro", "--force", "extract", "extract_chat"], clone, env)
    for name in ("demo_llama-base", "demo_qwen-instruct", "demo_null-instruct"):
        for fmt in ("raw", "chat"):
            assert (clone / "data" / "entropy" / fmt / f"{name}.parquet").exists()
    # Same code, same params, same prompts: the lock file's hashes of every output are unchanged.
    diff = subprocess.run(["git", "diff", "--stat", "--", "dvc.lock", "data/models"], cwd=clone,
                          capture_output=True, text=True)
    assert diff.stdout.strip() == "", diff.stdout
    status = _run(["dvc", "status", "extract", "extract_chat"], clone, env)
    assert "up to date" in status.stdout
