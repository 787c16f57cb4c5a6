"""Atomic writing of artefacts: a file, or a whole output folder, appears complete under its name or not at all.

Temporary files live in the project's scratch folder (`.selfref-tmp/`, ignored by git and DVC), never
inside a folder a stage depends on, and what a killed run left there is removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.core.errors import UserError
from analysis.core.layout import project_paths

RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths in one step
AT_FDCWD = -100


def scratch_for(path: Path) -> Path:
    """Where temporary files for `path` go: the project's scratch folder when `path` is inside the
    project, else `path`'s own folder (same file system either way, so a rename is atomic)."""
    path = Path(path).resolve()
    paths = project_paths()
    if path.is_relative_to(paths.root):
        paths.scratch.mkdir(parents=True, exist_ok=True)
        return paths.scratch
    return path.parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_scratch() -> list[Path]:
    """Remove what killed runs left in the scratch folder (entries whose process is gone); returns them."""
    scratch = project_paths().scratch
    removed = []
    for entry in scratch.glob("*") if scratch.exists() else []:
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def _write_error(path: Path, err: OSError) -> UserError:
    """A disk-full or permission error as one line naming the file and the fix."""
    reason = {errno.ENOSPC: "the disk is full; free some space",
              errno.EDQUOT: "the disk quota is exhausted; free some space",
              errno.EACCES: "permission denied; make the folder writable",
              errno.EPERM: "permission denied; make the folder writable",
              errno.EROFS: "the file system is read-only; run from a writable checkout"}.get(err.errno)
    return UserError(f"cannot write {path}: {reason or err.strerror}; nothing was changed")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=f"-{path.name}", dir=scratch_for(path))
    except OSError as err:
        raise _write_error(path, err) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            tmp_path.chmod(0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        tmp_path.replace(path)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(path, err) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two existing paths in one step where the OS can (Linux renameat2), else in two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(b))
    aside = a.with_name(a.name + ".old")
    b.rename(aside)
    a.rename(b)
    aside.rename(a)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder; swap it in for `path` only if the block succeeds.

    The whole output set of a stage is replaced in one step: a reader (or a killed run) sees either
    every old file or every new one, never a mixture.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", suffix=f"-{path.name}", dir=scratch_for(path)))
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if path.exists():
            _exchange(tmp, path)  # tmp now holds the old output set
        else:
            tmp.rename(path)
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        raise _write_error(path, err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint files can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a table as parquet, byte-identical for identical input."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_json(obj: Any, path: Path) -> None:
    """Write JSON with sorted keys and a trailing newline, so diffs stay readable."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """A JSON artefact; a missing or corrupt one is an error naming the file and how to rebuild it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run `dvc repro` to rebuild it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); restore it with `git checkout -- {path}` "
                        "or rebuild it with `dvc repro`") from None


def read_parquet(path: Path, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A parquet artefact with the columns a stage needs; a missing, truncated or incomplete file is an
    error naming the file and how to rebuild it."""
    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run `dvc repro` to rebuild it") from None
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]}); it may be truncated: "
                        "rebuild it with `dvc repro` (or `dvc checkout` to restore the cached copy)") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: lacks column(s) {', '.join(missing)}; it was written by another version "
                        "of this project: rebuild it with `dvc repro`")
    return frame


METADATA_KEY = "selfref"  # the one safetensors metadata entry of write_safetensors: a JSON object


def write_safetensors(tensors: dict[str, Any], metadata: dict[str, str], path: Path) -> None:
    """Write numpy arrays as safetensors (no pickle: plain arrays and a text header), atomically. The metadata go in
    as one sorted JSON entry: safetensors writes several entries in a random order, and a file whose bytes change
    with equal content would make DVC re-run every stage that reads it."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: v for k, v in tensors.items()}, str(tmp),
                  metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The arrays and text metadata of a safetensors artefact; a missing or unreadable one is an error naming the
    file and how to rebuild it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            header = dict(fh.metadata() or {})
            metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else header
            return {k: fh.get_tensor(k) for k in fh.keys()}, metadata
    except FileNotFoundError:
        raise UserError(f"{path}: missing; run `dvc repro` to rebuild it") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err}); rebuild it with `dvc repro`") from None
