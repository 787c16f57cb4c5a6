"""`selfref pull` against a locally built Hugging Face cache (offline), and demo generation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.models import checkpoints
from analysis.core import config
from analysis.core.layout import project_paths
from analysis.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SHA_1 = "1" * 40
SHA_2 = "2" * 40
SECRET = "hf_selfrefTestTokenNeverWritten"


def _add_snapshot(cache: Path, repo: str, sha: str, source: Path) -> None:
    """Lay out one snapshot the way huggingface_hub's cache does, and point refs/main at it."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, folder / "snapshots" / sha)
    (folder / "refs" / "main").write_text(sha)


@pytest.fixture
def hub_project(tmp_path, demo_dir):
    """A project whose active suite points at two repos present only in a local offline cache."""
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    shutil.copy(REPO / "data" / "prompts.csv", root / "data" / "prompts.csv")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["suites"]["local"] = {"families": {"tiny": {
        "base": {"repo": "selfref-test/tiny", "revision": "main"},
        "instruct": {"repo": "selfref-test/tiny-instruct", "revision": "main"},
    }}}
    params["suite"] = "local"
    params["checkpoints"] = {f"tiny-{v}": {"family": "tiny", "variant": v} for v in ("base", "instruct")}
    params["families"] = ["tiny"]  # what `selfref suite use local` writes beside `checkpoints`
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cache = tmp_path / "hub"
    _add_snapshot(cache, "selfref-test/tiny", SHA_1, demo_dir("demo_llama", "base"))
    _add_snapshot(cache, "selfref-test/tiny-instruct", SHA_1, demo_dir("demo_llama", "instruct"))
    return root, cache


def _selfref(root: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SELFREF_ROOT": str(root), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_TOKEN": SECRET}
    return subprocess.run([sys.executable, "-m", "analysis.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow  # runs selfref in a subprocess
def test_pull_writes_a_pinned_manifest_and_reuses_its_sha(hub_project, demo_dir):
    root, cache = hub_project
    result = _selfref(root, cache, "pull", "tiny-base")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((root / "data" / "models" / "tiny" / "tiny-base.json").read_text())
    assert manifest["revision"] == SHA_1 and manifest["repo"] == "selfref-test/tiny"
    assert (manifest["n_layers"], manifest["n_heads"], manifest["n_kv_heads"]) == (6, 8, 2)
    assert manifest["n_params"] > 0
    weights = [f for f in manifest["files"] if f["path"].endswith(".safetensors")]
    assert weights and all(len(f["sha256"]) == 64 and f["size"] > 0 for f in weights)

    # A newer commit appears on main: the pinned SHA is kept until the user asks for --update.
    _add_snapshot(cache, "selfref-test/tiny", SHA_2, demo_dir("demo_llama", "base"))
    assert _selfref(root, cache, "pull", "tiny-base").returncode == 0
    assert json.loads((root / "data" / "models" / "tiny" / "tiny-base.json").read_text())["revision"] == SHA_1
    assert _selfref(root, cache, "pull", "tiny-base", "--update").returncode == 0
    assert json.loads((root / "data" / "models" / "tiny" / "tiny-base.json").read_text())["revision"] == SHA_2


@pytest.mark.slow  # runs selfref in a subprocess
def test_token_never_written(hub_project):
    root, cache = hub_project
    result = _selfref(root, cache, "pull", "tiny-instruct")
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    for file in root.rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


@pytest.mark.slow  # runs selfref in a subprocess
def test_missing_repo_is_a_clear_error_and_writes_nothing(hub_project):
    root, cache = hub_project
    shutil.rmtree(cache / "models--selfref-test--tiny-instruct")
    result = _selfref(root, cache, "pull", "tiny-instruct")
    assert result.returncode == 2
    assert "tiny-instruct" in result.stderr and "selfref-test/tiny-instruct" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "data" / "models" / "tiny" / "tiny-instruct.json").exists()


@pytest.mark.slow  # runs selfref in a subprocess
def test_unknown_checkpoint_names_the_known_ones(hub_project):
    root, cache = hub_project
    result = _selfref(root, cache, "pull", "tiny-chat")
    assert result.returncode == 2 and "tiny-base" in result.stderr


def test_demo_pull_is_deterministic(project, prompts):
    cfg = config.load()
    ckpt = cfg.checkpoint("demo_null-instruct")
    first = checkpoints.pull_demo(ckpt, list(prompts["text"]), cfg.paths)
    second = checkpoints.pull_demo(ckpt, list(prompts["text"]), cfg.paths)
    assert first == second
    assert first["revision"].startswith("demo-") and first["planted"] == []
    assert first["has_chat_template"] and first["bos_token"] == "<|bos|>"


def test_local_dir_regenerates_a_missing_demo_checkpoint(project, prompts):
    cfg = config.load()
    ckpt = cfg.checkpoint("demo_null-base")
    manifest = checkpoints.pull_demo(ckpt, list(prompts["text"]), cfg.paths)
    shutil.rmtree(cfg.paths.demo_model_dir(ckpt.name))
    local = checkpoints.local_dir(manifest, ckpt.demo, list(prompts["text"]), cfg.paths)
    assert (local / "config.json").exists()
    with pytest.raises(UserError, match="demo spec differs"):
        shutil.rmtree(local)
        checkpoints.local_dir(manifest, {**ckpt.demo, "seed": 1}, list(prompts["text"]), cfg.paths)


def test_describe_rejects_a_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="only safetensors"):
        checkpoints.describe(tmp_path)


@pytest.mark.slow  # runs selfref in a subprocess
def test_extract_verifies_hub_files_against_the_manifest(hub_project):
    """A flipped block in a cached weights file, or a wrong hash in the manifest, stops extraction before
    anything is loaded, naming the file and the fix; a verified file is not hashed again."""
    root, cache = hub_project
    assert _selfref(root, cache, "pull", "tiny-base").returncode == 0
    weights = next((cache / "models--selfref-test--tiny" / "snapshots" / SHA_1).glob("*.safetensors"))
    manifest_path = root / "data" / "models" / "tiny" / "tiny-base.json"
    cfg = config.load(project_paths(root))

    checkpoints.verify_files(weights.parent, json.loads(manifest_path.read_text()), cfg.paths)
    record = json.loads(cfg.paths.verified_files.read_text())
    assert any(str(weights.resolve()) in key for key in record)

    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)
    weights.write_bytes(bytes(data))
    result = _selfref(root, cache, "extract", "tiny-base")
    assert result.returncode == 2, result.stderr
    assert weights.name in result.stderr and "does not match data/models/tiny/tiny-base.json" in result.stderr
    assert "selfref pull tiny-base" in result.stderr and "Traceback" not in result.stderr
    assert not (root / "data" / "entropy" / "tiny-base").exists()

    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == weights.name:
            entry["sha256"] = "0" * 64
            entry["size"] = weights.stat().st_size
    with pytest.raises(UserError, match=f"{weights.name} does not match"):
        checkpoints.verify_files(weights.parent, manifest, cfg.paths)


@pytest.mark.slow  # runs selfref in a subprocess
def test_offline_error_suggests_unsetting_hf_hub_offline_only_when_set(hub_project, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    root, cache = hub_project
    shutil.rmtree(cache / "models--selfref-test--tiny")
    result = _selfref(root, cache, "pull", "tiny-base")
    assert result.returncode == 2 and "unset HF_HUB_OFFLINE" in result.stderr

    def unreachable(**kwargs):
        raise hf_errors.LocalEntryNotFoundError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match="cannot fetch selfref-test/tiny@main") as err:
        checkpoints._snapshot("selfref-test/tiny", "main", "tiny-base")
    assert "HF_HUB_OFFLINE" not in str(err.value)


def test_a_local_folder_is_pinned_verified_and_refused_once_changed(project, demo_dir, monkeypatch):
    """`local: <dir>` checkpoints: pull pins every file's hash; extraction's local_dir verifies the folder."""
    folder = project / "models" / "mine"
    shutil.copytree(demo_dir("demo_llama", "base"), folder)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["suites"]["mine"] = {"families": {"tiny": {"base": {"local": "models/mine"},
                                                      "instruct": {"local": "models/missing"}}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    config.use_suite("mine")
    cfg = config.load()
    manifest = checkpoints.pull_local(cfg.checkpoint("tiny-base"), cfg.paths)
    assert manifest["source"] == "local" and manifest["local"] == "models/mine"
    assert manifest["revision"].startswith("local-") and manifest["n_layers"] >= 1
    assert checkpoints.local_dir(manifest, None, [], cfg.paths) == folder
    with pytest.raises(UserError, match=r"tiny-instruct: local checkpoint folder .*models/missing does not exist"):
        checkpoints.pull_local(cfg.checkpoint("tiny-instruct"), cfg.paths)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError, match=rf"{weights.name} does not match data/models/tiny/tiny-base.json .*restore the "
                                        r"folder, or run `selfref pull tiny-base`"):
        checkpoints.local_dir(manifest, None, [], cfg.paths)
    weights.unlink()
    with pytest.raises(UserError, match=r"is missing from .*; restore the folder"):
        checkpoints.local_dir(manifest, None, [], cfg.paths)
