"""results.md from results.json: the goals of goals.yaml judged, tables by pandas, the page by a jinja2 template.

`python benchmarks/report.py [results.json]` renders the Markdown again without measuring anything.
"""

from __future__ import annotations

import json
import operator
import sys
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

HERE = Path(__file__).resolve().parent
GOALS = HERE / "goals.yaml"
TEMPLATE = "results.md.j2"
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}


def lookup(results: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of results, or None where any part of it is missing."""
    node: Any = results
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def judge(results: dict[str, Any], goals: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each goal with the measured value and its verdict: met, missed, or not measured (and why not)."""
    goals = goals if goals is not None else yaml.safe_load(GOALS.read_text(encoding="utf-8"))
    rows = []
    for g in goals:
        value = lookup(results, g["value"])
        row = {"goal": g["goal"], "target": f"{g['op']} {g['target']:g}", "measured": "–", "verdict": "not measured",
               "note": ""}
        if value is None:
            part = results.get(g["value"].split(".")[0]) or {}
            row["note"] = part.get("error") or part.get("not_run") or f"no value at {g['value']}"
        else:
            met = OPS[g["op"]](value, g["target"])
            row.update(measured=g["shown"].format(value), verdict="met" if met else "**missed**")
            if not met and g.get("why"):
                row["note"] = " ".join(g["why"].split()).format_map(results)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]] | pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A Markdown table (pandas + tabulate)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return frame.to_markdown(index=False, floatfmt=floatfmt)


METHODS = {
    "A_end_to_end": "A: `extract_checkpoint` end to end (load, tokenise, hooked batches, table) + parquet",
    "B_end_to_end": "B: the same load and tokenisation + bare forward of the same batches",
    "A": "A on the loaded bridge: `EntropyRunner.run`, the long table, its parquet",
    "B": "B on the loaded bridge: bare forward of the same batches, no hooks (the floor)",
    "C": "C: one prompt at a time, `run_with_cache` of every pattern, .npy files, numpy entropies",
    "C_bare": "for reference: one prompt at a time, bare forward (no cache)",
}


def time_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per timed method of an extraction part (CPU or GPU)."""
    n = part["prompts"]
    return [{"": k, "method": METHODS[k], "median (s)": t["median_s"], "min (s)": t["min_s"],
             "ms / prompt": 1000 * t["median_s"] / n,
             "runs": f"{len(t['runs_s'])} × {t['prompts_timed']} prompts"
             + (f", scaled × {t['scaled_by']:.0f}" if t["scaled_by"] != 1 else "")}
            for k, t in part["times"].items() if k in METHODS]


def tables(r: dict[str, Any]) -> dict[str, str]:
    """Every table of results.md that the results hold, as Markdown."""
    m = r["machine"]
    out = {}
    out["machine"] = table([{"": k, "value": str(v)} for k, v in m.items()])
    ex = r.get("extraction", {})
    if "times" in ex:
        out["times"] = table(time_rows(ex))
        out["memory"] = table([{"": k, "peak RSS, whole process (MiB)": v["peak_rss_mib"]}
                               for k, v in ex["memory"].items()], ".0f")
        a = ex["paper_artefact"]
        out["artefact"] = table([
            {"artefact per checkpoint": f"A: entropy table, this benchmark ({ex['prompts']} prompts)",
             "MB": ex["times"]["A"]["bytes_written"] / 1e6},
            {"artefact per checkpoint": f"A: entropy table at {a['layers']} × {a['heads']} × {a['prompts']} "
                                        f"({a['rows']:,} rows)", "MB": a["mb"]},
            {"artefact per checkpoint": f"C: float32 patterns at that shape (mean {a['mean_tokens']:.1f} tokens)",
             "MB": a["naive_patterns_mb"]},
            {"artefact per checkpoint": f"C: .npy files of this benchmark ({ex['prompts']} prompts)",
             "MB": ex["times"]["C"]["bytes_written"] / 1e6}], ".3f")
    gpu = r.get("gpu", {})
    if "times" in gpu:
        out["gpu_times"] = table(time_rows(gpu), ".3f")
        out["gpu_memory"] = table([{"": k, "peak GPU memory (MiB)": v["peak_mib"]} for k, v in gpu["memory"].items()],
                                  ".0f")
    pipe = r.get("pipeline", {})
    if "from_scratch" in pipe:
        runs = [{"run": "`dvc repro --force` (from scratch)", "wall (s)": pipe["from_scratch"]["seconds"],
                 "exit status": pipe["from_scratch"]["rc"]}]
        if "noop" in pipe:
            runs.append({"run": "`dvc repro` again (no-op)", "wall (s)": pipe["noop"]["seconds"],
                         "exit status": pipe["noop"]["rc"]})
        out["pipeline"] = table(runs, ".1f")
        out["stages"] = table([{"stage": f"`{k}`", "wall (s)": v} for k, v in pipe["from_scratch"]["stages"].items()],
                              ".1f")
    stats = r.get("stats", {})
    rows = [{"shape": name, "families (layers × heads)": ", ".join(f"{f} {lh[0]}×{lh[1]}" for f, lh in s["families"].items()),
             "prompts": s["prompts"], "rows per format": s["rows_per_format"], "formats": "+".join(s["formats"]),
             "resamples / permutations / half-splits": f"{s['n_resamples']} / {s['n_permutations']} / "
                                                       f"{s['split_half_splits']}", "build_study (s)": s["seconds"]}
            for name, s in stats.items() if isinstance(s, dict) and "seconds" in s]
    if rows:
        out["stats"] = table(rows, ".1f")
    patch = r.get("patching", {})
    runs = {**({k: v for k, v in patch.get("demo", {}).items() if isinstance(v, dict)}),
            **({"synthetic {layers} layers, d_model {hidden}".format(**patch["larger"]["checkpoint"]): patch["larger"]}
               if "checkpoint" in patch.get("larger", {}) else {})}
    if runs:
        out["patching"] = table([{"checkpoints": k, "heads": v["heads"], "prompts": v["prompts"],
                                  "forward rows": v["forward_rows"], "forward passes (s)": v["forward_s"],
                                  "ms / row": v["ms_per_row"], "summaries (s)": v["summaries_s"],
                                  "total (s)": v["total_s"]} for k, v in runs.items()], ".2f")
    real = r.get("real", {})
    if "stages" in real:
        out["real"] = table([{"stage": f"`{k}`", "wall (s)": v} for k, v in real["stages"].items()], ".1f")
    probes = r.get("probes", {})
    if "checkpoints" in probes:
        out["probes"] = table(probes["checkpoints"], ".1f")
    return out


def render(results: dict[str, Any], goals: list[dict[str, Any]] | None = None) -> str:
    """The whole results.md."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), undefined=jinja2.ChainableUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    verdicts = judge(results, goals)
    tabs = tables(results)
    tabs["goals"] = table([{k: v for k, v in g.items() if k != "note"} for g in verdicts])
    notes = [g for g in verdicts if g["note"]]
    return env.get_template(TEMPLATE).render(r=results, t=tabs, notes=notes)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    (source.with_suffix(".md")).write_text(render(json.loads(source.read_text(encoding="utf-8"))), encoding="utf-8")
