"""Checkpoints on disk: pulling them (hub download or demo generation), their manifests, their local folders.

The manifest `data/models/<family>-<variant>.json` pins what was analysed: the resolved revision SHA,
every file with its size and hash, and the shape read from the checkpoint's own config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from analysis import paths
from analysis.artefacts import atomic_dir, read_json, write_json
from analysis.errors import UserError
from analysis.params import Checkpoint

log = logging.getLogger(__name__)

HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        {"path": f.name, "size": f.stat().st_size, "sha256": _sha256(f)}
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


def _content_revision(files: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256("".join(f"{f['path']}:{f['sha256']}\n" for f in files).encode())
    return "demo-" + digest.hexdigest()[:40]


def read_manifest(name: str) -> dict[str, Any]:
    path = paths.manifest(name)
    if not path.exists():
        raise UserError(f"{path}: no manifest for checkpoint {name}; run `selfref pull {name}` first")
    return read_json(path)


def _base_manifest(ckpt: Checkpoint) -> dict[str, Any]:
    return {"checkpoint": ckpt.name, "family": ckpt.family, "variant": ckpt.variant, "source": ckpt.source}


def pull_demo(ckpt: Checkpoint, prompt_texts: list[str]) -> dict[str, Any]:
    """Generate a demo checkpoint deterministically and write its manifest."""
    from analysis import synthetic

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


def pull_local(ckpt: Checkpoint) -> dict[str, Any]:
    """Describe a `local:` checkpoint folder and pin its content (every file's SHA-256) in the manifest."""
    folder = ckpt.local_path
    if not folder.is_dir():
        raise UserError(f"{ckpt.name}: local checkpoint folder {folder} does not exist; fix `local` in params.yaml "
                        "suites or create the folder (config.json, *.safetensors, tokenizer files)")
    info = describe(folder)
    manifest = {
        **_base_manifest(ckpt),
        "repo": None,
        "local": ckpt.local,
        "requested_revision": None,
        "revision": "local-" + _content_revision(info["files"]).removeprefix("demo-"),
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
        raise UserError(f"{name}: cannot fetch {repo}@{revision} and it is not in the local Hugging Face cache "
                        f"({type(err).__name__}); connect to the network, or unset HF_HUB_OFFLINE, "
                        "or copy the snapshot into the cache") from None


def pull_hub(ckpt: Checkpoint, update: bool = False) -> dict[str, Any]:
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


def local_dir(manifest: dict[str, Any], demo_spec: dict[str, Any] | None, prompt_texts: list[str]) -> Path:
    """The folder holding the manifest's exact checkpoint; regenerates a demo or fetches a pinned hub snapshot."""
    name = manifest["checkpoint"]
    if manifest["source"] == "hub":
        return _snapshot(manifest["repo"], manifest["revision"], name)
    if manifest["source"] == "local":
        from analysis.params import Checkpoint

        folder = Checkpoint(manifest["family"], manifest["variant"], local=manifest["local"]).local_path
        changed = [f["path"] for f in manifest["files"]
                   if not (folder / f["path"]).exists() or _sha256(folder / f["path"]) != f["sha256"]]
        if changed:
            raise UserError(f"{name}: {folder} differs from its manifest ({', '.join(changed)}); "
                            f"run `selfref pull {name}` to re-pin it")
        return folder
    target = paths.demo_model_dir(name)
    expected = {f["path"]: f["sha256"] for f in manifest["files"]}

    def matches() -> bool:
        return target.exists() and all((target / p).exists() and _sha256(target / p) == h for p, h in expected.items())

    if not matches():
        if demo_spec != manifest.get("demo"):
            raise UserError(f"{name}: params.yaml's demo spec differs from {paths.manifest(name)}; "
                            f"run `selfref pull {name}` (or `dvc repro`)")
        from analysis import synthetic

        log.info("%s: regenerating demo checkpoint in %s", name, target)
        with atomic_dir(target) as tmp:
            synthetic.generate(demo_spec, prompt_texts, tmp, where=name)
        if not matches():
            raise UserError(f"{name}: the regenerated demo checkpoint differs from its manifest (different library "
                            f"versions?); run `selfref pull {name}` to re-pin it")
    return target
