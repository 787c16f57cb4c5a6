"""Stage `pull@<checkpoint>`: download (hub), generate (demo), pin (local) or fetch and dequantise (gguf) a
checkpoint and write its manifest."""

from __future__ import annotations

import typer

from analysis.core.config import Config
from analysis.models import checkpoints, gguf


def run(config: Config, name: str, update: bool) -> dict:
    """Pull checkpoint `name` of the active suite; returns its manifest."""
    ckpt = config.checkpoint(name)
    if ckpt.source == "demo":
        corpus = checkpoints.tokenizer_corpus(config.paths, config.prompts.min_per_category)
        manifest = checkpoints.pull_demo(ckpt, corpus, config.paths)
    elif ckpt.source == "local":
        manifest = checkpoints.pull_local(ckpt, config.paths)
    elif ckpt.source == "gguf":
        manifest = gguf.pull_gguf(ckpt, config.paths)
    else:
        manifest = checkpoints.pull_hub(ckpt, config.paths, update=update)
    typer.echo(f"{name}: {manifest['architecture']} {manifest['n_layers']} layers x {manifest['n_heads']} heads "
               f"({manifest['n_kv_heads']} kv), {manifest['n_params']:,} parameters, revision {manifest['revision']}")
    return manifest
