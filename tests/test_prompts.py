"""Prompt-set validation: every rejected input names its row, and nothing is written on failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.core.errors import UserError
from analysis.core.prompts import CATEGORIES, load_prompts, token_lengths
from conftest import write_prompts_csv

REPO = Path(__file__).resolve().parent.parent


def _rows(n: int = 3) -> list[list[str]]:
    return [[f"{c[:4]}_{i}", c, f"Question {i} about {c} number {i}?"] for c in CATEGORIES for i in range(n)]


def test_the_projects_prompt_set_is_valid():
    frame = load_prompts(REPO / "data" / "prompts.csv", min_per_category=40)
    assert frame["category"].value_counts().min() >= 40
    assert set(frame["category"]) == set(CATEGORIES)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r[0].__setitem__(1, "selfish"), "unknown category 'selfish'"),
    (lambda r: r[1].__setitem__(2, "   "), "empty text"),
    (lambda r: r[2].__setitem__(2, "  " + r[0][2].upper().replace(" ", "   ") + " "), "duplicate text"),
    (lambda r: r[3].__setitem__(0, r[0][0]), "duplicate prompt_id"),
    (lambda r: r.pop(), "fewer than the minimum 3"),
])
def test_each_problem_is_named_with_its_line(tmp_path, mutate, message):
    rows = _rows()
    mutate(rows)
    with pytest.raises(UserError, match=message) as err:
        load_prompts(write_prompts_csv(tmp_path / "p.csv", rows), min_per_category=3)
    if "minimum" not in message:
        assert "line " in str(err.value)


def test_undecodable_bytes_name_the_line(tmp_path):
    path = write_prompts_csv(tmp_path / "p.csv", _rows())
    raw = path.read_bytes().replace(b"Question 1 about neutral", b"Question 1 about neutr\xff\xfe")
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"line \d+ has bytes that are not UTF-8"):
        load_prompts(path, min_per_category=3)


def test_missing_column(tmp_path):
    path = write_prompts_csv(tmp_path / "p.csv", [r[:2] for r in _rows()], header=("prompt_id", "category"))
    with pytest.raises(UserError, match="missing column"):
        load_prompts(path, min_per_category=3)


def test_all_problems_reported_together(tmp_path):
    rows = _rows()
    rows[0][1] = "nope"
    rows[5][2] = ""
    with pytest.raises(UserError) as err:
        load_prompts(write_prompts_csv(tmp_path / "p.csv", rows), min_per_category=2)
    assert "unknown category" in str(err.value) and "empty text" in str(err.value)


CORRUPTIONS = ["category", "empty", "dup_text", "dup_id"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(CORRUPTIONS), row=st.integers(0, 11), other=st.integers(0, 11),
       junk=st.text(min_size=1, max_size=12).filter(lambda s: s.strip() and s.strip() not in CATEGORIES
                                                    and "\x00" not in s and "\r" not in s and "\n" not in s))
def test_malformed_files_always_raise_a_named_error(tmp_path, kind, row, other, junk):
    rows = _rows()
    if kind == "category":
        rows[row][1] = junk
    elif kind == "empty":
        rows[row][2] = " " * len(junk)
    elif kind == "dup_text":
        if row == other:
            other = (row + 1) % len(rows)
        rows[row][2] = rows[other][2].swapcase()
    else:
        if row == other:
            other = (row + 1) % len(rows)
        rows[row][0] = rows[other][0]
    with pytest.raises(UserError, match=r"line \d+"):
        load_prompts(write_prompts_csv(tmp_path / "p.csv", rows), min_per_category=3)


@pytest.mark.slow  # runs selfref in a subprocess
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(tmp_path, blob):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt_id,category,text\n" + blob)
    try:
        load_prompts(path, min_per_category=0)
    except UserError:
        pass


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SELFREF_ROOT": str(root)}
    return subprocess.run([sys.executable, "-m", "analysis.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow  # runs selfref in a subprocess
def test_cli_rejects_bad_file_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    rows = _rows(40)
    rows[7][1] = "persona"
    write_prompts_csv(tmp_path / "data" / "prompts.csv", rows)
    result = _cli(tmp_path, "prompts", "check", "--no-tokenizers")
    assert result.returncode == 2
    assert "unknown category 'persona'" in result.stderr and "line 9" in result.stderr
    assert not (tmp_path / "data" / "prompts" / "summary.json").exists()

    rows[7][1] = "self_referent"
    write_prompts_csv(tmp_path / "data" / "prompts.csv", rows)
    result = _cli(tmp_path, "prompts", "check", "--no-tokenizers")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "data" / "prompts" / "summary.json").read_text())
    assert summary["n_prompts"] == 160 and len(summary["sha256"]) == 64


def test_token_length_gap_warning(prompts):
    counts = [10 if c == "self_referent" else 8 for c in prompts["category"]]
    check = token_lengths(prompts, counts, "tok", max_gap=1.0)
    assert check.gap == pytest.approx(2.0) and "differ by 2.00 tokens" in check.warning
    assert token_lengths(prompts, [8] * len(prompts), "tok", max_gap=1.0).warning is None
