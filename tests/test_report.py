"""The report built from the demo suite's tracked artefacts, under both renderers (Quarto and the fallback):
numbers, sections, numbered figures and tables, offline HTML, PDF."""

import json
import os
import re
import shutil
import subprocess
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pypandoc
import pytest
import yaml
from pypdf import PdfReader
from pypdf.generic import ContentStream

from analysis.core import config
from analysis.report import rendering
from analysis.core.layout import project_paths
from analysis.report.document import Numbers, Table, format_number, lookup, ranked_values, undefined
from analysis.verbs import report as report_stage

pytestmark = pytest.mark.slow  # renders the report with both renderers and screenshots it (make test-fast leaves it out)

REPO = Path(__file__).resolve().parent.parent
# what the report stage reads: its dvc.yaml deps (the document, its includes, the artefacts) and the settings
INPUTS = ["params.yaml", "dvc.lock"] + [d for d in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]["deps"]
                                        if not d.startswith("analysis/")]
SECTIONS = ["The question", "What this build found", "Method", "Results", "Candidate heads",
            "Where along post-training does it change?", "Does the language of the question matter?",
            "Do the candidate heads matter?", "Does it hold?", "Comparison with the original study",
            "What it means, and what it does not", "Limitations and next steps", "Appendix"]
PAGE_BUDGET = 12  # pages of main text (before the appendix), the tracked default build (issue 23)
MARGIN_PT = 90    # the PDF's page margins, 1.25 in (Quarto's typst page; the fallback uses the same)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
                  "--virtual-time-budget=20000", "--window-size=1200,1600"]
FLOAT_NAMES = {"fig": "Figure", "tbl": "Table"}
LABELS = re.findall(r"^#\|\s*label:\s*((fig|tbl)-[\w-]+)", rendering.expand_includes(REPO / "report/index.qmd"), re.M)
N_FIGURES = sum(kind == "fig" for _, kind in LABELS)  # every figure is one chart
NBSP = re.compile(r"&nbsp;|&#160;|\xa0")


@pytest.fixture(scope="module", params=["quarto", "fallback"])
def built(request, tmp_path_factory):
    """Render the report from a copy of the tracked demo artefacts, with real Quarto and with the fallback
    renderer; the Quarto variant is skipped, saying how to install it, where Quarto is absent."""
    quarto = rendering.find_quarto()  # in this checkout (PATH, .venv or .quarto-offline/)
    if request.param == "quarto" and quarto is None:
        pytest.skip(f"Quarto is not installed: {rendering.QUARTO_INSTALL_HINT}")
    root = tmp_path_factory.mktemp(f"project-{request.param}")
    for name in INPUTS:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    path = os.environ["PATH"]
    if quarto is not None:  # the copy has no .quarto-offline/ of its own
        os.environ["PATH"] = f"{Path(quarto).parent}{os.pathsep}{path}"
    try:  # through the report stage: rendered into a staging folder, then swapped in for report/_output
        result = report_stage.run(config.load(project_paths(root)), request.param)
    finally:
        os.environ["PATH"] = path
    assert result.renderer.startswith(request.param)
    assert result.html == root / "report" / "_output" / "index.html" and result.pdf.is_file()
    return root, result


def expected_numbers() -> dict[str, str]:
    """Each label of the document with the number it must get: per kind, in document order."""
    counts, out = {}, {}
    for label, kind in LABELS:
        counts[kind] = counts.get(kind, 0) + 1
        out[label] = f"{FLOAT_NAMES[kind]} {counts[kind]}"
    return out


def toc_links(html: str) -> list[str]:
    """The link targets of the page's table of contents (`<nav id="TOC">`, pandoc's and Quarto's)."""
    nav = re.search(r'<nav[^>]*id="TOC"[^>]*>(.*?)</nav>', html, re.S)
    assert nav, "the page has no table of contents"
    return re.findall(r'href="#([^"]+)"', nav.group(1))


class NumberSpans(HTMLParser):
    """Collects (key, style, text) of every <span class="num"> in a page."""

    def __init__(self):
        super().__init__()
        self.found, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "num":
            self._open = [attrs["data-artefact"], attrs["data-key"], attrs["data-fmt"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[3] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.found.append((self._open[0], self._open[1], self._open[2], " ".join(self._open[3].split())))
            self._open = None


def test_undefined_prints_as_words_and_zero_has_no_sign():
    """An undefined number is printed "undefined (reason)" (or "no effect" within the noise floor), never as 0, 1,
    −0.0 or nan; a tiny negative value rounded to zero loses its sign."""
    assert format_number(-1e-9, "pct1") == "0.0%" and format_number(-4e-5, "f4") == "0.0000"
    assert format_number(-0.5, "f1") == "-0.5" and format_number(-2e-9, "e2") == "-2.00e-09"
    assert format_number(None, "p") == "undefined"
    num = Numbers({"pairs": {"a~b": {"pearson_r": None, "pearson_r_lo": None, "undefined_reason": "no signal in b"}},
                   "stages": {"f": {"dpo": {"share_delta_rfc": None,
                                            "share_delta_rfc_reason": "the total change is within the noise floor"}}},
                   "heads": {"L2H0": {"q_value": None, "test_reason": "no effect (within the noise floor)"}}})
    assert "[undefined (no signal in b)]" in str(num.show("pairs.a~b.pearson_r"))
    assert str(num.interval("pairs.a~b.pearson_r")) == str(num.show("pairs.a~b.pearson_r"))
    assert "[undefined (the total change is within the noise floor)]" in str(num.show("stages.f.dpo.share_delta_rfc"))
    assert "[no effect]" in str(num.show("heads.L2H0.q_value"))
    deep = Numbers({"pairs": {"a~b": {"pearson_p": None, "undefined_reason": None,
                                      "parametric_p_reason": "interpolated points are not independent"}}})
    assert "[undefined (interpolated points are not independent)]" in str(deep.show("pairs.a~b.pearson_p"))


def test_every_stated_number_equals_its_artefact_at_its_precision(built):
    """Each number in the text is a span naming its artefact and key; its text is that value as printed."""
    root, result = built
    metrics = json.loads((root / "data/stats/metrics.json").read_text())
    parser = NumberSpans()
    parser.feed(result.html.read_text())
    defined = [pair for pair, values in metrics["pairs"].items() if values["pearson_r"] is not None]
    assert len(parser.found) >= 7 * len(metrics["families"]) + 11 * len(defined)
    sources = {src for src, _, _, _ in parser.found}
    patching = {f"data/patching/{f}.json" for f in metrics["families"]}  # the patching table (tbl-patching)
    tables = {"report/figures/findings.parquet", "report/figures/planted.parquet", "report/figures/tested_mass.parquet"}
    assert {"data/stats/metrics.json", "data/original/reanalysis.json"} | patching | tables <= sources, sources
    if metrics["checkpoints"]:  # the real-checkpoint section and its appendix tables print from their artefacts too
        single = {"data/stats/self_focus_heads.parquet", "report/figures/single_checkpoints.parquet",
                  "data/bos_trap/metrics.json"} | {f"data/patching/{f}.json" for f in metrics["checkpoints"]}
        assert single <= sources, single - sources
        keys = {key for src, key, _, _ in parser.found if src == "data/stats/metrics.json"}
        assert {f"checkpoints.{f}.{k}" for f in metrics["checkpoints"] for k in ("mean_rfc", "mean_rfc_lo", "mean_rfc_hi",
                "n_layers_rfc_above_0", "n_layers_rfc_below_0")} <= keys
    assert "data/probes/metrics.json" in sources  # the probe section (and its appendix table)
    assert all(s.startswith(("data/stats/", "data/original/", "data/patching/", "data/probes/", "data/bos_trap/",
                             "report/figures/")) for s in sources)
    for src, key, style, text in parser.found:
        if src.endswith(".parquet"):  # a table cell: `id=value;...::column`
            frame = pd.read_parquet(root / src)
            ids, column = key.split("::")
            picks = dict(part.split("=", 1) for part in ids.split(";"))
            row = frame[(frame[list(picks)].astype(str) == pd.Series(picks)).all(axis=1)]
            assert len(row) == 1, f"{src}: {key} picks {len(row)} rows"
            row = row.iloc[0]
            value = row[column]
            missing = value is None or (isinstance(value, float) and value != value)
            reason = Table(frame, src, tuple(picks)).reason(row, column)
            expected = undefined(reason) if missing else format_number(value, style)
        else:
            data = json.loads((root / src).read_text())
            value = lookup(data, key)
            expected = (", ".join(map(str, ranked_values(value))) if style == "list"
                        else undefined(Numbers(data).reason(key)) if value is None else format_number(value, style))
        assert text == " ".join(expected.split()), f"{src}: {key}: page says {text}, the artefact gives {expected}"
    keys = {key for src, key, _, _ in parser.found if src == "data/stats/metrics.json"}
    for family in metrics["families"]:
        for field in ("mean_delta_rfc", "mean_delta_rfc_lo", "mean_delta_rfc_hi", "share_compression",
                      "share_gain", "share_no_change"):
            assert f"families.{family}.{field}" in keys
    for pair, values in metrics["pairs"].items():
        if values["pearson_r"] is not None:
            assert {f"pairs.{pair}.pearson_r", f"pairs.{pair}.pearson_p", f"pairs.{pair}.pearson_p_shift"} <= keys


def test_every_inline_expression_was_evaluated(built):
    """No `{python} ...` is left in the page: Quarto prints an inline expression literally when it fails or
    returns nothing."""
    _, result = built
    assert "{python}" not in result.html.read_text()


def test_demo_build_says_it_is_synthetic_and_names_its_sources(built):
    """A demo report opens with the synthetic warning; each results section names its artefact."""
    _, result = built
    html = result.html.read_text()
    warning = html.index("Synthetic demo")
    assert warning < html.index('id="the-question"')
    for artefact in ("data/stats/metrics.json", "data/stats/deltas.parquet", "data/stats/heads.parquet",
                     "data/stats/cross_family.parquet", "data/stats/robustness.parquet",
                     "data/stats/length_control.parquet", "data/stats/split_half.parquet"):
        assert artefact in html


def test_html_is_self_contained(built):
    """No script, stylesheet or image is fetched from anywhere: everything is inlined."""
    root, result = built
    html = result.html.read_text()
    assert not re.search(r'<(script|img|link)[^>]+(src|href)="(https?:)?//', html)
    assert "window.vegaEmbed" in html and html.count('class="vega-chart"') == N_FIGURES
    end = html.index("window.vegaEmbed=") if "window.vegaEmbed=" in html else html.index("window.vegaEmbed =")
    assert "<table" not in html[html.rindex("<script", 0, end):end], "Quarto would read the bundle's <table as HTML"


def test_figures_and_tables_are_numbered_and_cross_referenced_in_html(built):
    """Every labelled cell is a numbered float whose caption starts with its number, in document order
    per kind; every `@label` in the text became a link reading that same number."""
    _, result = built
    html = NBSP.sub(" ", result.html.read_text())
    numbers = expected_numbers()
    assert N_FIGURES >= 6 and len([k for _, k in LABELS if k == "tbl"]) >= 9
    for label, number in numbers.items():
        start = html.index(f'id="{label}"')
        caption = re.search(r"(Figure|Table) (\d+):", html[start:])
        assert caption and f"{caption.group(1)} {caption.group(2)}" == number, f"{label}: caption numbered {caption}"
        links = re.findall(rf'<a href="#{label}"[^>]*>([^<]*)</a>', html)
        assert links and set(links) == {number}, f"{label}: cross-references read {links}, expected {number}"
    text = re.sub(r"<script.*?</script>", "", html, flags=re.S)
    assert "@fig-" not in text and "@tbl-" not in text and "?@" not in text, "an unresolved cross-reference"


def test_toc_links_every_section(built):
    """The table of contents is a list of links to each section and subsection of the page (Quarto moves
    the appendix out of the body, and out of the TOC, into its own block at the end)."""
    _, result = built
    html = result.html.read_text()
    sections = set(re.findall(r'<section id="([^"]+)" class="level[23]', html))  # Quarto
    sections |= set(re.findall(r'<h[23][^>]*\bid="([^"]+)"', html))  # pandoc without section divs
    sections -= {"TOC", "toc-title"}  # the TOC's own heading (Quarto)
    assert len(sections) > len(SECTIONS)  # the named sections and their subsections
    links = toc_links(html)
    appendix = html.find('id="quarto-appendix"')  # Quarto's appendix block: out of the TOC by design
    for section in sections:
        if appendix >= 0 and html.find(f'id="{section}"') > appendix:
            continue
        assert section in links, f"section {section} is not in the table of contents"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_renders_its_charts_offline_in_chromium(built, tmp_path):
    """Headless Chromium with the network blocked draws every chart as SVG and takes a screenshot."""
    root, result = built
    url = result.html.resolve().as_uri()
    dom = subprocess.run(["chromium", *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    charts = re.split(r'<div id="vis-[^"]+" class="vega-chart', dom.stdout)[1:]
    assert len(charts) == N_FIGURES
    for chart in charts:
        drawn = chart.split("</svg>")[0]
        assert "<svg" in drawn and drawn.count("<path") > 5, "a chart did not render"
    shot = tmp_path / "report.png"
    done = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--screenshot={shot}", url], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and shot.stat().st_size > 20_000


def test_pdf_has_the_sections_and_numbered_captions(built):
    """The PDF's text holds every section title and every caption with its number, and every chart is
    drawn in it."""
    _, result = built
    reader = PdfReader(result.pdf)
    text = " ".join(" ".join(page.extract_text() for page in reader.pages).replace("\xa0", " ").split())
    text = text.replace("\u2019", "'")  # Quarto's typographic apostrophes
    text = text.replace("\x13 ", "").replace("\x13", "-")  # a hyphen as Quarto's typst PDF encodes it (and at a line break)
    for title in SECTIONS:
        assert title in text, title
    source = rendering.expand_includes(REPO / "report/index.qmd")
    for label, number in expected_numbers().items():
        caption = re.search(rf"#\|\s*label:\s*{label}\n#\|\s*(?:fig|tbl)-cap:\s*\"([^\"]+)\"", source).group(1)
        words = " ".join(caption.split()[:4])
        assert f"{number}: {words}" in text, f"caption of {label} missing from the PDF"
    drawn = sum(len(page["/Resources"].get_object().get("/XObject", {}).get_object()) for page in reader.pages
                if "/Resources" in page and "/XObject" in page["/Resources"].get_object())
    assert drawn >= N_FIGURES


def test_findings_come_first_and_the_planted_table_is_computed(built):
    """After the question, the findings: one item per family and the planted-vs-recovered table, whose cells name
    report/figures/planted.parquet; all of them agree in the demo."""
    root, result = built
    html = NBSP.sub(" ", result.html.read_text())
    assert html.index('id="the-question"') < html.index('id="what-this-build-found"') < html.index('id="method"')
    found = html[html.index('id="what-this-build-found"'):html.index('id="method"')]
    planted = pd.read_parquet(root / "report/figures/planted.parquet")
    assert len(planted) and planted["agrees"].all()
    for family in planted["family"]:
        assert f"<strong>{family}</strong>" in found
    assert found.count('artefact="report/figures/planted.parquet"') >= 4 * len(planted)
    assert "✓" in found and "every planted aspect of" in found


def test_no_empty_table_and_no_code_names(built):
    """Every table has rows; class, intervention and definition codes read as words; no nan."""
    _, result = built
    html = result.html.read_text()
    body = re.sub(r"<script.*?</script>|<style.*?</style>", "", html, flags=re.S)
    for table in re.findall(r"<table.*?</table>", body, re.S):
        assert re.search(r"<tbody[^>]*>\s*<tr", table), "a table without rows"
    text = re.sub(r"<[^>]+>", " ", body)
    for code in ("no_change", "mean_ablation@base", "patch_base_into_instruct", "split_half_r", " nan ", "n/a"):
        assert code not in text, code
    assert "data/patching/.parquet" not in text and "data/patching/.json" not in text


def test_the_pdf_link_says_pdf(built):
    """The HTML links the PDF as "PDF" (not the engine's name) and the Markdown export beside it."""
    _, result = built
    html = result.html.read_text()
    assert re.search(r'<a href="index.pdf"[^>]*>(<i[^>]*></i>)?PDF</a>', html)
    assert re.search(r'<a href="index.md"[^>]*>(<i[^>]*></i>)?Markdown</a>', html)
    assert not re.search(r">\s*Typst\s*</a>", html)


def pdf_pages_text(pdf: Path) -> list[str]:
    return [page.extract_text() for page in PdfReader(pdf).pages]


def test_pdf_main_text_fits_the_page_budget(built):
    """The main text, everything before the appendix, takes at most PAGE_BUDGET pages."""
    _, result = built
    pages = pdf_pages_text(result.pdf)
    first = next(i for i, text in enumerate(pages) if re.search(r"^\s*Appendix\s*$", text, re.M))
    assert first <= PAGE_BUDGET, f"the appendix starts on page {first + 1}: {first} pages of main text"


def placed_images(pdf: Path) -> list[tuple[int, tuple[float, float, float, float], list[float]]]:
    """(page, (x0, y0, x1, y1), media box) of every image and form XObject the page's own content stream draws, in
    points: its box transformed by its own matrix and the transformation in force where it is drawn (q/Q/cm tracked
    here; the forms' inner drawings, which reuse names like /x0 in their own resources, are not the page's)."""
    out = []
    reader = PdfReader(pdf)
    for i, page in enumerate(reader.pages):
        resources = page.get("/Resources")
        xobjects = resources.get_object().get("/XObject", {}) if resources is not None else {}
        xobjects = xobjects.get_object() if xobjects else {}
        contents = page.get_contents()
        if contents is None:
            continue
        ctm, stack = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], []
        for operands, operator in ContentStream(contents, reader).operations:
            if operator == b"q":
                stack.append(ctm)
            elif operator == b"Q":
                ctm = stack.pop() if stack else ctm
            elif operator == b"cm":
                a, b, c, d, e, f = [float(v) for v in operands]
                A, B, C, D, E, F = ctm
                ctm = [a * A + b * C, a * B + b * D, c * A + d * C, c * B + d * D, e * A + f * C + E, e * B + f * D + F]
            elif operator == b"Do" and operands[0] in xobjects:
                x = xobjects[operands[0]].get_object()
                if x.get("/Subtype") == "/Form":
                    a, b, c, d, e, f = [float(v) for v in x.get("/Matrix", [1, 0, 0, 1, 0, 0])]
                    x0, y0, x1, y1 = [float(v) for v in x["/BBox"]]
                    corners = [(a * px + c * py + e, b * px + d * py + f) for px in (x0, x1) for py in (y0, y1)]
                else:
                    corners = [(px, py) for px in (0, 1) for py in (0, 1)]
                A, B, C, D, E, F = ctm
                points = [(A * px + C * py + E, B * px + D * py + F) for px, py in corners]
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                out.append((i, (min(xs), min(ys), max(xs), max(ys)), [float(v) for v in page.mediabox]))
    return out


def test_every_pdf_figure_fits_the_text_area(built):
    """Every chart placed as one image (Quarto's typst: one per figure) lies inside the page's text area. The
    fallback's typst draws a chart's SVG as many small vector forms whose boxes are not its ink; its charts are
    checked by their ink (test_nothing_is_drawn_outside_the_text_area)."""
    _, result = built
    if not result.renderer.startswith("quarto"):
        pytest.skip("the fallback draws each chart as vector paths; test_nothing_is_drawn_outside_the_text_area checks it")
    placed = [p for p in placed_images(result.pdf) if p[1][2] - p[1][0] >= 200]  # the charts (not glyph groups)
    assert len(placed) == N_FIGURES, f"{len(placed)} charts placed as one image each, {N_FIGURES} figures"
    for page, (x0, y0, x1, y1), (mx0, my0, mx1, my1) in placed:
        area = (mx0 + MARGIN_PT - 1, my0 + MARGIN_PT - 1, mx1 - MARGIN_PT + 1, my1 - MARGIN_PT + 1)
        assert area[0] <= x0 and area[1] <= y0 and x1 <= area[2] and y1 <= area[3], \
            f"page {page + 1}: a figure at {(x0, y0, x1, y1)} leaves the text area {area}"


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="needs poppler-utils (.ci/run installs it)")
def test_nothing_is_drawn_outside_the_text_area(built, tmp_path):
    """Each page as an image: no ink in the margins (a figure taller than the page runs into them), except the
    page number centred at the foot. Holds for any way a renderer draws a chart (one image or many paths)."""
    _, result = built
    dpi = 24  # 1 px = 3 pt
    subprocess.run(["pdftoppm", "-r", str(dpi), "-gray", str(result.pdf), str(tmp_path / "page")], check=True,
                   timeout=300)
    pages = sorted(tmp_path.glob("page-*.pgm"))
    assert len(pages) == len(PdfReader(result.pdf).pages)
    margin = MARGIN_PT * dpi // 72 - 1  # pixels of margin, less one for anti-aliasing at the edge
    for path in pages:
        width, height, pixels = read_pgm(path)
        for y in range(height):
            for x in range(width):
                inside = margin <= x < width - margin and margin <= y < height - margin
                footer = y >= height - margin and abs(x - width / 2) < 40  # the page number
                if not inside and not footer and pixels[y * width + x] < 200:
                    raise AssertionError(f"{path.name}: ink at ({x}, {y}) px, outside the text area")


def read_pgm(path: Path) -> tuple[int, int, bytes]:
    """(width, height, grey bytes) of a binary PGM written by pdftoppm -gray."""
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P5"
    width, height = int(parts[1]), int(parts[2])
    return width, height, parts[4][-width * height:]


def test_markdown_export_has_every_figure(built):
    """The report stage writes index.md beside the HTML and PDF with the figures it links to; pandoc renders it back
    with every image, and it carries no script."""
    _, result = built
    assert result.markdown is not None and result.markdown.parent == result.html.parent
    text = result.markdown.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(images) == N_FIGURES, images
    for link in images:
        assert (result.markdown.parent / link).is_file(), link
    assert "<script" not in text and "{python}" not in text
    assert "Table 1" in text.replace("\xa0", " ") and "Figure 1" in text.replace("\xa0", " ")
    back = pypandoc.convert_file(str(result.markdown), "html", format="gfm")
    assert back.count("<img") == N_FIGURES


def chromium(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    done = subprocess.run(["chromium", *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_every_chart_shows_without_javascript(built, tmp_path):
    """With scripts off (as blog platforms strip them) every chart is still there as its static SVG image."""
    _, result = built
    stripped = tmp_path / "index.html"  # the page as a blog platform that strips scripts serves it
    stripped.write_text(re.sub(r"<script\b.*?</script>", "", result.html.read_text(), flags=re.S))
    url = stripped.as_uri()
    assert "<script" not in stripped.read_text()
    dom = chromium("--dump-dom", url).stdout
    boxes = re.findall(r'<div class="chart-box">(.*?)</div>', dom, re.S)
    assert len(boxes) == N_FIGURES
    for box in boxes:
        image = re.search(r"<img [^>]*>", box)
        assert image and 'class="chart-static' in image.group(0) and 'src="data:image/svg+xml' in image.group(0), box[:300]
    shot = tmp_path / "no-js.png"
    chromium(f"--screenshot={shot}", url)
    assert shot.stat().st_size > 20_000


MEASURE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var width = document.documentElement.clientWidth, wide = [];
  document.querySelectorAll("p, li, h2, h3, .chart-box, table, figure, pre, .quarto-float").forEach(function (e) {
    var box = e.getBoundingClientRect();
    if (box.width > 0 && box.right > width + 1) { wide.push(e.tagName + "." + e.className + ":" + Math.round(box.right)); }
  });
  window.parent.postMessage(JSON.stringify({width: width, scroll: document.documentElement.scrollWidth,
                                            wide: wide}), "*");
}, 3000); });
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_reads_at_400_px(built, tmp_path):
    """At 400 px wide the page does not scroll sideways: text reflows, and charts and tables stay inside the page
    (scrolling inside their own box where they are wider)."""
    _, result = built
    page = tmp_path / "index.html"  # the report with a script that measures it and tells the frame around it
    text = result.html.read_text()
    end = text.rindex("</body>")  # the last one: the Vega bundle has "</body>" inside a string
    page.write_text(text[:end] + MEASURE + text[end:])
    phone = tmp_path / "phone.html"  # headless Chromium's window is at least 500 px wide: a 400 px frame is the phone
    phone.write_text('<html><body style="margin:0"><pre id="fit-result"></pre>'
                     '<iframe src="index.html" style="width:400px;height:900px;border:0"></iframe><script>'
                     'window.addEventListener("message", function (e) {'
                     ' document.getElementById("fit-result").textContent = e.data; });</script></body></html>')
    done = chromium("--dump-dom", phone.as_uri())
    found = re.search(r'<pre id="fit-result">(.+?)</pre>', done.stdout, re.S)
    assert found, "the measuring script did not run"
    fit = json.loads(html_unescape(found.group(1)))
    assert fit["width"] <= 400 and fit["scroll"] <= fit["width"] + 1, fit
    assert not fit["wide"], fit["wide"][:10]
    shot = tmp_path / "phone.png"
    chromium("--window-size=420,900", f"--screenshot={shot}", phone.as_uri())
    assert shot.stat().st_size > 5_000
