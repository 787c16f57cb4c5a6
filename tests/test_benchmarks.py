"""benchmarks/report.py: every goal of goals.yaml is judged and shown in results.md with met / missed / not
measured against its target; no timing here (speed goals live in benchmarks/, judged by `make bench`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

pytestmark = pytest.mark.slow  # runs the benchmarks' pipeline parts (make test-fast leaves it out)

GOALS = yaml.safe_load((BENCH / "goals.yaml").read_text(encoding="utf-8"))


def _times(n: int, **medians: float) -> dict:
    return {k: {"median_s": v, "min_s": v * 0.9, "runs_s": [v, v * 0.9, v * 1.1], "prompts_timed": n, "scaled_by": 1.0}
            for k, v in medians.items()}


@pytest.fixture
def results() -> dict:
    """A results.json as run.py writes it, with made-up numbers; no GPU part."""
    times = _times(180, A_end_to_end=4.0, B_end_to_end=3.8, A=1.30, B=1.20, C=6.5, C_bare=6.2)
    times["A"]["bytes_written"], times["C"]["bytes_written"] = 205_000, 3_481_000
    times["C_matches_A_max_abs"] = 1.5e-6
    return {
        "date": "2026-01-01 00:00 UTC", "commit": "0123456789abcdef", "quick": False, "seconds": 400.0,
        "machine": {"cpu": "test CPU", "cores": 2, "gpu": "none"},
        "extraction": {
            "checkpoint": {"architecture": "llama", "layers": 8, "hidden": 512, "heads": 8, "parameters": 22_000_000},
            "prompts": 180, "batch_size": 16, "mean_tokens": 8.4, "max_tokens": 14, "threads": 2, "times": times,
            "memory": {"A": {"peak_rss_mib": 616.0}, "B": {"peak_rss_mib": 600.0}, "C": {"peak_rss_mib": 591.0}},
            "paper_artefact": {"layers": 32, "heads": 32, "prompts": 160, "rows": 163_840, "mb": 4.49,
                               "naive_patterns_mb": 46.7, "mean_tokens": 8.2},
            "ratios": {"a_over_b": 1.30 / 1.20, "a_over_b_end_to_end": 4.0 / 3.8, "c_over_a": 6.5 / 1.30,
                       "c_over_b": 6.5 / 1.2, "c_bare_over_b": 6.2 / 1.2, "batch_cost_in_prompts": 2.8,
                       "c_cache_extra_s": 0.3, "memory_a_over_b": 616 / 600}},
        "gpu": {"not_run": "no CUDA GPU on this machine"},
        "pipeline": {"commit": "0123456789abcdef", "uncommitted_files_not_timed": 0, "cores": 2,
                     "from_scratch": {"seconds": 320.0, "rc": 0, "stages": {"stats": 9.4, "report": 10.0}},
                     "slowest": "report 10 s, stats 9 s",
                     "noop": {"seconds": 4.1, "rc": 0, "stages": {}, "stages_rerun": 0}},
        "stats": {"paper": {"seconds": 46.0, "families": {"f": [32, 32]}, "prompts": 160, "rows_per_format": 983_040,
                            "formats": ["raw", "chat"], "n_resamples": 10_000, "n_permutations": 10_000,
                            "split_half_splits": 1000}},
        "patching": {"batch_size": 256, "threads": 2, "demo_max_family_s": 6.5,
                     "paper_estimate": {"families": 3, "heads_per_family": 16, "prompts": 80,
                                        "patch_forward_rows": 23_520, "extract_forward_rows": 1_920,
                                        "patch_over_extract": 12.25},
                     "demo": {"demo_llama": {"heads": 16, "prompts": 90, "forward_rows": 8820, "forward_s": 5.0,
                                             "summaries_s": 1.5, "total_s": 6.5, "ms_per_row": 0.57}},
                     "larger": {"checkpoint": {"layers": 8, "hidden": 512}, "heads": 16, "prompts": 90,
                                "forward_rows": 8820, "forward_s": 30.0, "summaries_s": 1.5, "total_s": 31.5,
                                "ms_per_row": 3.4}},
    }


def _goal_row(markdown: str, goal: str) -> str:
    rows = [line for line in markdown.splitlines() if line.startswith("|") and goal in line]
    assert len(rows) == 1, f"goal {goal!r} appears in {len(rows)} table rows"
    return rows[0]


def test_every_goal_is_in_the_markdown_with_its_verdict(results):
    md = report.render(results)
    expected = {
        "A/B wall time, CPU": ("1.08", "met"), "C/A wall time, CPU": ("5.0", "**missed**"),
        "peak memory A/B, CPU": ("1.027", "met"), "entropy table of one checkpoint": ("4.49", "met"),
        "A/B wall time, GPU": ("–", "not measured"), "C/A wall time, GPU": ("–", "not measured"),
        "peak GPU memory A/B": ("–", "not measured"), "dvc repro from scratch": ("320", "**missed**"),
        "no-op dvc repro (s)": ("4.1", "met"), "stages re-run by a no-op": ("0", "met"),
        "stats stage (build_study)": ("46", "met"), "patch stage computation, slowest demo family": ("6.5", "met"),
        "real GGUF checkpoints' stages added": ("–", "not measured"),
    }
    assert len(expected) == len(GOALS)
    for goal, (measured, verdict) in expected.items():
        cells = [c.strip() for c in _goal_row(md, goal).strip("|").split("|")]
        target = next(g for g in GOALS if goal in g["goal"])
        assert cells[1:] == [f"{target['op']} {target['target']:g}", measured, verdict], goal


def test_missed_goals_say_why_from_the_numbers(results):
    md = report.render(results)
    # the C/A explanation is filled in from results.json: C_bare's time, batching's gain, C/B
    assert "already takes 6.2 s, 5.2× B" in md
    assert "C/A = 5.4" in md
    assert "slowest stages: report 10 s, stats 9 s" in md
    assert "no CUDA GPU on this machine" in md  # the GPU section and goals say why they are empty
    assert "23,520 prompt-forwards, 12.2× the 1,920" in md  # the paper-suite estimate of the patching section


def test_boundary_and_change_of_verdict(results):
    goal = [{"goal": "ratio", "value": "extraction.ratios.a_over_b", "op": "<=", "target": 1.25, "shown": "{:.2f}"}]
    results["extraction"]["ratios"]["a_over_b"] = 1.25
    assert report.judge(results, goal)[0]["verdict"] == "met"
    results["extraction"]["ratios"]["a_over_b"] = 1.2500001
    assert report.judge(results, goal)[0]["verdict"] == "**missed**"
    del results["extraction"]["ratios"]["a_over_b"]
    row = report.judge(results, goal)[0]
    assert (row["verdict"], row["note"]) == ("not measured", "no value at extraction.ratios.a_over_b")


def test_a_failed_part_is_named_with_its_error(results):
    results["pipeline"] = {"error": "RuntimeError: dvc repro --force exited 1"}
    md = report.render(results)
    for goal in ("dvc repro from scratch", "no-op dvc repro (s)", "stages re-run by a no-op"):
        assert "| not measured |" in _goal_row(md, goal)
    assert md.count("RuntimeError: dvc repro --force exited 1") >= 3


@pytest.mark.parametrize("module", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_benchmark_module_imports(module):
    """`make bench` starts by importing every part: a module that names a moved library module fails here, not
    at the end of a long benchmark run."""
    import importlib

    importlib.import_module(module)
