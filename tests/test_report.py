"""The report built from the demo suite's tracked artefacts, under both renderers (Quarto and the fallback):
numbers, sections, numbered figures and tables, offline HTML, PDF."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pypdf import PdfReader

from analysis.core import config
from analysis.report import rendering
from analysis.core.layout import project_paths
from analysis.report.document import Numbers, format_number, lookup, ranked_values, undefined
from analysis.verbs import report as report_stage

pytestmark = pytest.mark.slow  # renders the report with both renderers and screenshots it (make test-fast leaves it out)

REPO = Path(__file__).resolve().parent.parent
INPUTS = ["params.yaml", "dvc.lock", "_quarto.yml", "data/stats", "data/models", "data/prompts/summary.json", "data/original",
          "data/patching",
          "report/index.qmd", "report/figures"]
SECTIONS = ["The question", "Method", "Results", "Candidate heads for activation patching",
            "Does the language of the question matter?", "Comparison with the original study", "Does it hold?",
            "Do the candidate heads matter?",
            "Limitations and next steps", "Appendix: provenance"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
                  "--virtual-time-budget=20000", "--window-size=1200,1600"]
FLOAT_NAMES = {"fig": "Figure", "tbl": "Table"}
LABELS = re.findall(r"^#\|\s*label:\s*((fig|tbl)-[\w-]+)", (REPO / "report/index.qmd").read_text(), re.M)
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
    assert sources == {"data/stats/metrics.json", "data/original/reanalysis.json"} | patching, sources
    for src, key, style, text in parser.found:
        data = json.loads((root / src).read_text())
        value = lookup(data, key)
        expected = (", ".join(map(str, ranked_values(value))) if style == "list"
                    else undefined(Numbers(data).reason(key)) if value is None else format_number(value, style))
        assert text == expected, f"{src}: {key}: page says {text}, the artefact gives {expected}"
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
    for section in sections:
        if section == "appendix-provenance" and 'id="quarto-appendix"' in html:
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
    for title in SECTIONS:
        assert title in text, title
    source = (REPO / "report/index.qmd").read_text()
    for label, number in expected_numbers().items():
        caption = re.search(rf"#\|\s*label:\s*{label}\n#\|\s*(?:fig|tbl)-cap:\s*\"([^\"]+)\"", source).group(1)
        words = " ".join(caption.split()[:4])
        assert f"{number}: {words}" in text, f"caption of {label} missing from the PDF"
    drawn = sum(len(page["/Resources"].get_object().get("/XObject", {}).get_object()) for page in reader.pages
                if "/Resources" in page and "/XObject" in page["/Resources"].get_object())
    assert drawn >= N_FIGURES
