"""The `selfref` command: one verb per pipeline stage (code in analysis/verbs), plus suite management.

Problems a user can fix end in one line naming the input and the fix (exit 2); `--debug` or
SELFREF_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from analysis.core import config as config_mod
from analysis.core.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
suite_app = typer.Typer(no_args_is_help=True, help="Choose the model suite.")
prompts_app = typer.Typer(no_args_is_help=True, help="Check the prompt set.")
app.add_typer(suite_app, name="suite")
app.add_typer(prompts_app, name="prompts")
log = logging.getLogger("selfref")


def _config() -> config_mod.Config:
    """params.yaml, validated once, after removing what killed runs left in the scratch folder."""
    from analysis.core.artefacts import clean_scratch

    for entry in clean_scratch():
        log.info("removed %s, left by an interrupted run", entry)
    return config_mod.load()


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    if debug:
        os.environ["SELFREF_DEBUG"] = "1"


@suite_app.command("use")
def suite_use(name: str) -> None:
    """Make NAME (demo, laptop, paper, ...) the active suite in params.yaml."""
    checkpoints = config_mod.use_suite(name)
    typer.echo(f"suite {name}: {', '.join(c.name for c in checkpoints)}")


@suite_app.command("show")
def suite_show() -> None:
    """List the active suite's checkpoints."""
    for ckpt in _config().checkpoints:
        where = (f"{ckpt.repo}@{ckpt.revision}" if ckpt.repo else f"local {ckpt.local}" if ckpt.local
                 else "synthetic demo")
        typer.echo(f"{ckpt.name}\t{where}")


@suite_app.command("check")
def suite_check(name: str) -> None:
    """Preflight of suite NAME: reachability, gating, download vs disk, weights vs memory, time estimate."""
    from analysis.models import preflight

    findings = preflight.check(_config(), name)
    colours = {"ok": "green", "fail": "red", "unknown": "yellow"}
    for f in findings:
        typer.secho(f"{f.status:<8}{f.checkpoint:<28}{f.message}", fg=colours[f.status])
    ready, summary = preflight.verdict(findings, name)
    typer.secho(summary, fg=None if ready else "red", err=not ready)
    if not ready:
        raise typer.Exit(1)


@prompts_app.command("check")
def prompts_check(
    tokenizers: bool = typer.Option(True, help="Also report token counts for every tokenizer already on disk."),
) -> None:
    """Validate data/prompts.csv; write data/prompts/summary.json only if it passes."""
    from analysis.verbs import prompts_check as stage

    stage.run(_config(), tokenizers)


@app.command()
def pull(
    checkpoint: str = typer.Argument(..., help="<family>-<variant> of the active suite"),
    update: bool = typer.Option(False, help="Re-resolve the revision instead of re-using the pinned SHA."),
) -> None:
    """Download (hub), generate (demo), pin (local) or dequantise (gguf) a checkpoint and write its manifest,
    data/models/<family>/<checkpoint>.json."""
    from analysis.models.sources import manifest_line, pull_checkpoint

    config = _config()
    typer.echo(manifest_line(pull_checkpoint(config.checkpoint(checkpoint), config.paths,
                                             config.prompts.min_per_category, update)))


@app.command()
def extract(
    name: str = typer.Argument(..., help="a family of the active suite (pull and extract each of its checkpoints: "
                                         "the extract@<family> stage), or one <family>-<variant> pulled before"),
    prompt_format: str | None = typer.Option(None, "--format", help="only this format (default: every format "
                                                "the checkpoint has). raw: the prompt alone; chat: inside the "
                                                "family's instruct chat template, entropy over the user's text only"),
) -> None:
    """Attention entropy of every head for every prompt: data/entropy/<family>/<checkpoint>/<format>.parquet."""
    from analysis.core.quantities import PROMPT_FORMATS
    from analysis.verbs import extract as stage

    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise UserError(f"--format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
    stage.run(_config(), name, prompt_format)


@app.command()
def stats() -> None:
    """Layer, cross-family, head and robustness statistics for every entropy definition and prompt format."""
    from analysis.verbs import stats as stage

    stage.run(_config())


@app.command("bos-trap")
def bos_trap() -> None:
    """The to_tokens trap: entropies with TransformerBridge's default BOS against the pipeline's, per layer, for the
    checkpoints named in `bos_trap.checkpoints`: data/bos_trap/layers.parquet, metrics.json"""
    from analysis.verbs import bos_trap as stage

    stage.run(_config())


@app.command()
def probe() -> None:
    """Linear probes of the prompt category on the pooled residual stream of every checkpoint: data/probes/*"""
    from analysis.verbs import probe as stage

    stage.run(_config())


@app.command()
def patch(family: str = typer.Argument(..., help="a family of the active suite")) -> None:
    """Ablate and patch the family's top candidate heads and random controls: data/patching/<family>.*"""
    from analysis.verbs import patch as stage

    stage.run(_config(), family)


@app.command()
def figures() -> None:
    """Charts of the report from data/stats: report/figures/<name>.vl.json, .svg, .png."""
    from analysis.verbs import figures as stage

    stage.run(_config())


@app.command()
def report(renderer: str = typer.Option("auto", help="auto (quarto if installed), quarto, or fallback")) -> None:
    """Render report/index.qmd to report/_output/index.html and index.pdf."""
    from analysis.verbs import report as stage

    stage.run(_config(), renderer)


@app.command()
def original() -> None:
    """Re-analyse the original study from its published tables: data/original/reanalysis.json and
    data/original/reanalysis_claims.parquet (checksums of its files checked first)."""
    from analysis.verbs import original as stage

    stage.run(_config())


@app.command()
def verify(keep: Path = typer.Option(None, help="Keep the recomputed artefacts in this folder (default: a "
                                                "temporary folder, removed afterwards)."),
           against: str = typer.Option(None, help="Instead: compare this workspace's artefacts with those committed "
                                                  "at this git revision (e.g. HEAD after `dvc repro --force` on "
                                                  "another machine): numbers at printed precision, conclusions exactly.")
           ) -> None:
    """Recompute every number of data/stats, data/patching and data/original from the tracked tables and compare at
    tolerance; with --against, compare a rebuild with a revision's published artefacts (exit 1 when a conclusion
    changes)."""
    if against is not None:
        from analysis.audit.build_comparison import compare_with_revision

        config = _config()
        sha, comparison = compare_with_revision(config.paths, against, config.stats)
        for line in comparison.lines(f"{against} ({sha[:12]})"):
            typer.echo(line)
        if not comparison.ok:
            raise typer.Exit(1)
        return
    from analysis.audit.verification import verify_workspace

    verification = verify_workspace(keep=keep)
    for line in verification.lines():
        typer.echo(line)
    if not verification.ok:
        raise typer.Exit(1)


@app.command("noise-floor")
def noise_floor() -> None:
    """Measure float32 noise: each checkpoint's English prompts run alone and in padded batches; prints the largest
    difference of every tested quantity (what params.yaml's noise floors were set from; no stage runs it)."""
    from analysis.audit.noise_floor import QUANTITIES, measure

    results = measure(_config())
    typer.echo("checkpoint\t" + "\t".join(QUANTITIES))
    for name, values in results.items():
        typer.echo(name + "\t" + "\t".join(f"{values[q]:.2e}" for q in QUANTITIES))
    typer.echo("largest\t" + "\t".join(f"{max(v[q] for v in results.values()):.2e}" for q in QUANTITIES))


@app.command()
def explain(key: str = typer.Argument(..., help="a key of data/stats/metrics.json, e.g. "
                                                "families.demo_llama.mean_delta_rfc, or original.<key of "
                                                "data/original/reanalysis.json>")) -> None:
    """Where a number comes from: value, artefact and column, the function, its params and input hashes."""
    from analysis.audit.provenance import explain as explain_key

    for line in explain_key(key):
        typer.echo(line)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as err:
        if os.environ.get("SELFREF_DEBUG"):
            raise
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
