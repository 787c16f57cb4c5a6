"""`selfref suite check`: mocked Hub answers (gated, sizes, missing repos) and a local cache with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
from types import SimpleNamespace

import huggingface_hub as hf
import pytest
from huggingface_hub import errors as hf_errors
from safetensors.torch import save_file
import torch
from typer.testing import CliRunner

from analysis.models import preflight
from analysis.core.config import read_yaml
from analysis.cli import app

GIB = 2**30


def _suite(project, families: dict) -> None:
    params = read_yaml(project / "params.yaml")
    params["suites"]["probe"] = {"families": families}
    params["extract"]["device"] = "cpu"
    import yaml

    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def _hub(monkeypatch, repos: dict, access: bool = True):
    """Mock model_info / auth_check / get_safetensors_metadata from `repos`: name -> (gated, GiB, params)."""

    def model_info(repo, revision=None, files_metadata=False):
        if repo not in repos:
            raise hf_errors.RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, status_code=404,
                                                                                   request=None))
        gated, gib, _ = repos[repo]
        files = [SimpleNamespace(rfilename="model.safetensors", size=int(gib * GIB)),
                 SimpleNamespace(rfilename="config.json", size=700), SimpleNamespace(rfilename="README.md", size=10**9)]
        return SimpleNamespace(sha="a" * 40, gated=gated, siblings=files)

    def auth_check(repo, **_):
        if not access:
            raise hf_errors.GatedRepoError("403", response=SimpleNamespace(headers={}, status_code=403, request=None))

    def metadata(repo, revision=None):
        return SimpleNamespace(parameter_count={"BF16": repos[repo][2]})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf, "model_info", model_info)
    monkeypatch.setattr(hf, "auth_check", auth_check)
    monkeypatch.setattr(hf, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(preflight, "free_disk", lambda path: 100 * GIB)
    monkeypatch.setattr(preflight, "device_memory", lambda device: 64 * GIB)


def _check(name="probe"):
    return CliRunner().invoke(app, ["suite", "check", name])


def _families(base: str, instruct: str) -> dict:
    return {"fam": {"base": {"repo": base}, "instruct": {"repo": instruct}}}


def test_reachable_suite_that_fits_passes_with_an_estimate(project, monkeypatch):
    _suite(project, _families("o/base", "o/inst"))
    _hub(monkeypatch, {"o/base": (False, 15, 7_000_000_000), "o/inst": (False, 15, 7_000_000_000)})
    result = _check()
    assert result.exit_code == 0, result.output
    assert "downloads 33.0 GiB (with margin)" in result.output  # 2 x 15 GiB x 1.1; README.md not downloaded
    assert "largest checkpoint 31.3 GiB at 32-bit weights" in result.output  # 7e9 x 4 B x 1.2 on cpu
    assert "extraction roughly" in result.output and "suite probe: ready" in result.output


def test_gated_repo_without_token_fails_and_never_prints_a_token(project, monkeypatch):
    _suite(project, _families("o/base", "meta/gated"))
    _hub(monkeypatch, {"o/base": (False, 1, 10**9), "meta/gated": ("manual", 1, 10**9)})
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = _check()
    assert result.exit_code == 1
    assert "meta/gated is gated (manual): accept its licence on the Hub and export HF_TOKEN" in result.output
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETVALUE123")
    result = _check()
    assert result.exit_code == 0 and "the token in HF_TOKEN has access" in result.output
    _hub(monkeypatch, {"o/base": (False, 1, 10**9), "meta/gated": ("manual", 1, 10**9)}, access=False)
    result = _check()
    assert result.exit_code == 1 and "has no access yet" in result.output
    assert "hf_SECRETVALUE123" not in result.output


def test_missing_repo_too_little_disk_or_memory_fail(project, monkeypatch):
    _suite(project, _families("o/base", "o/typo"))
    _hub(monkeypatch, {"o/base": (False, 1, 10**9)})
    result = _check()
    assert result.exit_code == 1 and "repository o/typo not found" in result.output
    _suite(project, _families("o/base", "o/inst"))
    _hub(monkeypatch, {"o/base": (False, 60, 30 * 10**9), "o/inst": (False, 60, 30 * 10**9)})
    result = _check()
    assert result.exit_code == 1
    assert "fail    disk" in result.output and "fail    memory" in result.output


def _cached_snapshot(cache, repo: str, n: int) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    sha = "b" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    snap = folder / "snapshots" / sha
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(n)}, str(snap / "model.safetensors"))


def test_offline_reads_the_local_cache_and_says_what_it_could_not_check(project, monkeypatch, tmp_path):
    cache = tmp_path / "hf"
    _cached_snapshot(cache, "o/base", 1000)
    _cached_snapshot(cache, "o/inst", 2000)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "model_info", lambda *a, **k: pytest.fail("offline must not ask the Hub"))
    _suite(project, _families("o/base", "o/inst"))
    result = _check()
    assert result.exit_code == 0, result.output
    assert result.output.count("in the local cache") == 2
    assert "could not check that the revision is current, nor gating/licence" in result.output
    _suite(project, _families("o/base", "o/elsewhere"))
    result = _check()
    assert result.exit_code == 1 and "o/elsewhere@main is not in the local cache" in result.output
