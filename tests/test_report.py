"""The report built from the demo suite's tracked artefacts: numbers, offline HTML, PDF."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pypdf import PdfReader

from analysis import rendering
from analysis.layout import project_paths
from analysis.reporting import format_number, lookup, ranked_values

REPO = Path(__file__).resolve().parent.parent
INPUTS = ["params.yaml", "dvc.lock", "data/stats", "data/models", "data/prompts/summary.json", "report/index.qmd",
          "report/figures"]
SECTIONS = ["The question", "Method", "Results", "Candidate heads for activation patching", "Does it hold?",
            "Limitations and next steps", "Appendix: provenance"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars",
                  "--virtual-time-budget=20000", "--window-size=1200,1600"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Render the report with the fallback renderer from a copy of the tracked demo artefacts."""
    root = tmp_path_factory.mktemp("project")
    for name in INPUTS:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    paths = project_paths(root)
    result = rendering.render_report(paths.report_qmd, paths.report_output, renderer="fallback", root=root)
    return root, result


class NumberSpans(HTMLParser):
    """Collects (key, style, text) of every <span class="num"> in a page."""

    def __init__(self):
        super().__init__()
        self.found, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "num":
            self._open = [attrs["data-key"], attrs["data-fmt"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.found.append((self._open[0], self._open[1], " ".join(self._open[2].split())))
            self._open = None


def test_every_stated_number_equals_metrics_json_at_its_precision(built):
    """Each number in the text is a span naming its metrics.json key; its text is that value as printed."""
    root, result = built
    metrics = json.loads((root / "data/stats/metrics.json").read_text())
    parser = NumberSpans()
    parser.feed(result.html.read_text())
    assert len(parser.found) >= 40
    for key, style, text in parser.found:
        value = lookup(metrics, key)
        expected = ", ".join(map(str, ranked_values(value))) if style == "list" else format_number(value, style)
        assert text == expected, f"{key}: page says {text}, metrics.json gives {expected}"
    keys = {key for key, _, _ in parser.found}
    for family in metrics["families"]:
        for field in ("mean_delta_rfc", "mean_delta_rfc_lo", "mean_delta_rfc_hi", "share_compression",
                      "share_preservation", "share_no_change"):
            assert f"families.{family}.{field}" in keys
    for pair, values in metrics["pairs"].items():
        if values["pearson_r"] is not None:
            assert {f"pairs.{pair}.pearson_r", f"pairs.{pair}.pearson_p", f"pairs.{pair}.pearson_p_shift"} <= keys


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
    _, result = built
    html = result.html.read_text()
    assert not re.search(r'<(script|img|link)[^>]+(src|href)="(https?:)?//', html)
    assert "window.vegaEmbed" in html and html.count('class="vega-chart"') == 5


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_html_renders_its_charts_offline_in_chromium(built, tmp_path):
    """Headless Chromium with the network blocked draws every chart as SVG and takes a screenshot."""
    _, result = built
    url = result.html.resolve().as_uri()
    dom = subprocess.run(["chromium", *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    charts = re.findall(r'<div id="vis-[^"]+" class="vega-chart[^"]*"[^>]*>(.*?)</div>\s*<figcaption', dom.stdout, re.S)
    assert len(charts) == 5
    for chart in charts:
        assert "<svg" in chart and chart.count("<path") > 5, "a chart did not render"
    shot = tmp_path / "report.png"
    done = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--screenshot={shot}", url], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and shot.stat().st_size > 20_000


def test_pdf_has_the_sections_and_figures(built):
    """The PDF's text holds every section title, and the five charts are drawn in it."""
    _, result = built
    reader = PdfReader(result.pdf)
    text = "\n".join(page.extract_text() for page in reader.pages).replace("\xa0", " ")
    for title in SECTIONS:
        assert title in text, title
    for n in range(1, 6):
        assert f"Figure {n}" in text
    drawn = sum(len(page["/Resources"].get("/XObject", {})) for page in reader.pages if "/Resources" in page)
    assert drawn >= 5
