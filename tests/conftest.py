"""Shared fixtures: a throw-away project root, the real prompt set, and small demo checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import config, synthetic
from analysis.layout import project_paths
from analysis.prompts import load_prompts

REPO = Path(__file__).resolve().parent.parent
REPO_CONFIG = config.load(project_paths(REPO))


@pytest.fixture(scope="session")
def prompts() -> pd.DataFrame:
    return load_prompts(REPO / "data" / "prompts.csv", min_per_category=40)


@pytest.fixture(scope="session")
def prompt_subset(prompts) -> pd.DataFrame:
    """Six prompts per category: enough to exercise every code path quickly."""
    return prompts.groupby("category", sort=False).head(6).reset_index(drop=True)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root in tmp_path with this repo's params.yaml and prompts; SELFREF_ROOT points there."""
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "data" / "prompts.csv", tmp_path / "data" / "prompts.csv")
    monkeypatch.setenv("SELFREF_DEMO_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("SELFREF_ROOT", str(tmp_path))
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
            synthetic.generate(demo_spec(family, variant), list(prompts["text"]), out, where=name)
            built[name] = out
        return built[name]

    return build
