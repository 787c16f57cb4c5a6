"""The `selfref` command: one verb per pipeline stage, each reading params.yaml and writing via analysis.paths."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from analysis import params as params_mod
from analysis import paths
from analysis.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
suite_app = typer.Typer(no_args_is_help=True, help="Choose the model suite.")
prompts_app = typer.Typer(no_args_is_help=True, help="Check the prompt set.")
app.add_typer(suite_app, name="suite")
app.add_typer(prompts_app, name="prompts")
log = logging.getLogger("selfref")


def _prompts(params: dict):
    from analysis.prompts import load_prompts

    return load_prompts(paths.PROMPTS, int(params["prompts"]["min_per_category"]))


@suite_app.command("use")
def suite_use(name: str) -> None:
    """Make NAME (demo, laptop, paper, ...) the active suite in params.yaml."""
    checkpoints = params_mod.use_suite(name)
    typer.echo(f"suite {name}: {', '.join(c.name for c in checkpoints)}")


@suite_app.command("show")
def suite_show() -> None:
    """List the active suite's checkpoints."""
    params = params_mod.load()
    for ckpt in params_mod.active_checkpoints(params):
        where = f"{ckpt.repo}@{ckpt.revision}" if ckpt.repo else f"local {ckpt.local}" if ckpt.local else "synthetic demo"
        typer.echo(f"{ckpt.name}\t{where}")


@suite_app.command("check")
def suite_check(name: str) -> None:
    """Preflight of suite NAME: reachability, gating, download vs disk, weights vs memory, time estimate."""
    from analysis import preflight

    params = params_mod.load()
    prompts = _prompts(params)
    mean_tokens = float(prompts["text"].str.len().mean()) / 4 + 1  # ~4 characters a token, plus a BOS
    findings = preflight.check_suite(params, name, len(prompts), mean_tokens)
    colours = {"ok": "green", "fail": "red", "unknown": "yellow"}
    for f in findings:
        typer.secho(f"{f.status:<8}{f.checkpoint:<28}{f.message}", fg=colours[f.status])
    failed = [f for f in findings if f.status == "fail"]
    if failed:
        typer.secho(f"suite {name}: {len(failed)} problem(s); the run cannot succeed as it stands", fg="red", err=True)
        raise typer.Exit(1)
    unknown = sum(f.status == "unknown" for f in findings)
    typer.echo(f"suite {name}: ready" + (f" ({unknown} item(s) not checked)" if unknown else ""))


@prompts_app.command("check")
def prompts_check(
    tokenizers: bool = typer.Option(True, help="Also report token counts for every tokenizer already on disk."),
) -> None:
    """Validate data/prompts.csv; write data/prompts/summary.json only if it passes."""
    from analysis.artefacts import write_json
    from analysis.prompts import summary, token_lengths

    params = params_mod.load()
    prompts = _prompts(params)
    info = summary(prompts, paths.PROMPTS)
    typer.echo(f"{paths.PROMPTS.name}: {info['n_prompts']} prompts "
               + ", ".join(f"{k} {v}" for k, v in info["per_category"].items()))
    if tokenizers:
        from transformers import AutoTokenizer

        from analysis.checkpoints import read_manifest

        for ckpt in params_mod.active_checkpoints(params):
            if ckpt.variant != "base" or not paths.manifest(ckpt.name).exists():
                continue
            manifest = read_manifest(ckpt.name)
            local = {"demo": paths.demo_model_dir(ckpt.name), "local": ckpt.local_path if ckpt.local else None
                     }.get(manifest["source"])
            if local is None:
                from huggingface_hub import snapshot_download

                try:
                    local = Path(snapshot_download(manifest["repo"], revision=manifest["revision"],
                                                   allow_patterns=["tokenizer*", "special_tokens_map.json"],
                                                   local_files_only=True))
                except Exception:  # noqa: BLE001 - a tokenizer not yet cached is simply not reported
                    continue
            if not local.exists():
                continue
            tok = AutoTokenizer.from_pretrained(str(local))
            counts = [len(tok(t)["input_ids"]) for t in prompts["text"]]
            check = token_lengths(prompts, counts, ckpt.family, float(params["prompts"]["max_token_gap"]))
            typer.echo(check.table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
            if check.warning:
                typer.secho("warning: " + check.warning, fg="yellow", err=True)
    write_json(info, paths.PROMPT_SUMMARY)


@app.command()
def pull(
    checkpoint: str = typer.Argument(..., help="<family>-<variant> of the active suite"),
    update: bool = typer.Option(False, help="Re-resolve the revision instead of re-using the pinned SHA."),
) -> None:
    """Download (hub) or generate (demo) a checkpoint and write data/models/<checkpoint>.json."""
    from analysis import checkpoints

    params = params_mod.load()
    ckpt = params_mod.find_checkpoint(params, checkpoint)
    if ckpt.source == "demo":
        manifest = checkpoints.pull_demo(ckpt, list(_prompts(params)["text"]))
    elif ckpt.source == "local":
        manifest = checkpoints.pull_local(ckpt)
    else:
        manifest = checkpoints.pull_hub(ckpt, update=update)
    typer.echo(f"{checkpoint}: {manifest['architecture']} {manifest['n_layers']} layers x {manifest['n_heads']} heads "
               f"({manifest['n_kv_heads']} kv), {manifest['n_params']:,} parameters, revision {manifest['revision']}")


@app.command()
def extract(
    checkpoint: str = typer.Argument(..., help="<family>-<variant> of the active suite"),
    prompt_format: str = typer.Option("raw", "--format", help="raw: the prompt alone; chat: inside the family's "
                                      "instruct chat template, entropy over the user's text only"),
) -> None:
    """Attention entropy of every head for every prompt: data/entropy/<format>/<checkpoint>.parquet."""
    from analysis import checkpoints
    from analysis.artefacts import write_parquet
    from analysis.inference import extract_checkpoint
    from analysis.prompts import token_lengths

    params = params_mod.load()
    settings = params["extract"]
    ckpt = params_mod.find_checkpoint(params, checkpoint)
    prompts = _prompts(params)
    texts = list(prompts["text"])
    manifest = checkpoints.read_manifest(checkpoint)
    local = checkpoints.local_dir(manifest, ckpt.demo, texts)
    chat_dir = None
    if prompt_format == "chat":
        sibling = params_mod.find_checkpoint(params, f"{ckpt.family}-instruct")
        chat_dir = checkpoints.local_dir(checkpoints.read_manifest(sibling.name), sibling.demo, texts)
    frame = extract_checkpoint(local, prompts, checkpoint=checkpoint, family=ckpt.family, variant=ckpt.variant,
                               settings=settings, prompt_format=prompt_format, chat_dir=chat_dir,
                               expected_shape=(manifest["n_layers"], manifest["n_heads"]))
    lengths = frame.drop_duplicates("prompt_id")
    check = token_lengths(prompts, list(lengths["n_tokens"]), checkpoint, float(params["prompts"]["max_token_gap"]))
    if check.warning:
        typer.secho("warning: " + check.warning, fg="yellow", err=True)
    target = paths.entropy_table(checkpoint, prompt_format)
    write_parquet(frame, target)
    typer.echo(f"{checkpoint}: {len(frame):,} rows -> {target.relative_to(paths.ROOT)}")


def _entropy(checkpoints: list, prompt_format: str):
    import pandas as pd

    frames = []
    for ckpt in checkpoints:
        path = paths.entropy_table(ckpt.name, prompt_format)
        if not path.exists():
            raise UserError(f"{path.relative_to(paths.ROOT)}: missing; run `selfref extract {ckpt.name} "
                            f"--format {prompt_format}` (or `dvc repro`)")
        frames.append(pd.read_parquet(path))
    return pd.concat(frames, ignore_index=True)


@app.command()
def stats() -> None:
    """Layer, cross-family, head and robustness statistics for every entropy definition and prompt format."""
    from analysis.artefacts import atomic_path, write_json, write_parquet
    from analysis.metrics import build_study

    params = params_mod.load()
    checkpoints = params_mod.active_checkpoints(params)
    study = build_study({fmt: _entropy(checkpoints, fmt) for fmt in ("raw", "chat")}, params["stats"])
    for key in ("layers", "deltas", "cross_family", "heads", "token_lengths", "robustness", "length_control",
                "split_half"):
        write_parquet(study[key], getattr(paths, key.upper()))
    with atomic_path(paths.DELTA_RFC_PLOT) as tmp:
        study["delta_rfc_plot"].to_csv(tmp, index=False, float_format="%.6g")
    write_json(study["metrics"], paths.METRICS)
    for family, values in study["metrics"]["families"].items():
        typer.echo(f"{family}: mean ΔRFC {values['mean_delta_rfc']:+.4f} "
                   f"[{values['mean_delta_rfc_lo']:+.4f}, {values['mean_delta_rfc_hi']:+.4f}], "
                   f"compression in {values['share_compression']:.0%} of layers")


@app.command()
def figures() -> None:
    """Charts of the report from data/stats: report/figures/<name>.vl.json, .svg, .png."""
    import pandas as pd

    from analysis import figures as figures_mod

    params = params_mod.load()
    s = params["stats"]
    built = figures_mod.build_all(pd.read_parquet(paths.LAYERS), pd.read_parquet(paths.DELTAS),
                                  pd.read_parquet(paths.HEADS), pd.read_parquet(paths.TOKEN_LENGTHS),
                                  paths.FIGURES, s["headline_definition"], s["headline_format"])
    typer.echo(f"{len(built)} charts -> {paths.FIGURES.relative_to(paths.ROOT)}/")


@app.command()
def report(renderer: str = typer.Option("auto", help="auto (quarto if installed), quarto, or fallback")) -> None:
    """Render report/index.qmd to report/_output/index.html and index.pdf."""
    from analysis.rendering import render_report

    result = render_report(paths.REPORT_QMD, paths.REPORT_OUTPUT, renderer=renderer)
    typer.echo(f"rendered with {result.renderer}: {result.html} and {result.pdf}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
