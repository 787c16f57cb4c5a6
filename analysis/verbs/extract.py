"""Stage `extract@<family>`: pull every checkpoint of one family (writing its manifest in data/models/<family>/) and
write its entropy tables, one per prompt format, in data/entropy/<family>/<checkpoint>/ (raw always; chat where
the family has an instruct checkpoint whose template wraps the prompts) and its pooled residual stream in
data/residuals/<family>/. One process per family: importing torch and TransformerLens costs more than pulling and
running a small checkpoint. `selfref extract <checkpoint>` extracts one checkpoint that was pulled before."""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass

import pandas as pd
import typer

from analysis.core.artefacts import write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.prompts import load_prompts, token_lengths
from analysis.core.quantities import PROMPT_FORMATS
from analysis.extraction.residuals import ResidualSet, write_residuals
from analysis.extraction.runner import checkpoint_tables
from analysis.models import checkpoints
from analysis.models.sources import manifest_line, pull_checkpoint


@dataclass
class Extracted:
    """One checkpoint's outputs, held until every checkpoint of the stage has run."""

    name: str
    tables: dict[str, pd.DataFrame]
    residuals: ResidualSet | None
    dropped_formats: tuple[str, ...]  # formats the checkpoint no longer has (its family lost its instruct)


def formats_of(config: Config, name: str) -> tuple[str, ...]:
    """The prompt formats checkpoint `name` is extracted in: chat only where its family has an instruct template."""
    has_chat = config.chat_template_source(config.checkpoint(name)) is not None
    return tuple(f for f in PROMPT_FORMATS if f != "chat" or has_chat)


def run(config: Config, name: str, prompt_format: str | None = None) -> None:
    """`name` a family: pull and extract each of its checkpoints (the stage); a checkpoint: extract it alone."""
    if name in config.families:
        members = [c.name for c in config.family_checkpoints(name)]
        for member in members:
            typer.echo(manifest_line(pull_checkpoint(config.checkpoint(member), config.paths,
                                                     config.prompts.min_per_category)))
        done = [extract_checkpoint(config, member, prompt_format) for member in members]
    else:
        done = [extract_checkpoint(config, name, prompt_format)]
    for result in done:  # every output written only once every checkpoint has run
        write_outputs(config, result)
    if name in config.families:
        remove_former_members(config, name)


def extract_checkpoint(config: Config, name: str, prompt_format: str | None = None) -> Extracted:
    """Run every prompt through checkpoint `name` (pulled before) in each of its formats (or in one)."""
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
    gc.collect()  # the model is released before the family's next checkpoint loads
    for fmt, frame in tables.items():
        lengths = frame.drop_duplicates("prompt_id").set_index("prompt_id")["n_tokens"]
        for language, part in prompts.groupby("language", sort=False):
            check = token_lengths(part, list(lengths.loc[part["prompt_id"]]), f"{name} {fmt} ({language})",
                                  config.prompts.max_token_gap)
            if check.warning:
                typer.secho("warning: " + check.warning, fg="yellow", err=True)
    dropped = tuple(sorted(set(PROMPT_FORMATS) - set(available))) if prompt_format is None else ()
    return Extracted(name, tables, residuals, dropped)


def write_outputs(config: Config, result: Extracted) -> None:
    """Write one checkpoint's residual file and entropy tables; remove the tables of formats it no longer has."""
    paths = config.paths
    if result.residuals is not None:
        target = paths.residual_file(result.name)
        write_residuals(result.residuals, target)
        typer.echo(f"{result.name}: pooled residual stream {target.stat().st_size / 1e6:.1f} MB -> "
                   f"{paths.relative(target)}")
    for fmt, frame in result.tables.items():
        target = paths.entropy_table(result.name, fmt)
        write_parquet(frame, target)
        typer.echo(f"{result.name}: {len(frame):,} rows -> {paths.relative(target)}")
    for fmt in result.dropped_formats:
        paths.entropy_table(result.name, fmt).unlink(missing_ok=True)


def remove_former_members(config: Config, family: str) -> None:
    """Remove the manifests, tables and residuals of checkpoints the family no longer has (the stage's outputs are
    its folders, so a checkpoint taken out of the suite must not linger in them)."""
    paths = config.paths
    members = {c.name for c in config.family_checkpoints(family)}
    leftovers = [p for p in paths.family_manifests(family).glob("*.json") if p.stem not in members]
    leftovers += [p for p in paths.family_residuals(family).glob("*.safetensors") if p.stem not in members]
    leftovers += [p for p in paths.family_entropy(family).glob("*") if p.name not in members]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        typer.echo(f"{family}: removed {paths.relative(path)} (no longer a checkpoint of the family)")
