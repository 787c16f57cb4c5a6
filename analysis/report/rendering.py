"""Render report/index.qmd to a self-contained HTML page and a PDF.

Quarto is the primary renderer (`quarto render`, configured by _quarto.yml). Where Quarto is not
installed, the same document is rendered here with the subset of Quarto it uses: the document's
Python cells run in a Jupyter kernel (nbclient + ipykernel) with the cell options `include`, `echo`,
`output: asis`, `label` and `fig-cap`/`tbl-cap`; inline `{python} expr` expressions are evaluated in the
same kernel (a value with a Markdown representation is inserted as markdown, as Quarto does); cells
labelled `fig-*`/`tbl-*` become numbered figures and tables, and `@fig-*`/`@tbl-*` references become
"Figure n"/"Table n" links; pandoc (pypandoc-binary) writes HTML with every resource embedded, and
pandoc's typst writer plus the `typst` compiler write the PDF, and pandoc's gfm writer the Markdown export. It also
reads Quarto's `{{< include file >}}` shortcode and `.content-visible` / `.content-hidden` divs with `when-format`
(html, typst/pdf, markdown). Charts appear as raw `{=html}` (a static SVG that interactive Vega-Lite replaces when
scripts run), `{=typst}` (the SVG sized to the page's text area) and `{=markdown}` (the PNG) blocks, which both
renderers pass through untouched.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from analysis.core.layout import project_paths
from analysis.core.artefacts import atomic_path
from analysis.core.errors import UserError

log = logging.getLogger(__name__)

RENDERERS = ("auto", "quarto", "fallback")
CELL = re.compile(r"^```\{python\}[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
INLINE = re.compile(r"`\{python\}\s+([^`]+)`")
INCLUDE = re.compile(r"^\{\{<\s*include\s+(\S+)\s*>\}\}[ \t]*$", re.M)
# Quarto's conditional content: a fenced div `::: {.content-visible when-format="html"}` (or .content-hidden)
VISIBLE = re.compile(r"^(?P<fence>:{3,})[ \t]*\{\.content-(?P<kind>visible|hidden)\s+when-format=\"(?P<fmt>[\w-]+)\"\s*\}"
                     r"[ \t]*\n(?P<body>.*?)^(?P=fence)[ \t]*$\n?", re.S | re.M)
# The formats a `when-format` name stands for, by fallback target (Quarto's aliases: pdf and typst, markdown and gfm).
TARGET_FORMATS = {"html": {"html", "html5", "html:js"}, "typst": {"typst", "pdf"},
                  "markdown": {"markdown", "gfm", "commonmark", "md"}}
# The PDF's text area (Quarto's typst page: US letter, 1.25 in margins), which the fallback uses too; a chart is
# at most as tall as the area less room for its caption.
PAGE = {"papersize": "us-letter", "margin": {"x": "1.25in", "y": "1.25in"}}
TEXT_WIDTH_IN, TEXT_HEIGHT_IN, CAPTION_IN = 6.0, 8.5, 1.2
XREF = re.compile(r"(?<![\w@])@((fig|tbl)-[\w-]*\w)")
FLOATS = {"fig": ("Figure", "fig-cap", "bottom"), "tbl": ("Table", "tbl-cap", "top")}  # prefix: name, caption, where
OPTION = re.compile(r"^#\|\s?(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
KERNEL_TIMEOUT_S = 600

STYLE = """
body { max-width: 56rem; margin: 2rem auto; padding: 0 1rem; font: 17px/1.55 system-ui, sans-serif; color: #222; }
h1.title { font-size: 2rem; margin-bottom: 0.2rem; } p.subtitle { font-size: 1.2rem; color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; } caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
.callout-warning { border-left: 5px solid #e0a800; background: #fff8e1; padding: 0.5rem 1rem; margin: 1rem 0; }
.num { border-bottom: 1px dotted #888; } figure { margin: 1.5rem 0; } figcaption { color: #555; font-size: 0.9rem; }
.vega-chart { overflow-x: auto; }
nav#TOC { background: #f6f6f6; padding: 0.5rem 1rem; font-size: 0.9rem; }
.quarto-float { margin: 1.5rem 0; } .quarto-float table { margin: 0.3rem 0; }
.quarto-float-caption { color: #555; font-size: 0.9rem; }
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; }
"""


@dataclass
class RenderResult:
    renderer: str
    html: Path
    pdf: Path
    markdown: Path | None = None  # the Markdown export (gfm) for blog platforms, its figures beside it


REPORT_CSS = "report.css"  # beside the document: the layout both renderers' HTML uses (narrow screens, charts)
FORMAT_LINKS = "format-links.html"  # beside the document: the links to the PDF and the Markdown export (both renderers)


# ----------------------------------------------------------------------------------------------------
# Helpers the document itself calls (both renderers).

def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _raw_block(fmt: str, text: str) -> str:
    fence = _fence(text)
    return f"{fence}{{={fmt}}}\n{text}\n{fence}\n"


class Markdown(str):
    """Text that Quarto (and the fallback) insert as markdown, from an inline expression or a cell's value."""

    def _repr_markdown_(self) -> str:
        return str(self)


def escape_markup(text: str) -> str:
    """A caption or table cell's `<` and `>` escaped, so that `<family>` reads as text, not as an HTML tag."""
    return re.sub(r"(?<!\\)([<>])", r"\\\1", text)


def _typst_text(text: str) -> str:
    """Escape characters with a meaning in typst markup."""
    return re.sub(r"([\\#\[\]*_`$<>@~])", r"\\\1", text)


def vega_bundle_markdown() -> Markdown:
    """A raw HTML block defining `vegaEmbed` from vl-convert's bundle of Vega, Vega-Lite and
    Vega-Embed, so the page needs no network. Include it once, before the first chart.

    `<table` in the bundle's code is written `<\\u0074able` (the same characters to JavaScript, in strings,
    regular expressions and names alike) so that Quarto does not try to read an HTML table out of it."""
    import vl_convert

    bundle = vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed;").replace("<table", "<\\u0074able")
    return Markdown(only("html", _raw_block("html", f'<script>\n{bundle}\n</script>')))


def only(fmt: str, markdown: str) -> str:
    """`markdown` shown in the output format `fmt` alone (Quarto's `.content-visible when-format`)."""
    return f'::::::: {{.content-visible when-format="{fmt}"}}\n{markdown}\n:::::::\n'


def svg_size(svg: Path) -> tuple[float, float]:
    """(width, height) in pixels of an SVG written by vl-convert (its root element's attributes)."""
    found = re.search(r'<svg[^>]*?\swidth="([\d.]+)"[^>]*?\sheight="([\d.]+)"', svg.read_text(encoding="utf-8")[:2000])
    if not found:
        raise UserError(f"{svg}: no width and height on its <svg> element; run `selfref figures` again")
    return float(found.group(1)), float(found.group(2))


def typst_image(svg: Path) -> str:
    """The typst call that places `svg` within the PDF's text area: the text width, or, for a chart taller than the
    area (less its caption) at that width, the area's height."""
    width, height = svg_size(svg)
    if TEXT_WIDTH_IN * height / width > TEXT_HEIGHT_IN - CAPTION_IN:
        return f'#image("{svg.as_posix()}", height: {TEXT_HEIGHT_IN - CAPTION_IN}in)'
    return f'#image("{svg.as_posix()}", width: 100%)'


def chart_markdown(spec_json: Path | str, svg: Path | str, png: Path | str | None = None, alt: str = "") -> Markdown:
    """A chart for every output: in HTML the static SVG, which interactive Vega-Lite replaces when scripts run
    (a page whose scripts are stripped, as blog platforms do, still shows the chart); in the PDF the SVG within the
    text area; in the Markdown export the PNG. The caption and number come from the cell's `label` and `fig-cap`.

    Paths are relative to the document; the spec is read now and inlined in the page.
    """
    spec_path, svg_path = Path(spec_json), Path(svg)
    png_path = Path(png) if png is not None else svg_path  # the Markdown export's image: the PNG where there is one
    for path in (spec_path, svg_path, png_path):
        if not path.exists():
            raise UserError(f"{path}: chart file missing; run `selfref figures` (or `dvc repro figures`)")
    spec = json.dumps(json.loads(spec_path.read_text())).replace("</", "<\\/")
    element = "vis-" + re.sub(r"[^\w-]", "-", spec_path.name.removesuffix(".vl.json"))
    text = html.escape(alt or f"chart {spec_path.name.removesuffix('.vl.json')}", quote=True)
    chart = (f'<div class="chart-box"><img class="chart-static" src="{svg_path.as_posix()}" alt="{text}">'
             f'<div id="{element}" class="vega-chart"></div></div>\n'
             f'<script>\nwindow.vegaEmbed("#{element}", {spec}, '
             '{"actions": false, "renderer": "svg"}).then(function () {\n'
             f'  var still = document.getElementById("{element}").previousElementSibling;\n'
             '  if (still) { still.remove(); }\n});\n</script>')
    return Markdown(only("html", _raw_block("html", chart)) + "\n" + _raw_block("typst", typst_image(svg_path))
                    + "\n" + _raw_block("markdown", f"![{text}]({png_path.as_posix()})"))


# ----------------------------------------------------------------------------------------------------
# The fallback renderer.

@dataclass
class Chunk:
    """A piece of the document: markdown text, or a Python cell with its options."""

    kind: str  # "markdown" | "code"
    text: str
    options: dict[str, Any]
    line: int


def split_front_matter(source: str, where: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter, body) of a .qmd; a document without front matter has {}."""
    if not source.startswith("---\n"):
        return {}, source
    end = source.find("\n---\n", 4)
    if end < 0:
        raise UserError(f"{where}: front matter opened with --- is never closed")
    try:
        meta = yaml.safe_load(source[4:end]) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: front matter is not valid YAML: {exc}") from exc
    return meta, source[end + 5:]


def parse_cell_options(code: str, where: str) -> tuple[dict[str, Any], str]:
    """Quarto's `#| key: value` lines at the top of a cell, and the code after them."""
    lines = code.splitlines()
    option_lines = []
    while lines and OPTION.match(lines[0]):
        option_lines.append(OPTION.match(lines.pop(0)).group(1))
    try:
        options = yaml.safe_load("\n".join(option_lines)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: cell options are not valid YAML: {exc}") from exc
    return options, "\n".join(lines) + "\n"


def chunks(body: str, where: str, first_line: int = 1) -> list[Chunk]:
    """Split a .qmd body into markdown and Python cells; `line` is where each starts in the file."""
    out, pos = [], 0
    for match in CELL.finditer(body):
        line = body.count("\n", 0, match.start()) + first_line
        if match.start() > pos:
            out.append(Chunk("markdown", body[pos:match.start()], {}, body.count("\n", 0, pos) + first_line))
        options, code = parse_cell_options(match.group(1), f"{where}:{line}")
        out.append(Chunk("code", code, options, line))
        pos = match.end()
    out.append(Chunk("markdown", body[pos:], {}, body.count("\n", 0, pos) + first_line))
    return out


def _notebook(parts: list[Chunk]):
    """A notebook with one cell per code chunk and one per inline expression, in document order."""
    import nbformat

    cells, slots = [], []
    for index, part in enumerate(parts):
        if part.kind == "code":
            cells.append(nbformat.v4.new_code_cell(part.text))
            slots.append((index, None))
        else:
            for expr in INLINE.findall(part.text):
                cells.append(nbformat.v4.new_code_cell(expr.strip()))
                slots.append((index, expr))
    return nbformat.v4.new_notebook(cells=cells), slots


def _inline_value(outputs: list) -> str:
    """What Quarto inserts for an inline expression: its Markdown representation as is, else its plain
    text, where a quoted string loses its quotes and has markdown characters escaped."""
    for out in outputs:
        if out.get("output_type") != "execute_result":
            continue
        data = out.get("data", {})
        if "text/markdown" in data:
            return data["text/markdown"]
        text = data.get("text/plain", "")
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return re.sub(r"([\\`*_{}\[\]()>#+,\-.!])", r"\\\1", text[1:-1])
        return text
    return ""


@dataclass
class Float:
    """A cell labelled `fig-*` or `tbl-*`: numbered in document order within its kind, with its caption."""

    label: str
    kind: str  # "fig" | "tbl"
    number: int
    caption: str

    @property
    def name(self) -> str:
        return FLOATS[self.kind][0]

    def wrap(self, body: str, target: str) -> str:
        """The cell's output as a numbered figure or table for `target` ("html" or "typst"), caption
        below a figure and above a table, as Quarto places them."""
        where = FLOATS[self.kind][2]
        title = f"{self.name} {self.number}" + (f": {escape_markup(self.caption)}" if self.caption else "")
        if target == "markdown":
            caption = f"*{title}*\n"
            return "\n" + (caption + "\n" + body if where == "top" else body + "\n" + caption) + "\n"
        if target == "html":
            caption = f"::: {{.quarto-float-caption}}\n{title}\n:::\n"
            inner = caption + "\n" + body if where == "top" else body + "\n" + caption
            return f"\n:::: {{#{self.label} .quarto-float .quarto-float-{self.kind}}}\n{inner}\n::::\n"
        close = (f'], caption: figure.caption(position: {where}, [{_typst_text(self.caption)}]), '
                 f'kind: "quarto-float-{self.kind}", supplement: [{self.name}]) <{self.label}>')
        return "\n" + _raw_block("typst", "#figure([") + "\n" + body + "\n" + _raw_block("typst", close)

    def reference(self, target: str) -> str:
        if target == "markdown":
            return f"{self.name}\u00a0{self.number}"
        if target == "html":
            return f"[{self.name}\u00a0{self.number}](#{self.label}){{.quarto-xref}}"
        return f"`#ref(<{self.label}>, supplement: [{self.name}])`{{=typst}}"


def _floats(parts: list[Chunk], where: str) -> dict[int, Float]:
    """The labelled cells (by chunk index), numbered per kind in document order."""
    out, counts, seen = {}, {}, set()
    for index, part in enumerate(parts):
        label = str(part.options.get("label", "")) if part.kind == "code" else ""
        kind = label.split("-", 1)[0]
        if kind not in FLOATS:
            continue
        if label in seen:
            raise UserError(f"{where}:{part.line}: label {label} is used twice")
        seen.add(label)
        counts[kind] = counts.get(kind, 0) + 1
        out[index] = Float(label, kind, counts[kind], str(part.options.get(FLOATS[kind][1], "")).strip())
    return out


def _outputs_markdown(outputs: list, options: dict[str, Any], assets: Path, name: str) -> str:
    """Markdown for a cell's outputs, as Quarto makes it: a value with a Markdown representation is
    markdown; printed text is a code block unless the cell says `output: asis`; images are figures."""
    import base64

    asis = options.get("output") == "asis"
    pieces, pending = [], []

    def flush() -> None:
        text = "".join(pending)
        pending.clear()
        if asis:
            pieces.append(text)
        elif text.strip():
            pieces.append(f"```\n{text}```\n")

    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            pending.append(out["text"])
        elif out.get("output_type") in ("display_data", "execute_result"):
            data = out.get("data", {})
            if "text/markdown" in data:
                flush()
                pieces.append(data["text/markdown"] + "\n")
            elif "image/png" in data:
                flush()
                assets.mkdir(parents=True, exist_ok=True)
                image = assets / f"{name}-{len(pieces)}.png"
                image.write_bytes(base64.b64decode(data["image/png"]))
                pieces.append(f"![]({image.as_posix()})\n")
            elif "text/plain" in data:
                pending.append(data["text/plain"] + "\n")
    flush()
    return "\n".join(pieces)


@dataclass
class Executed:
    """A document after its Python ran: each chunk's markdown (cells replaced by their outputs, inline
    expressions by their values) and the numbered figures and tables, ready to assemble per output."""

    meta: dict[str, Any]
    parts: list[Chunk]
    texts: dict[int, str]
    floats: dict[int, Float]
    where: str

    def markdown(self, target: str) -> str:
        """Plain pandoc markdown for `target` ("html" or "typst"): floats numbered, references resolved."""
        labels = {f.label: f for f in self.floats.values()}

        def reference(match: re.Match) -> str:
            if match.group(1) not in labels:
                raise UserError(f"{self.where}: @{match.group(1)} refers to no cell labelled {match.group(1)}")
            return labels[match.group(1)].reference(target)

        out = []
        for index, part in enumerate(self.parts):
            text = self.texts.get(index, "")
            if part.kind == "markdown":
                out.append(XREF.sub(reference, text))
            elif index in self.floats:
                out.append(self.floats[index].wrap(XREF.sub(reference, text), target) + "\n")
            else:  # a cell's markdown output may cite a figure or table too, as in Quarto
                out.append(XREF.sub(reference, text) + "\n")
        return conditional("".join(out), target)


def conditional(markdown: str, target: str) -> str:
    """Quarto's `.content-visible` / `.content-hidden` divs with `when-format`, resolved for `target` ("html",
    "typst" or "markdown"): the body kept or dropped, the fences removed (divs nest when their fences differ)."""
    def keep(match: re.Match) -> str:
        shown = match.group("fmt") in TARGET_FORMATS[target]
        if match.group("kind") == "hidden":
            shown = not shown
        return conditional(match.group("body"), target) if shown else ""
    return VISIBLE.sub(keep, markdown)


def expand_includes(path: Path, seen: tuple[Path, ...] = ()) -> str:
    """The text of `path` with every `{{< include file >}}` line replaced by that file's text (relative to `path`'s
    folder, nested includes too), as Quarto does before it runs anything."""
    text = path.read_text(encoding="utf-8")

    def include(match: re.Match) -> str:
        target = (path.parent / match.group(1)).resolve()
        if not target.is_file():
            raise UserError(f"{path}: `{{{{< include {match.group(1)} >}}}}` names no file ({target}); add it or "
                            "remove the line")
        if target in seen:
            raise UserError(f"{path}: {match.group(1)} includes itself")
        return expand_includes(target, seen + (target,)).rstrip("\n")
    return INCLUDE.sub(include, text)



def execute_document(qmd: Path, workdir: Path, root: Path) -> Executed:
    """Run the document's Python in a kernel started in the document's folder, as Quarto does; every
    cell is replaced by its output and every inline expression by its value."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    where = str(qmd)
    source = expand_includes(qmd)
    meta, body = split_front_matter(source, where)
    parts = chunks(body, where, first_line=source.count("\n") - body.count("\n") + 1)
    floats = _floats(parts, where)
    notebook, slots = _notebook(parts)
    client = NotebookClient(notebook, timeout=KERNEL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(qmd.parent)}})
    try:
        # the kernel reads the same project as this process
        client.execute(env=kernel_env(root))
    except CellExecutionError as exc:
        failed = next(((i, o) for i, cell in enumerate(notebook.cells) for o in cell.get("outputs", [])
                       if o.get("output_type") == "error"), None)
        line = parts[slots[failed[0]][0]].line if failed else "?"
        detail = f"{failed[1].get('ename')}: {failed[1].get('evalue')}" if failed else str(exc)
        raise UserError(f"{where}:{line}: a Python cell failed while rendering the report: {detail}\n"
                        f"{ANSI.sub('', str(exc))}") from exc

    defaults = (meta.get("execute") or {})
    texts: dict[int, str] = {}
    inline_values: dict[int, list[str]] = {}
    for cell, (index, expr) in zip(notebook.cells, slots):
        if expr is not None:
            inline_values.setdefault(index, []).append(_inline_value(cell.outputs))
            continue
        part = parts[index]
        options = {**defaults, **part.options}
        if options.get("include") is False:
            texts[index] = ""
            continue
        pieces = []
        if options.get("echo") is True:
            pieces.append(f"```python\n{part.text}```\n")
        pieces.append(_outputs_markdown(cell.outputs, options, workdir, f"cell{part.line}"))
        texts[index] = "".join(pieces)
    for index, part in enumerate(parts):
        if part.kind == "markdown":
            values = iter(inline_values.get(index, []))
            texts[index] = INLINE.sub(lambda _: next(values), part.text)
    return Executed(meta, parts, texts, floats, where)


def project_formats(root: Path) -> dict[str, dict[str, Any]]:
    """The `format:` options of the project's _quarto.yml (e.g. a table of contents in HTML but not in the PDF),
    which the fallback follows where they apply to it; {} without the file."""
    path = Path(root) / "_quarto.yml"
    if not path.exists():
        return {}
    formats = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("format") or {}
    return {name: (options if isinstance(options, dict) else {}) for name, options in formats.items()}


def kernel_env(root: Path) -> dict[str, str]:
    """The document kernel's environment: it reads the project at `root` and imports this checkout's `analysis`
    package (the one rendering), whatever is installed, so the document needs no sys.path edit."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "SELFREF_ROOT": str(root), "PYTHONPATH": path}


def _metadata(meta: dict[str, Any], qmd: Path) -> dict[str, Any]:
    """Front matter for pandoc: Quarto's `date: last-modified` becomes the document's modification date."""
    out = {k: v for k, v in meta.items() if k not in ("execute", "format", "jupyter")}
    if out.get("date") == "last-modified":
        out["date"] = dt.date.fromtimestamp(qmd.stat().st_mtime).isoformat()
    return out


def _pandoc(source: Path, target: Path, to: str, extra: list[str], cwd: Path) -> None:
    import pypandoc

    pandoc = pypandoc.get_pandoc_path()
    cmd = [pandoc, str(source), "--from", "markdown", "--to", to, "--output", str(target), *extra]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"pandoc failed writing {target.name} ({to}):\n{done.stderr.strip()}")


def render_fallback(qmd: Path, outdir: Path, root: Path) -> RenderResult:
    """Render without Quarto: kernel, then pandoc to HTML and typst to PDF. Outputs appear atomically."""
    import typst

    qmd = qmd.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".render-", dir=qmd.parent) as tmp:
        work = Path(tmp)
        executed = execute_document(qmd, work, root)
        meta = _metadata(executed.meta, qmd)
        toc = bool(meta.pop("toc", False))
        formats = project_formats(root)
        toc_html = bool(formats.get("html", {}).get("toc", toc))
        toc_typst = bool(formats.get("typst", {}).get("toc", toc))
        front = "---\n" + yaml.safe_dump(meta, allow_unicode=True) + "---\n\n"
        front_typst = "---\n" + yaml.safe_dump({**meta, **PAGE}, allow_unicode=True) + "---\n\n"
        document, document_typst = work / "index.md", work / "index-typst.md"
        document_markdown = work / "index-markdown.md"
        document.write_text(front + executed.markdown("html"), encoding="utf-8")
        document_typst.write_text(front_typst + executed.markdown("typst"), encoding="utf-8")
        document_markdown.write_text(front + executed.markdown("markdown"), encoding="utf-8")
        css = work / "style.css"
        shared_css = qmd.parent / REPORT_CSS
        css.write_text(STYLE + (shared_css.read_text(encoding="utf-8") if shared_css.exists() else ""), encoding="utf-8")
        links = qmd.parent / FORMAT_LINKS
        with atomic_path(outdir / "index.html") as page:
            _pandoc(document, page, "html5", ["--standalone", "--embed-resources", "--mathml", f"--css={css}",
                                              *([f"--include-before-body={links}"] if links.exists() else []),
                                              "--resource-path", str(qmd.parent), *(["--toc"] if toc_html else [])],
                    qmd.parent)
        with atomic_path(outdir / "index.md") as markdown:
            _pandoc(document_markdown, markdown, "gfm-raw_html", ["--standalone"], qmd.parent)
        copy_images(outdir / "index.md", qmd.parent, outdir)
        typ = qmd.parent / f"{work.name}.typ"  # beside the document, so figure paths resolve as in the .qmd
        try:
            _pandoc(document_typst, typ, "typst", ["--standalone", *(["--toc"] if toc_typst else [])], qmd.parent)
            with atomic_path(outdir / "index.pdf") as pdf:
                try:
                    typst.compile(str(typ), output=str(pdf), root=str(qmd.parent))
                except Exception as exc:  # typst raises its own error types
                    raise UserError(f"typst could not compile the PDF of {qmd.name}: {exc}") from exc
        finally:
            typ.unlink(missing_ok=True)
    return RenderResult("fallback (nbclient + pandoc + typst)", outdir / "index.html", outdir / "index.pdf",
                        outdir / "index.md")


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def copy_images(markdown: Path, source: Path, outdir: Path) -> list[Path]:
    """Copy every local image the Markdown export links to (paths relative to the document's folder `source`) to the
    same relative place under `outdir`, beside the export; returns the copies."""
    copies = []
    for link in dict.fromkeys(IMAGE.findall(markdown.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", link):
            continue
        original, copy = source / link, outdir / link
        if not original.is_file():
            raise UserError(f"{markdown.name} links to {link}, which is not in {source}; run `selfref figures`")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, copy)
        copies.append(copy)
    return copies


# ----------------------------------------------------------------------------------------------------
# Quarto, the primary renderer.

def _quarto_runs(qmd: Path, outdir: Path, quarto: str, root: Path, scratch: Path) -> list[tuple[list[str], Path]]:
    """The `quarto render` commands of the report and where each runs: one per format of _quarto.yml, each in its
    own copy of the project's Quarto sources (Quarto writes its intermediate notebook beside the .qmd, so two
    renders of one folder collide), writing into `outdir`; a project of one format renders in place."""
    formats = list(project_formats(root))
    source = qmd.relative_to(root)
    if len(formats) < 2:
        return [([quarto, "render", str(source), "--output-dir", str(outdir)], root)]
    runs = []
    for fmt in formats:
        copy = scratch / fmt
        copy.mkdir(parents=True)
        shutil.copy2(root / "_quarto.yml", copy / "_quarto.yml")
        shutil.copytree(qmd.parent, copy / source.parent,
                        ignore=shutil.ignore_patterns("_output", ".quarto", "*_files", "*.quarto_ipynb*"))
        runs.append(([quarto, "render", str(source), "--to", fmt, "--output-dir", str(outdir)], copy))
    return runs


def render_quarto(qmd: Path, outdir: Path, quarto: str, root: Path) -> RenderResult:
    """`quarto render` of the project, its formats (from _quarto.yml) side by side; outputs are moved to `outdir`.
    Each format executes the document's cells anew (as one `quarto render` of several formats also does)."""
    env = {**kernel_env(root), "QUARTO_PYTHON": sys.executable}  # this environment's kernel
    scratch = project_paths(root).scratch
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quarto-", dir=scratch) as tmp:
        runs = _quarto_runs(qmd, outdir, quarto, root, Path(tmp))
        started = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for cmd, cwd in runs]
        finished = [(process.args, *process.communicate(), process.returncode) for process in started]
    for cmd, _, stderr, returncode in finished:
        if returncode != 0:
            raise UserError(f"{' '.join(map(str, cmd[1:]))} failed:\n{stderr.strip()[-4000:]}")
        for line in ANSI.sub("", stderr).splitlines():
            if line.startswith(("WARN", "ERROR")):
                log.warning("quarto: %s", line)
    outdir.mkdir(parents=True, exist_ok=True)
    for suffix in ("html", "pdf", "md"):
        target = outdir / f"index.{suffix}"
        candidates = [outdir / qmd.parent.relative_to(root) / f"index.{suffix}", target]
        found = next((c for c in candidates if c.exists()), None)
        if found is None and suffix == "md":  # a _quarto.yml without the gfm format: no Markdown export
            log.warning("quarto render wrote no index.md; add the gfm format to _quarto.yml for the Markdown export")
            continue
        if found is None:
            raise UserError(f"quarto render wrote no index.{suffix} under {outdir}; check _quarto.yml formats")
        if found != target:
            shutil.move(found, target)
    nested = outdir / qmd.parent.relative_to(root)  # where Quarto put them: left empty by the moves above
    if nested != outdir and nested.is_dir() and not any(nested.iterdir()):
        nested.rmdir()
    markdown = outdir / "index.md"
    if markdown.exists():
        copy_images(markdown, qmd.parent, outdir)
    return RenderResult("quarto", outdir / "index.html", outdir / "index.pdf", markdown if markdown.exists() else None)


QUARTO_INSTALL_HINT = ("install Quarto with `make quarto` (pip's quarto-cli into .venv; offline: "
                       "`make quarto QUARTO_INSTALLER=<path to an offline install.sh>`) or from quarto.org")


def find_quarto(root: Path | None = None) -> str | None:
    """`quarto` on PATH, else one installed by `make quarto`: quarto-cli in this Python's environment, or
    the offline installer's copy in .quarto-offline/ of the project `root` (default: SELFREF_ROOT or this
    checkout)."""
    found = shutil.which("quarto")
    if found:
        return found
    for candidate in (Path(sys.executable).parent / "quarto", project_paths(root).quarto_offline / "bin" / "quarto"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def render_report(qmd: Path, outdir: Path, renderer: str = "auto", root: Path | None = None) -> RenderResult:
    """Render with Quarto when it is installed (or when asked), else with the fallback renderer.

    `root` is the project the document's cells read (default: SELFREF_ROOT or this checkout)."""
    root = Path(root) if root is not None else project_paths().root
    if renderer not in RENDERERS:
        raise UserError(f"renderer {renderer!r}: use one of {', '.join(RENDERERS)}")
    if not qmd.exists():
        raise UserError(f"{qmd}: report source missing")
    quarto = find_quarto(root) if renderer in ("auto", "quarto") else None
    if renderer == "quarto" and quarto is None:
        raise UserError(f"renderer quarto: `quarto` is not on PATH nor installed in the project; "
                        f"{QUARTO_INSTALL_HINT}, or use --renderer fallback")
    if quarto is not None:
        log.info("rendering %s with Quarto (%s)", qmd.name, quarto)
        return render_quarto(qmd, outdir, quarto, root)
    if renderer == "fallback":
        log.info("rendering %s with the fallback renderer (nbclient + pandoc + typst)", qmd.name)
    else:
        log.info("Quarto not found: rendering %s with the fallback renderer (nbclient + pandoc + typst); %s",
                 qmd.name, QUARTO_INSTALL_HINT)
    return render_fallback(qmd, outdir, root)
