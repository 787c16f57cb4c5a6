"""Checkpoints on disk: pulling them (hub download or demo generation), their manifests, their local folders.

The manifest `data/models/<family>/<family>-<variant>.json` pins what was analysed: the resolved revision SHA,
every file with its size and hash, and the shape read from the checkpoint's own config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from analysis.core.artefacts import atomic_dir, file_sha256, read_json, write_json
from analysis.core.config import Checkpoint
from analysis.core.prompts import load_prompts
from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths

log = logging.getLogger(__name__)

HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
]


def _parameter_count(local_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(local_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def describe(local_dir: Path) -> dict[str, Any]:
    """Shape and files of a Hugging Face checkpoint folder, read from its config and safetensors headers."""
    local_dir = Path(local_dir)
    config_path = local_dir / "config.json"
    if not config_path.exists():
        raise UserError(f"{local_dir}: no config.json; this is not a Hugging Face checkpoint folder")
    if not list(local_dir.glob("*.safetensors")):
        raise UserError(f"{local_dir}: no .safetensors weights; only safetensors checkpoints are loaded")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    n_heads = int(config["num_attention_heads"])
    d_model = int(config["hidden_size"])
    tok_config_path = local_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.exists() else {}
    bos = tok_config.get("bos_token")
    files = [
        {"path": f.name, "size": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(local_dir.iterdir()) if f.is_file() and not f.name.startswith(".")
    ]
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "d_model": d_model,
        "d_head": int(config.get("head_dim") or d_model // n_heads),
        "n_params": _parameter_count(local_dir),
        "bos_token": bos.get("content") if isinstance(bos, dict) else bos,
        "has_chat_template": bool(tok_config.get("chat_template")) or (local_dir / "chat_template.jinja").exists()
        or (local_dir / "chat_template.json").exists(),
        "files": files,
    }


def cached_tokenizer_dir(paths: ProjectPaths, ckpt: Checkpoint) -> Path | None:
    """A folder holding the checkpoint's tokenizer if one is already on disk (demo folder or local Hugging
    Face cache), else None: token counts are reported for what is at hand, nothing is downloaded."""
    if not paths.manifest(ckpt.name).exists():
        return None
    manifest = read_manifest(paths, ckpt.name)
    if manifest["source"] in ("demo", "local", "gguf"):
        local = paths.demo_model_dir(ckpt.name) if manifest["source"] == "demo" else \
            paths.gguf_model_dir(ckpt.name) if manifest["source"] == "gguf" else \
            paths.local_checkpoint(manifest["local"])
        return local if local.exists() else None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(manifest["repo"], revision=manifest["revision"],
                                      allow_patterns=["tokenizer*", "special_tokens_map.json"], local_files_only=True))
    except Exception:  # noqa: BLE001 - a tokenizer not yet cached is simply not reported
        return None


def verify_files(local: Path, manifest: dict[str, Any], paths: ProjectPaths) -> None:
    """Check every file the manifest lists against its size and SHA-256 before anything is loaded.

    Hashing 16 GB takes about half a minute, so a file whose (path, size, mtime) was verified before
    is not hashed again; the record lives in models/verified-files.json on this machine.
    """
    name = manifest["checkpoint"]
    pinned = paths.relative(paths.manifest(name))
    if manifest["source"] == "local":  # the user's own folder: nothing to download, the pin is what may be stale
        missing_fix = damaged_fix = (f"restore the folder, or run `selfref pull {name}` to pin what it holds now "
                                     "(the entropy tables then describe the new files)")
    else:
        missing_fix = f"run `selfref pull {name}` to download it again"
        damaged_fix = (f"the cached copy is damaged or another revision: delete it (or its blob) and run "
                       f"`selfref pull {name}`; if the manifest itself is wrong, `selfref pull {name} --update` "
                       "re-resolves it")
    record_path = paths.verified_files
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        record = {}
    changed = False
    for entry in manifest["files"]:
        file = Path(local) / entry["path"]
        if not file.exists():
            raise UserError(f"{name}: {entry['path']} listed in {pinned} is missing from {local}; {missing_fix}")
        real = file.resolve()
        stat = real.stat()
        key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
        digest = record.get(key)
        if digest is None:
            digest = file_sha256(real) if stat.st_size == entry["size"] else None
        if stat.st_size != entry["size"] or digest != entry["sha256"]:
            raise UserError(f"{name}: {file} does not match {pinned} (size {stat.st_size} vs {entry['size']}, "
                            f"sha256 {str(digest)[:12]}... vs {entry['sha256'][:12]}...; file {real}); {damaged_fix}")
        if key not in record:
            record[key], changed = digest, True
    if changed:
        write_json(record, record_path)


def _content_revision(files: list[dict[str, Any]], kind: str = "demo") -> str:
    """A revision name for a checkpoint without a hub commit: `<kind>-` and a hash of its files' hashes."""
    digest = hashlib.sha256("".join(f"{f['path']}:{f['sha256']}\n" for f in files).encode())
    return f"{kind}-" + digest.hexdigest()[:40]


def read_manifest(paths: ProjectPaths, name: str) -> dict[str, Any]:
    """The tracked manifest of checkpoint `name`; a missing one names the verb that writes it."""
    path = paths.manifest(name)
    if not path.exists():
        raise UserError(f"{path}: no manifest for checkpoint {name}; run `selfref pull {name}` first")
    return read_json(path)


def _base_manifest(ckpt: Checkpoint) -> dict[str, Any]:
    return {"checkpoint": ckpt.name, "family": ckpt.family, "variant": ckpt.variant, "source": ckpt.source}


def tokenizer_corpus(paths: ProjectPaths, min_per_category: int) -> list[str]:
    """Every prompt text of every language in data/prompts.csv: the corpus a demo checkpoint's tokenizer is trained
    on, at `pull` and whenever a later stage regenerates the checkpoint (the same texts give the same files)."""
    return list(load_prompts(paths.prompts, min_per_category)["text"])


def pull_demo(ckpt: Checkpoint, prompt_texts: list[str], paths: ProjectPaths) -> dict[str, Any]:
    """Generate a demo checkpoint deterministically and write its manifest."""
    from analysis.models import synthetic  # torch and transformers: imported only where a demo is generated

    target = paths.demo_model_dir(ckpt.name)
    with atomic_dir(target) as tmp:
        synthetic.generate(ckpt.demo, prompt_texts, tmp, where=f"params.yaml suites: {ckpt.family}.{ckpt.variant}")
    info = describe(target)
    manifest = {
        **_base_manifest(ckpt),
        "repo": None,
        "requested_revision": None,
        "revision": _content_revision(info["files"]),
        **info,
        "demo": ckpt.demo,
        "planted": [list(map(int, x)) for x in ckpt.demo.get("planted", [])],
        "self_focus": [list(map(int, x)) for x in ckpt.demo.get("self_focus", [])],
    }
    write_json(manifest, paths.manifest(ckpt.name))
    return manifest


def pull_local(ckpt: Checkpoint, paths: ProjectPaths) -> dict[str, Any]:
    """Describe a `local:` checkpoint folder and pin its content (every file's SHA-256) in the manifest."""
    folder = paths.local_checkpoint(ckpt.local)
    if not folder.is_dir():
        raise UserError(f"{ckpt.name}: local checkpoint folder {folder} does not exist; fix `local` in params.yaml "
                        "suites or create the folder (config.json, *.safetensors, tokenizer files)")
    info = describe(folder)
    manifest = {
        **_base_manifest(ckpt),
        "repo": None,
        "local": ckpt.local,
        "requested_revision": None,
        "revision": _content_revision(info["files"], "local"),
        **info,
        "planted": [],
    }
    write_json(manifest, paths.manifest(ckpt.name))
    return manifest


def _snapshot(repo: str, revision: str, name: str) -> Path:
    """Download (or find in the local cache) config, safetensors and tokenizer files of one revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        # The token, if any, comes from HF_TOKEN or the user's login; it is never passed through here.
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except hf_errors.GatedRepoError:
        raise UserError(f"{name}: {repo} is gated; accept its licence on the Hub and export HF_TOKEN "
                        "with a token that has access") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"{name}: repository {repo!r} not found (or private); check `repo` in params.yaml, "
                        "or export HF_TOKEN if it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{name}: revision {revision!r} of {repo} not found; fix `revision` in params.yaml "
                        "or delete its manifest to re-resolve") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError, OSError) as err:
        offline = "unset HF_HUB_OFFLINE, " if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise UserError(f"{name}: cannot fetch {repo}@{revision} and it is not in the local Hugging Face cache "
                        f"({type(err).__name__}); connect to the network, {offline}or copy the snapshot into "
                        "the cache") from None


def pull_hub(ckpt: Checkpoint, paths: ProjectPaths, update: bool = False) -> dict[str, Any]:
    """Download a hub checkpoint, pinned to the SHA of an earlier manifest unless `update`."""
    revision = ckpt.revision
    path = paths.manifest(ckpt.name)
    if path.exists() and not update:
        old = read_json(path)
        if old.get("repo") == ckpt.repo and old.get("requested_revision") == ckpt.revision:
            revision = old["revision"]
            log.info("%s: re-using pinned revision %s", ckpt.name, revision)
    local = _snapshot(ckpt.repo, revision, ckpt.name)
    manifest = {
        **_base_manifest(ckpt),
        "repo": ckpt.repo,
        "requested_revision": ckpt.revision,
        "revision": local.name,
        **describe(local),
        "planted": [],
    }
    write_json(manifest, path)
    return manifest


def local_dir(manifest: dict[str, Any], demo_spec: dict[str, Any] | None, prompt_texts: list[str],
              paths: ProjectPaths) -> Path:
    """The folder holding the manifest's exact checkpoint; regenerates a demo or fetches a pinned hub snapshot."""
    name = manifest["checkpoint"]
    if manifest["source"] == "hub":
        local = _snapshot(manifest["repo"], manifest["revision"], name)
        verify_files(local, manifest, paths)
        return local
    if manifest["source"] == "local":
        folder = paths.local_checkpoint(manifest["local"])
        verify_files(folder, manifest, paths)
        return folder
    if manifest["source"] == "gguf":
        from analysis.models import gguf  # imports this module

        return gguf.model_dir(manifest, paths)
    target = paths.demo_model_dir(name)
    expected = {f["path"]: f["sha256"] for f in manifest["files"]}

    def matches() -> bool:
        return target.exists() and all((target / p).exists() and file_sha256(target / p) == h for p, h in expected.items())

    if not matches():
        if demo_spec != manifest.get("demo"):
            raise UserError(f"{name}: params.yaml's demo spec differs from {paths.manifest(name)}; "
                            f"run `selfref pull {name}` (or `dvc repro`)")
        log.info("%s: regenerating demo checkpoint in %s", name, target)
        from analysis.models import synthetic

        with atomic_dir(target) as tmp:
            synthetic.generate(demo_spec, prompt_texts, tmp, where=name)
        if not matches():
            raise UserError(f"{name}: the regenerated demo checkpoint differs from its manifest (different library "
                            f"versions?); run `selfref pull {name}` to re-pin it")
    return target
