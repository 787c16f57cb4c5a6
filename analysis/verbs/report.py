"""Stage `report`: render report/index.qmd to report/_output/index.html, index.pdf and index.md (the Markdown export,
its figures in report/_output/figures/), all from one build."""

from __future__ import annotations

import typer

from analysis.core.artefacts import atomic_dir
from analysis.core.config import Config
from analysis.report.rendering import RenderResult, render_report


def run(config: Config, renderer: str) -> RenderResult:
    """Render the report into a staging folder and swap it in for report/_output; the outputs' final places."""
    paths = config.paths
    with atomic_dir(paths.report_output) as staging:
        result = render_report(paths.report_qmd, staging, renderer=renderer, root=paths.root)
    typer.echo(f"rendered with {result.renderer}: {paths.relative(paths.report_output / result.html.name)}, "
               f"{paths.relative(paths.report_output / result.pdf.name)} and the Markdown export "
               f"{paths.relative(paths.report_output / 'index.md')} with its figures")
    return RenderResult(result.renderer, paths.report_output / result.html.name, paths.report_output / result.pdf.name,
                        paths.report_output / result.markdown.name if result.markdown else None)
