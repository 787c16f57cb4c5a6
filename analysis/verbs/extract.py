"""Stage `extract@<checkpoint>`: the entropy tables of one checkpoint, one per prompt format, in
data/entropy/<checkpoint>/ (raw always; chat where the family has an instruct checkpoint whose template wraps
the prompts), from one load of the model."""

from __future__ import annotations

import typer

from analysis.core.artefacts import write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.prompts import load_prompts, token_lengths
from analysis.core.quantities import PROMPT_FORMATS
from analysis.extraction.residuals import write_residuals
from analysis.extraction.runner import checkpoint_tables
from analysis.models import checkpoints


def formats_of(config: Config, name: str) -> tuple[str, ...]:
    """The prompt formats checkpoint `name` is extracted in: chat only where its family has an instruct template."""
    has_chat = config.chat_template_source(config.checkpoint(name)) is not None
    return tuple(f for f in PROMPT_FORMATS if f != "chat" or has_chat)


def run(config: Config, name: str, prompt_format: str | None = None) -> None:
    """Run every prompt through checkpoint `name` and write its entropy table in each format (or in one)."""
    paths = config.paths
    ckpt = config.checkpoint(name)
    available = formats_of(config, name)
    if prompt_format is not None and prompt_format not in available:
        raise UserError(f"{name}: --format {prompt_format} wraps prompts in the family's instruct chat template, and "
                        f"family {ckpt.family} has no instruct checkpoint; extract it with --format raw")
    formats = (prompt_format,) if prompt_format else available
    every = load_prompts(paths.prompts, config.prompts.min_per_category)
    prompts = every[every["language"].isin(config.prompts.languages)].reset_index(drop=True)
    corpus = checkpoints.tokenizer_corpus(paths, config.prompts.min_per_category)
    manifest = checkpoints.read_manifest(paths, name)
    local = checkpoints.local_dir(manifest, ckpt.demo, corpus, paths)
    source = config.chat_template_source(ckpt) if "chat" in formats else None
    chat_dir = (checkpoints.local_dir(checkpoints.read_manifest(paths, source.name), source.demo, corpus, paths)
                if source else None)
    # the pooled residual stream comes from the raw format's forward passes (the probe stage reads it)
    tables, residuals = checkpoint_tables(local, prompts, checkpoint=name, family=ckpt.family, variant=ckpt.variant,
                                          settings=config.extract, formats=formats, chat_dir=chat_dir,
                                          expected_shape=(manifest["n_layers"], manifest["n_heads"]),
                                          residuals="raw" in formats)
    for fmt, frame in tables.items():
        lengths = frame.drop_duplicates("prompt_id").set_index("prompt_id")["n_tokens"]
        for language, part in prompts.groupby("language", sort=False):
            check = token_lengths(part, list(lengths.loc[part["prompt_id"]]), f"{name} {fmt} ({language})",
                                  config.prompts.max_token_gap)
            if check.warning:
                typer.secho("warning: " + check.warning, fg="yellow", err=True)
    if residuals is not None:  # every output written only once every format has run
        write_residuals(residuals, paths.residual_file(name))
        size = paths.residual_file(name).stat().st_size
        typer.echo(f"{name}: pooled residual stream {size / 1e6:.1f} MB -> {paths.relative(paths.residual_file(name))}")
    for fmt, frame in tables.items():
        target = paths.entropy_table(name, fmt)
        write_parquet(frame, target)
        typer.echo(f"{name}: {len(frame):,} rows -> {paths.relative(target)}")
    if prompt_format is None:  # a format the checkpoint no longer has (its family lost its instruct) goes
        for fmt in set(PROMPT_FORMATS) - set(available):
            paths.entropy_table(name, fmt).unlink(missing_ok=True)
