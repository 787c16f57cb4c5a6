"""The fallback renderer: the Quarto features the report uses, on a small document with known output."""

import json
import re
import sys
from pathlib import Path

import altair as alt
import pandas as pd
import pytest
import vl_convert as vlc
from pypdf import PdfReader

from analysis.report import rendering
from analysis.core.errors import UserError

DOCUMENT = '''---
title: "Renderer check"
execute:
  echo: false
toc: true
---

```{python}
#| include: false
import sys
from pathlib import Path
from analysis.report.rendering import Markdown, chart_markdown, vega_bundle_markdown
hidden_value = 6 * 7
```

## First section

The answer is `{python} hidden_value` and twice that is `{python} 2 * hidden_value`; a string `{python} "a_b*c"` is text, `{python} Markdown("*emphasis*")` is markdown. See @tbl-small and @fig-tiny.

```{python}
#| output: asis
print(vega_bundle_markdown())
print("**bold from a cell**\\n")
```

```{python}
#| label: tbl-small
#| tbl-cap: "A small table (made_up.parquet)."
Markdown("| a | b |\\n|---|---|\\n| 1 | 2 |\\n")
```

```{python}
#| echo: true
print("plain output")
```

## Second section

@fig-tiny again, after @tbl-other.

```{python}
#| label: fig-tiny
#| fig-cap: "A tiny chart (made_up.parquet)."
chart_markdown(Path("figures/tiny.vl.json"), Path("figures/tiny.svg"))
```

```{python}
#| label: tbl-other
#| tbl-cap: "Another table."
Markdown("| c |\\n|---|\\n| 3 |\\n")
```
'''


@pytest.fixture
def document(tmp_path):
    folder = tmp_path / "report"
    (folder / "figures").mkdir(parents=True)
    chart = alt.Chart(pd.DataFrame({"x": [0, 1, 2], "y": [1.0, 3.0, 2.0]})).mark_line().encode(x="x:Q", y="y:Q")
    spec = chart.to_dict()
    (folder / "figures" / "tiny.vl.json").write_text(json.dumps(spec))
    (folder / "figures" / "tiny.svg").write_text(vlc.vegalite_to_svg(spec))
    qmd = folder / "index.qmd"
    qmd.write_text(DOCUMENT)
    return qmd


def test_cells_and_options_are_parsed_with_line_numbers():
    """Cells are split from markdown, `#|` options read as YAML and removed from the code."""
    meta, body = rendering.split_front_matter(DOCUMENT, "doc")
    assert meta["execute"] == {"echo": False} and meta["toc"] is True
    parts = rendering.chunks(body, "doc")
    code = [p for p in parts if p.kind == "code"]
    assert [p.options for p in code] == [
        {"include": False}, {"output": "asis"}, {"label": "tbl-small", "tbl-cap": "A small table (made_up.parquet)."},
        {"echo": True}, {"label": "fig-tiny", "fig-cap": "A tiny chart (made_up.parquet)."},
        {"label": "tbl-other", "tbl-cap": "Another table."}]
    assert code[0].text.startswith("import sys") and "#|" not in code[0].text
    assert body.splitlines()[code[1].line - 1] == "```{python}"


def test_bad_options_and_unclosed_front_matter_are_named():
    """Malformed documents fail with the document and line in the message."""
    with pytest.raises(UserError, match="doc:1: cell options"):
        rendering.chunks("```{python}\n#| echo: [unclosed\nx = 1\n```\n", "doc")
    with pytest.raises(UserError, match="never closed"):
        rendering.split_front_matter("---\ntitle: x\n", "doc")


def test_fallback_renders_html_and_pdf_with_quarto_semantics(document, tmp_path):
    """Inline expressions evaluate (a string as text, a Markdown value as markdown), include:false and echo
    follow Quarto, asis output becomes markdown, labelled cells become numbered floats with their
    captions (tables above, figures below) and `@label` links reading their numbers, in HTML and PDF;
    charts are interactive in HTML (spec and Vega inlined) and static in the PDF; the TOC links each section."""
    out = tmp_path / "out"
    result = rendering.render_fallback(document, out, tmp_path)
    html = result.html.read_text().replace("\xa0", " ").replace("&nbsp;", " ")
    flat = " ".join(html.split())
    assert "The answer is 42 and twice that is 84; a string a_b*c is text, <em>emphasis</em> is markdown." in flat
    assert "<strong>bold from a cell</strong>" in html and "<table" in html
    assert "hidden_value = 6 * 7" not in html, "include: false hides the code"
    assert "sourceCode python" in html and html.count("plain output") == 2, "echo: true shows code and output"
    assert "window.vegaEmbed" in html and '"mark": {"type": "line"}' in html.replace('"mark":{"type":"line"}',
                                                                                       '"mark": {"type": "line"}')
    assert "<script src=" not in html and "http://" not in html.split("<body")[1].split("<script")[0]
    assert re.findall(r'<a href="#(\w+-\w+)" class="quarto-xref">([^<]+)</a>', html) == [
        ("tbl-small", "Table 1"), ("fig-tiny", "Figure 1"), ("fig-tiny", "Figure 1"), ("tbl-other", "Table 2")]
    small = html[html.index('id="tbl-small"'):]
    assert small.index("Table 1: A small table (made_up.parquet).") < small.index("<table")
    tiny = html[html.index('id="fig-tiny"'):]
    assert tiny.index('class="vega-chart"') < tiny.index("Figure 1: A tiny chart (made_up.parquet).")
    nav = re.search(r'<nav[^>]*id="TOC"[^>]*>(.*?)</nav>', html, re.S)
    assert nav and re.findall(r'href="#([^"]+)"', nav.group(1)) == ["first-section", "second-section"]
    text = " ".join("".join(page.extract_text() for page in PdfReader(result.pdf).pages).split())
    assert "First section" in text and "Second section" in text and "42" in text
    assert "Table 1: A small table (made_up.parquet)." in text and "Table 2: Another table." in text
    assert "Figure 1: A tiny chart (made_up.parquet)." in text, "typst caption with escaped underscore"
    assert "See Table 1 and Figure 1." in text and "Figure 1 again, after Table 2." in text
    assert not list(document.parent.glob("*.typ")) and not list(document.parent.glob(".render-*"))


def test_a_reference_to_no_label_is_named(document, tmp_path):
    """`@fig-x` without a cell labelled fig-x stops the render, naming the reference."""
    document.write_text(DOCUMENT.replace("See @tbl-small", "See @tbl-missing"))
    with pytest.raises(UserError, match="@tbl-missing refers to no cell"):
        rendering.render_fallback(document, tmp_path / "out", tmp_path)


def test_failing_cell_names_the_document_and_writes_nothing(document, tmp_path):
    """A Python error in a cell stops the render with the document named; no output appears."""
    document.write_text(DOCUMENT.replace("hidden_value = 6 * 7", "hidden_value = 1 / 0"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"index.qmd:8: a Python cell failed.*ZeroDivisionError"):
        rendering.render_fallback(document, out, tmp_path)
    assert not list(out.glob("*")) if out.exists() else True


def test_renderer_choice(monkeypatch, document, tmp_path):
    """Asking for Quarto where it is absent is a clear error naming how to install it; an unknown renderer too."""
    monkeypatch.setattr(rendering, "find_quarto", lambda root=None: None)
    with pytest.raises(UserError, match="quarto.*not on PATH.*make quarto"):
        rendering.render_report(document, tmp_path / "out", renderer="quarto")
    with pytest.raises(UserError, match="use one of"):
        rendering.render_report(document, tmp_path / "out", renderer="latex")


def test_quarto_is_found_on_path_or_where_make_quarto_installs_it(monkeypatch, tmp_path):
    """PATH first; else quarto-cli beside this Python, else the offline copy in the project's .quarto-offline/."""
    monkeypatch.setattr(rendering.shutil, "which", lambda name: "/on/path/quarto")
    assert rendering.find_quarto(tmp_path) == "/on/path/quarto"
    monkeypatch.setattr(rendering.shutil, "which", lambda name: None)
    monkeypatch.setattr(rendering.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    assert rendering.find_quarto(tmp_path) is None
    offline = tmp_path / ".quarto-offline" / "bin" / "quarto"
    offline.parent.mkdir(parents=True)
    offline.write_text("#!/bin/sh\n")
    offline.chmod(0o755)
    assert rendering.find_quarto(tmp_path) == str(offline)
    monkeypatch.setenv("SELFREF_ROOT", str(tmp_path))
    assert rendering.find_quarto() == str(offline)
    beside = tmp_path / "venv" / "bin" / "quarto"
    beside.parent.mkdir(parents=True)
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    assert rendering.find_quarto(tmp_path) == str(beside)


def test_chart_markdown_gives_each_output_its_chart(tmp_path, document):
    """Interactive Vega-Lite for HTML, the SVG at the column's width for typst; a missing chart file says
    which stage makes it; the Vega bundle hides `<table` from Quarto's HTML-table reader."""
    folder = document.parent
    md = rendering.chart_markdown(folder / "figures/tiny.vl.json", folder / "figures/tiny.svg")
    assert '<div id="vis-tiny" class="vega-chart">' in md and 'window.vegaEmbed("#vis-tiny"' in md
    assert f'<img class="chart-static" src="{(folder / "figures/tiny.svg").as_posix()}"' in md  # without scripts
    assert f'#image("{(folder / "figures/tiny.svg").as_posix()}", width: 100%)' in md
    assert f'![chart tiny]({(folder / "figures/tiny.svg").as_posix()})' in md  # the Markdown export
    assert md._repr_markdown_() == md
    with pytest.raises(UserError, match="selfref figures"):
        rendering.chart_markdown(folder / "figures/none.vl.json", folder / "figures/tiny.svg")
    assert "<table" not in rendering.vega_bundle_markdown()


def test_a_chart_taller_than_the_text_area_is_sized_by_its_height(tmp_path):
    """A chart whose height at the text width would pass the PDF's text area (less a caption) is placed by height."""
    tall, wide = tmp_path / "tall.svg", tmp_path / "wide.svg"
    tall.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="600" height="1200"></svg>')
    wide.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="600" height="300"></svg>')
    assert rendering.typst_image(tall).endswith(f"height: {rendering.TEXT_HEIGHT_IN - rendering.CAPTION_IN}in)")
    assert rendering.typst_image(wide).endswith("width: 100%)")


def test_includes_and_conditional_content_follow_quarto(tmp_path):
    """`{{< include >}}` inserts a file (nested too; a missing one is named), and `.content-visible` /
    `.content-hidden` with `when-format` keep their body only in the formats they name."""
    (tmp_path / "part.qmd").write_text("## Included\n\n{{< include inner.qmd >}}\n")
    (tmp_path / "inner.qmd").write_text("inner text\n")
    (tmp_path / "index.qmd").write_text("before\n\n{{< include part.qmd >}}\n\nafter\n")
    assert rendering.expand_includes(tmp_path / "index.qmd") == "before\n\n## Included\n\ninner text\n\nafter\n"
    (tmp_path / "bad.qmd").write_text("{{< include absent.qmd >}}\n")
    with pytest.raises(UserError, match="absent.qmd"):
        rendering.expand_includes(tmp_path / "bad.qmd")
    text = ('a\n\n::: {.content-visible when-format="html"}\nweb <b>only</b>\n:::\n\n'
            '::: {.content-hidden when-format="html"}\nnot on the web\n:::\n\n' + rendering.only("markdown", "md only"))
    def kept(target):
        return rendering.conditional(text, target).split()
    assert kept("html") == ["a", "web", "<b>only</b>"]
    assert kept("typst") == ["a", "not", "on", "the", "web"]
    assert kept("markdown") == ["a", "not", "on", "the", "web", "md", "only"]


def test_captions_and_cells_keep_angle_brackets_as_text():
    """`<family>` in a caption or cell is escaped, so HTML shows it instead of reading a tag."""
    assert rendering.escape_markup("data/patching/<family>.parquet") == "data/patching/\\<family\\>.parquet"
    assert rendering.escape_markup("already \\<x\\>") == "already \\<x\\>"


def test_quarto_is_preferred_and_its_outputs_land_in_report_output(tmp_path, monkeypatch):
    """With `quarto` on PATH, `auto` runs `quarto render` from the project root, with this Python as its
    kernel, and moves the project's outputs to report/_output/index.{html,pdf}."""
    root = tmp_path / "project"
    (root / "report").mkdir(parents=True)
    qmd = root / "report" / "index.qmd"
    qmd.write_text("---\ntitle: x\n---\n")
    fake = tmp_path / "quarto"
    fake.write_text('#!/bin/sh\nset -e\ntest "$1" = render && test "$2" = report/index.qmd\n'
                    'mkdir -p report/_output/report\necho "$QUARTO_PYTHON" > report/_output/report/index.html\n'
                    'echo pdf > report/_output/report/index.pdf\n')
    fake.chmod(0o755)
    monkeypatch.setattr(rendering.shutil, "which", lambda name: str(fake) if name == "quarto" else None)
    result = rendering.render_report(qmd, root / "report" / "_output", root=root)
    assert result.renderer == "quarto"
    assert result.html == root / "report" / "_output" / "index.html" and result.pdf.read_text() == "pdf\n"
    assert result.html.read_text().strip() == sys.executable


def test_quarto_renders_each_format_side_by_side_in_its_own_copy_of_the_sources(tmp_path, monkeypatch):
    """Quarto writes its intermediate notebook beside the .qmd, so each format of _quarto.yml renders in its own
    copy of the sources (concurrent renders of one folder collide); the outputs land in report/_output and the
    copies are gone afterwards. A format that fails is named in the error."""
    root = tmp_path / "project"
    (root / "report" / "figures").mkdir(parents=True)
    (root / "report" / "figures" / "a.svg").write_text("<svg/>")
    qmd = root / "report" / "index.qmd"
    qmd.write_text("---\ntitle: x\n---\n")
    (root / "_quarto.yml").write_text("format:\n  html: {}\n  typst: {output-file: index.pdf}\n"
                                      "  gfm: {output-file: index.md}\n")
    log = tmp_path / "runs.txt"
    fake = tmp_path / "quarto"
    fake.write_text('#!/bin/sh\nset -e\ntest "$1" = render && test "$2" = report/index.qmd && test "$3" = --to\n'
                    'test -f report/figures/a.svg && test -f _quarto.yml\n'
                    f'echo "$4 $PWD" >> {log}\n'
                    'case "$4" in html) ext=html;; typst) ext=pdf;; gfm) ext=md;; esac\n'
                    'test "$4" != "${FAIL_FORMAT:-}" || { echo "typst: boom" >&2; exit 1; }\n'
                    'mkdir -p "$6/report" && echo "$4" > "$6/report/index.$ext"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(rendering.shutil, "which", lambda name: str(fake) if name == "quarto" else None)
    result = rendering.render_report(qmd, root / "report" / "_output", root=root)
    runs = dict(line.split(" ", 1) for line in log.read_text().splitlines())
    assert sorted(runs) == ["gfm", "html", "typst"]
    assert len(set(runs.values())) == 3 and str(root) not in {r.strip() for r in runs.values()}
    assert result.html.read_text() == "html\n" and result.pdf.read_text() == "typst\n"
    assert (root / "report" / "_output" / "index.md").read_text() == "gfm\n"
    assert not any((root / ".selfref-tmp").iterdir())
    assert not list((root / "report").glob("*.quarto_ipynb*"))
    monkeypatch.setenv("FAIL_FORMAT", "typst")
    with pytest.raises(UserError, match=r"render report/index.qmd --to typst .*failed:\s+typst: boom"):
        rendering.render_report(qmd, root / "report" / "_output", root=root)
