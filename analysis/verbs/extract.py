"""Stage `extract@<checkpoint>` / `extract_chat@<checkpoint>`: the entropy table of one checkpoint in one
prompt format, data/entropy/<format>/<checkpoint>.parquet."""

from __future__ import annotations

import typer

from analysis.core.artefacts import write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.prompts import load_prompts, token_lengths
from analysis.extraction.residuals import write_residuals
from analysis.extraction.runner import extract_checkpoint, extract_checkpoint_with_residuals
from analysis.models import checkpoints


def run(config: Config, name: str, prompt_format: str) -> None:
    """Run every prompt through checkpoint `name` and write its entropy table."""
    paths = config.paths
    ckpt = config.checkpoint(name)
    if prompt_format == "chat" and f"{ckpt.family}-instruct" not in {c.name for c in config.checkpoints}:
        raise UserError(f"{name}: --format chat wraps prompts in the family's instruct chat template, and family "
                        f"{ckpt.family} has no instruct checkpoint; extract this checkpoint with --format raw")
    every = load_prompts(paths.prompts, config.prompts.min_per_category)
    texts = list(every["text"])  # a demo tokenizer is trained on every language's prompts, as `pull` did
    prompts = every[every["language"].isin(config.prompts.languages)].reset_index(drop=True)
    manifest = checkpoints.read_manifest(paths, name)
    local = checkpoints.local_dir(manifest, ckpt.demo, texts, paths)
    chat_dir = None
    if prompt_format == "chat":
        sibling = config.checkpoint(f"{ckpt.family}-instruct")
        chat_dir = checkpoints.local_dir(checkpoints.read_manifest(paths, sibling.name), sibling.demo, texts, paths)
    shape = (manifest["n_layers"], manifest["n_heads"])
    residuals = None
    if prompt_format == "raw":  # the pooled residual stream comes from the same forward passes (the probes read it)
        frame, residuals = extract_checkpoint_with_residuals(local, prompts, checkpoint=name, family=ckpt.family,
                                                             variant=ckpt.variant, settings=config.extract,
                                                             expected_shape=shape)
    else:
        frame = extract_checkpoint(local, prompts, checkpoint=name, family=ckpt.family, variant=ckpt.variant,
                                   settings=config.extract, prompt_format=prompt_format, chat_dir=chat_dir,
                                   expected_shape=shape)
    lengths = frame.drop_duplicates("prompt_id").set_index("prompt_id")["n_tokens"]
    for language, part in prompts.groupby("language", sort=False):
        check = token_lengths(part, list(lengths.loc[part["prompt_id"]]), f"{name} ({language})",
                              config.prompts.max_token_gap)
        if check.warning:
            typer.secho("warning: " + check.warning, fg="yellow", err=True)
    target = paths.entropy_table(name, prompt_format)
    if residuals is not None:
        write_residuals(residuals, paths.residual_file(name))
        size = paths.residual_file(name).stat().st_size
        typer.echo(f"{name}: pooled residual stream {size / 1e6:.1f} MB -> {paths.relative(paths.residual_file(name))}")
    write_parquet(frame, target)
    typer.echo(f"{name}: {len(frame):,} rows -> {paths.relative(target)}")
