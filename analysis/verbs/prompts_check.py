"""Stage `prompts`: validate data/prompts.csv and write data/prompts/summary.json only if it passes."""

from __future__ import annotations

from pathlib import Path

import typer

from analysis.core.artefacts import write_json
from analysis.models.checkpoints import cached_tokenizer_dir
from analysis.core.config import Config
from analysis.core.prompts import load_prompts, summary, token_lengths


def run(config: Config, tokenizers: bool) -> dict:
    """Validate the prompt set; with `tokenizers`, report token counts per category for every base
    checkpoint whose tokenizer is already on disk."""
    paths = config.paths
    prompts = load_prompts(paths.prompts, config.prompts.min_per_category)
    info = summary(prompts, paths.prompts)
    for language, counts in info["per_language"].items():
        typer.echo(f"{paths.prompts.name} ({language}): {sum(counts.values())} prompts "
                   + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if tokenizers:
        from transformers import AutoTokenizer

        for ckpt in config.checkpoints:
            local: Path | None = cached_tokenizer_dir(paths, ckpt) if ckpt.variant == "base" else None
            if local is None:
                continue
            tok = AutoTokenizer.from_pretrained(str(local))
            for language, part in prompts.groupby("language", sort=False):
                counts = [len(tok(t)["input_ids"]) for t in part["text"]]
                check = token_lengths(part, counts, f"{ckpt.family} ({language})", config.prompts.max_token_gap)
                typer.echo(check.table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
                if check.warning:
                    typer.secho("warning: " + check.warning, fg="yellow", err=True)
    write_json(info, paths.prompt_summary)
    return info
