"""Stage `bos_trap`: the to_tokens trap on each checkpoint named in `bos_trap.checkpoints` (English prompts, raw
format), against that checkpoint's entropy table: data/bos_trap/layers.parquet and data/bos_trap/metrics.json."""

from __future__ import annotations

import pandas as pd
import typer

from analysis.core.artefacts import atomic_dir, read_parquet, write_json, write_parquet
from analysis.core.config import Config
from analysis.core.errors import UserError
from analysis.core.prompts import load_prompts
from analysis.core.quantities import ENTROPY_COLUMNS, SOURCE_LANGUAGE
from analysis.extraction.bos_trap import first_tokens, trap_entropies, trap_table
from analysis.extraction.runner import open_checkpoint
from analysis.models import checkpoints


def run(config: Config) -> None:
    """Extract each named checkpoint the trap's way and compare it with the pipeline's entropies."""
    paths = config.paths
    every = load_prompts(paths.prompts, config.prompts.min_per_category)
    prompts = every[every["language"] == SOURCE_LANGUAGE].reset_index(drop=True)
    tables, metrics = [], {}
    for name in config.bos_trap:
        ckpt = config.checkpoint(name)
        manifest = checkpoints.read_manifest(paths, name)
        local = checkpoints.local_dir(manifest, ckpt.demo, list(every["text"]), paths)
        loaded = open_checkpoint(local, checkpoint=name, settings=config.extract,
                                 expected_shape=(manifest["n_layers"], manifest["n_heads"]))
        source = paths.entropy_table(name, "raw")
        if not source.exists():
            raise UserError(f"{paths.relative(source)}: missing; run `selfref extract {name} --format raw`")
        table = read_parquet(source, ["prompt_id", "layer", "head", ENTROPY_COLUMNS["raw"]])
        table = table[table["prompt_id"].isin(set(prompts["prompt_id"]))]
        n_layers, n_heads = manifest["n_layers"], manifest["n_heads"]
        table = table.set_index("prompt_id").loc[prompts["prompt_id"]].reset_index()
        correct = table.sort_values(["prompt_id", "layer", "head"], kind="stable")
        order = pd.Categorical(correct["prompt_id"], categories=list(prompts["prompt_id"])).codes
        correct = correct.assign(_o=order).sort_values(["_o", "layer", "head"])[ENTROPY_COLUMNS["raw"]]
        correct = correct.to_numpy(dtype=float).reshape(len(prompts), n_layers, n_heads)
        trap = trap_entropies(loaded.runner, list(prompts["text"]), config.extract.batch_size)
        rows = trap_table(name, correct, trap)
        ours, theirs = first_tokens(loaded.runner.bridge, loaded.tokenizer, prompts["text"].iloc[0])
        metrics[name] = {"n_prompts": int(len(prompts)), "first_token": ours, "first_token_trap": theirs,
                         "h_correct": float(correct.mean()), "h_trap": float(trap.mean()),
                         "mean_abs_diff": float(rows["mean_abs_diff"].mean()),
                         "max_abs_diff": float(rows["max_abs_diff"].max()),
                         "layer_of_max": int(rows.loc[rows["max_abs_diff"].idxmax(), "layer"])}
        tables.append(rows)
        typer.echo(f"{name}: to_tokens default feeds {theirs!r} first (ours {ours!r}); layer entropy differs by "
                   f"up to {metrics[name]['max_abs_diff']:.3f} nats (mean {metrics[name]['mean_abs_diff']:.3f})")
    out = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["checkpoint", "layer"])
    with atomic_dir(paths.bos_trap) as staging:
        write_parquet(out, staging / "layers.parquet")
        write_json({"checkpoints": metrics, "definition": "raw", "language": SOURCE_LANGUAGE}, staging / "metrics.json")
