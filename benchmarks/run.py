"""`make bench`: extraction (A, B, C), the GPU run when CUDA is present, the pipeline and the stats stage.

Writes benchmarks/results.md and benchmarks/results.json. `--quick` is a smoke run (under a minute);
`--skip-pipeline` leaves out the `dvc repro` timings. Exits 1 when any part failed (the files still say which).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import extraction  # noqa: E402
import pipeline  # noqa: E402

from analysis.artefacts import atomic_path  # noqa: E402

MB = 1_000_000
GOAL = {"a_over_b": 1.25, "c_over_a": 20.0, "memory": 1.2, "artefact_mb": 10.0, "repro_s": 300.0, "noop_s": 10.0,
        "stats_s": 300.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- collecting ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        kib = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        ram = round(kib / 1024**2, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {name: metadata.version(name) for name in ("torch", "transformers", "transformer-lens", "dvc")}
    return {
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "ram_gib": ram,
        "platform": platform.platform(), "python": platform.python_version(), **versions,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def attempt(name: str, fn) -> dict[str, Any]:
    """Run one part; a failure becomes {"error": ...} so the other parts still get written."""
    log(f"== {name}")
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - each part fails on its own, with its message kept
        if isinstance(err, ModuleNotFoundError) and err.name == "bench_stats":
            out = {"error": "benchmarks/bench_stats.py does not exist yet, so the stats stage was not timed"}
        else:
            traceback.print_exc()
            out = {"error": f"{type(err).__name__}: {err}"}
    if "error" in out:
        log(f"{name} FAILED: {out['error']}")
    out["part_seconds"] = round(time.perf_counter() - start, 1)
    return out


def stats_part(quick: bool) -> dict[str, Any]:
    import bench_stats

    return {"timings_s": bench_stats.measure(quick=quick)}


def gpu_part(quick: bool) -> dict[str, Any]:
    """The GPU figures, in a separate process so the CPU parts never share its memory."""
    cmd = [sys.executable, str(HERE / "extraction.py"), "--gpu", "--json"] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"GPU benchmark exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def previous(path: Path) -> dict[str, Any]:
    """The last full run's raw numbers, to carry GPU and pipeline figures that this run could not make."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {} if data.get("quick") else data


def carry(old: dict[str, Any], key: str, reason: str) -> dict[str, Any]:
    part = old.get(key) or {}
    if "error" in part or not part or part.get("not_run"):
        return {"not_run": reason}
    origin = part.get("carried_from") or {"date": old.get("date"), "commit": old.get("commit")}
    return {**part, "carried_from": origin, "not_run_now": reason}


# --- goals -----------------------------------------------------------------------------------------


def _ratio(times: dict[str, Any], top: str, bottom: str) -> float:
    return times[top]["median_s"] / times[bottom]["median_s"]


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the issue: target, measured value, met or not, and by how much and why it misses."""
    rows: list[dict[str, Any]] = []

    def row(goal: str, target: str, value: float | None, met: bool | None, shown: str, why: str = "") -> None:
        rows.append({"goal": goal, "target": target, "value": value, "met": met, "measured": shown,
                     "why": "" if met else why})

    ex = r.get("extraction", {})
    if "times" in ex:
        t, m = ex["times"], ex["memory"]
        ab = _ratio(t, "A", "B")
        split = t["A"]["split_s"]
        row("A/B wall time (CPU)", f"≤ {GOAL['a_over_b']}", ab, ab <= GOAL["a_over_b"], f"{ab:.2f}",
            f"misses by {100 * (ab / GOAL['a_over_b'] - 1):.0f} %: A spends {split['hooked_forward']:.2f} s in the hooked "
            f"forward and {split['table_and_parquet']:.2f} s building and writing the table, against B's "
            f"{t['B']['median_s']:.2f} s.")
        ca = _ratio(t, "C", "A")
        batching = t["C_bare"]["median_s"] / t["B"]["median_s"]
        extra = t["C"]["median_s"] - t["C_bare"]["median_s"]
        n_batches = -(-ex["prompts"] // ex["batch_size"])
        per_batch = (t["B"]["median_s"] / n_batches) / (t["C_bare"]["median_s"] / ex["prompts"])
        row("C/A wall time (CPU)", f"≥ {GOAL['c_over_a']:.0f}", ca, ca >= GOAL["c_over_a"], f"{ca:.1f}",
            f"misses by a factor {GOAL['c_over_a'] / ca:.1f}. C/A is bounded by what batching buys: the bare "
            f"one-prompt-at-a-time forward (C without the cache) already takes {t['C_bare']['median_s']:.1f} s, "
            f"{batching:.1f}× B: on this CPU a forward of a batch of {ex['batch_size']} prompts of ~{ex['mean_tokens']:.0f} "
            f"tokens costs {per_batch:.1f}× that of a single prompt, so batching buys {batching:.1f}×, not "
            f"{ex['batch_size']}×; caching the patterns, writing them and the numpy entropies add only {extra:.1f} s. Even an A as fast as B would give C/A = "
            f"{_ratio(t, 'C', 'B'):.1f}. A device that a single short prompt leaves idle (a GPU) is where "
            f"batching pays; see the GPU section for that ratio when it has been measured.")
        mem = m["A"]["peak_rss_kib"] / m["B"]["peak_rss_kib"]
        row("peak memory A ≤ 1.2 × B (CPU, whole process)", f"≤ {GOAL['memory']}", mem, mem <= GOAL["memory"],
            f"{mem:.3f} ({m['A']['peak_rss_kib'] / 1024:.0f} vs {m['B']['peak_rss_kib'] / 1024:.0f} MiB)",
            f"misses by {100 * (mem / GOAL['memory'] - 1):.0f} %.")
        art = ex["paper_artefact"]["bytes"] / MB
        row("entropy table at 32 × 32 × 160", f"≤ {GOAL['artefact_mb']:.0f} MB", art, art <= GOAL["artefact_mb"],
            f"{art:.2f} MB", f"misses by {art - GOAL['artefact_mb']:.2f} MB.")
    gpu = r.get("gpu", {})
    if "times" in gpu:
        label = gpu["device_name"] + (" (earlier run)" if "carried_from" in gpu else "")
        ab = _ratio(gpu["times"], "A", "B")
        ca = _ratio(gpu["times"], "C", "A")
        mem = gpu["memory"]["A"]["peak_bytes"] / gpu["memory"]["B"]["peak_bytes"]
        row(f"A/B wall time ({label})", f"≤ {GOAL['a_over_b']}", ab, ab <= GOAL["a_over_b"], f"{ab:.2f}",
            f"misses by {100 * (ab / GOAL['a_over_b'] - 1):.0f} %.")
        row(f"C/A wall time ({label})", f"≥ {GOAL['c_over_a']:.0f}", ca, ca >= GOAL["c_over_a"], f"{ca:.1f}",
            f"misses by a factor {GOAL['c_over_a'] / ca:.1f}.")
        row(f"peak GPU memory A ≤ 1.2 × B ({label})", f"≤ {GOAL['memory']}", mem, mem <= GOAL["memory"], f"{mem:.3f}",
            f"misses by {100 * (mem / GOAL['memory'] - 1):.0f} %.")
    stats = r.get("stats", {}).get("timings_s", {})
    if "total_s" in stats:
        row("stats stage at the paper suite's shape", f"< {GOAL['stats_s']:.0f} s", stats["total_s"],
            stats["total_s"] < GOAL["stats_s"], f"{stats['total_s']:.0f} s",
            f"misses by {stats['total_s'] - GOAL['stats_s']:.0f} s; see section 4 for the parts")
    pipe = r.get("pipeline", {})
    scratch = pipe.get("from_scratch")
    if scratch:
        secs, cores = scratch["seconds"], pipe.get("cores")
        slow = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(scratch["stages"].items(), key=lambda kv: -kv[1])[:3])
        if scratch["rc"] != 0:
            met, shown, why = False, f"failed after {secs:.0f} s", "the pipeline failed, so it has no time: see section 3"
        elif secs >= GOAL["repro_s"]:
            met, shown, why = False, f"{secs:.0f} s", f"misses by {secs - GOAL['repro_s']:.0f} s; slowest stages: {slow}"
        else:
            met, shown, why = cores == 2, f"{secs:.0f} s", f"measured on {cores} cores, not 2"
        row(f"dvc repro from scratch, demo suite ({cores} cores)", "< 300 s", secs, met, shown, why)
        noop = pipe.get("noop")
        if noop:
            row("no-op dvc repro", "< 10 s", noop["seconds"], noop["seconds"] < GOAL["noop_s"] and noop["up_to_date"],
                f"{noop['seconds']:.1f} s" + ("" if noop["up_to_date"] else " (stages re-ran!)"),
                f"misses by {noop['seconds'] - GOAL['noop_s']:.1f} s" if noop["up_to_date"]
                else f"stages re-ran on a second repro: {', '.join(noop['stages'])}")
    return rows


# --- writing ---------------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    return "–" if n is None else f"{n / MB:.3f} MB" if n < 10 * MB else f"{n / MB:.1f} MB"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _not_run(part: dict[str, Any]) -> str | None:
    if "error" in part:
        return f"**Not measured: {part['error']}**"
    if "not_run" in part:
        return f"Not run: {part['not_run']}."
    return None


def extraction_md(ex: dict[str, Any], quick: bool) -> list[str]:
    if (msg := _not_run(ex)) is not None:
        return [msg, ""]
    t, m, ck = ex["times"], ex["memory"], ex["checkpoint"]
    n = ex["prompts"]
    out = [f"Synthetic {ck['architecture']} checkpoint (analysis.synthetic, random weights): {ck['layers']} layers, "
           f"d_model {ck['hidden']}, {ck['heads']} heads ({ck['kv_heads']} KV), MLP {ck['intermediate']}, "
           f"{ck['parameters'] / 1e6:.1f} M parameters, float32 on the CPU with {ex['threads']} torch threads. "
           f"{n} prompts from data/prompts.csv (mean {ex['mean_tokens']:.1f} tokens, at most {ex['max_tokens']}), "
           f"batch size {ex['batch_size']} (params.yaml `extract.batch_size`).", ""]
    desc = {
        "A": "the project's extraction (EntropyRunner hooks, long table, parquet)",
        "B": "bare forward, same batches, bridge without hooks (the floor)",
        "B_hf": "for reference: the bridge's HF model called directly, same batches",
        "C": "naive: one prompt at a time, `run_with_cache` of every pattern, .npy files, numpy entropies",
        "C_bare": "for reference: one prompt at a time, bare forward (no cache)",
    }
    rows = []
    for key in ("A", "B", "B_hf", "C", "C_bare"):
        x = t[key]
        runs = f"{len(x['runs_s'])} × {x['prompts_timed']} prompts" + (
            f", scaled × {x['scaled_by']:.2f}" if x["scaled_by"] != 1 else "")
        mem = m.get(key, {})
        rows.append([f"**{key}**", desc[key], f"{x['median_s']:.2f}", f"{x['min_s']:.2f}",
                     f"{1000 * x['median_s'] / n:.1f}", runs,
                     f"{mem['peak_rss_kib'] / 1024:.0f}" if mem else "–",
                     f"{mem['attributable_kib'] / 1024:.0f}" if mem else "–",
                     _mb(x.get("bytes_written")) if key in ("A", "B", "C") else "–"])
    out += _table(["", "method", "median wall (s)", "min (s)", "ms / prompt", "runs", "peak RSS (MiB)",
                   "peak − RSS after load (MiB)", "bytes written"], rows)
    ab, ca = _ratio(t, "A", "B"), _ratio(t, "C", "A")
    out += [f"**A/B = {ab:.2f}** (min/min {t['A']['min_s'] / t['B']['min_s']:.2f}), "
            f"**C/A = {ca:.1f}**; peak RSS A/B = {m['A']['peak_rss_kib'] / m['B']['peak_rss_kib']:.3f}, "
            f"attributable A/B = {m['A']['attributable_kib'] / max(1, m['B']['attributable_kib']):.2f}.", ""]
    c = t["C"]
    out += [
        f"- A's last run: {t['A']['split_s']['hooked_forward']:.2f} s hooked forward, "
        f"{t['A']['split_s']['table_and_parquet']:.2f} s building the table and writing its parquet "
        f"({t['A']['rows']:,} rows).",
        f"- C was timed over {c['prompts_timed']} of the {n} prompts"
        + (" (every prompt)" if c["scaled_by"] == 1 else f" and scaled per prompt to {n}")
        + f"; in its last run {c['split_s']['forward_and_cache']:.2f} s went to forward passes with the cache, "
        f"{c['split_s']['write']:.2f} s to writing .npy files, {c['split_s']['entropies']:.2f} s to entropies. "
        f"Its bytes written are those .npy files ({_mb(c['bytes_written'])} for {c['prompts_timed']} prompts"
        + (f", {_mb(c['bytes_written'] * c['bytes_scaled_by'])} scaled to {n}" if c["bytes_scaled_by"] != 1 else "")
        + "); the original study pickled the same arrays. "
        f"C's entropies equal A's to {t['C_matches_A_max_abs']:.1e} (max abs difference), so both do the same work.",
        "- Wall time: A, B and B_hf run interleaved in one process (order alternating each repetition, one "
        "warm-up pass first) on the same loaded model and the same length-sorted batches; model loading and "
        "tokenisation are excluded from all. The median is the figure; the min shows the noise of a shared machine.",
        "- Peak memory: each method runs once in a fresh process (`extraction.py --memory A|B|C`). After the "
        "model is loaded and the prompts tokenised, the process's peak-RSS mark is reset (/proc/self/clear_refs), "
        "so VmHWM in /proc/self/status afterwards is the peak during that method alone. (Not "
        "`getrusage(RUSAGE_SELF).ru_maxrss`: on Linux it also counts the parent's RSS at the exec that started "
        "the process, so all three methods read as run.py's own peak; it is kept in results.json.) *Peak RSS* is the "
        "whole process (interpreter, libraries, model, activations), what a machine must have; *peak − RSS after "
        "load* is what the method itself added. The goal is judged on the whole process.",
        "",
    ]
    if quick:
        out += ["*Quick run: a smaller checkpoint, one repetition, C on a subset. Not the benchmark's figures.*", ""]
    return out


def artefact_md(ex: dict[str, Any]) -> list[str]:
    if "paper_artefact" not in ex:
        return []
    a, t = ex["paper_artefact"], ex["times"]
    per_row = t["A"]["bytes_written"] / t["A"]["rows"]
    rows = [
        [f"A: entropy table, this benchmark ({t['A']['rows']:,} rows)", _mb(t["A"]["bytes_written"])],
        [f"A: entropy table, paper shape {a['layers']} × {a['heads']} × {a['prompts']} ({a['rows']:,} rows), "
         "synthetic values", f"**{_mb(a['bytes'])}**"],
        ["A: the benchmark's table scaled per row to the paper shape (cross-check)", _mb(per_row * a["rows"])],
        [f"C: float32 patterns at the paper shape ({a['prompts']} prompts, mean {a['mean_tokens']:.1f} tokens)",
         _mb(a["naive_pattern_bytes"])],
    ]
    return _table(["artefact per checkpoint", "size"], rows) + [
        "The paper-shape table is written by `analysis.artefacts.write_parquet` (zstd) with the real columns of "
        "`analysis.inference.entropy_frame`; its three entropy columns are random float64 values spread as real "
        "ones are (raw in [0, log n_tokens), normalised in [0, 1)), so their mantissas do not compress. Token "
        "counts are the demo tokenizer's for the first 160 prompts (a real tokenizer's are of the same order). "
        "C's size grows with the square of the prompt length; A's does not depend on it.", ""]


def gpu_md(gpu: dict[str, Any]) -> list[str]:
    if (msg := _not_run(gpu)) is not None:
        return [msg, ""]
    t, m, ck = gpu["times"], gpu["memory"], gpu["checkpoint"]
    out = []
    if "carried_from" in gpu:
        out += [f"*From an earlier run ({gpu['carried_from'].get('date')}, commit "
                f"{str(gpu['carried_from'].get('commit'))[:10]}); this run made none: {gpu['not_run_now']}.*", ""]
    out += [f"**{gpu['device_name']}** (CUDA {gpu.get('cuda')}). Random bfloat16 weights in Llama-3.1-8B's shape: "
            f"{ck['layers']} layers, d_model {ck['hidden']}, {ck['heads']} heads ({ck['kv_heads']} KV), MLP "
            f"{ck['intermediate']}, {ck['parameters'] / 1e9:.2f} B parameters. The vocabulary is the demo "
            f"tokenizer's ({ck.get('vocab')} tokens, not 128,256), which leaves out ~1 B embedding/unembedding "
            f"parameters and makes B slightly cheaper (A/B slightly pessimistic). {gpu['prompts']} prompts, mean "
            f"{gpu['mean_tokens']:.1f} tokens, batch size {gpu['batch_size']}.", ""]
    rows = []
    for key in ("A", "B", "B_hf", "C", "C_bare"):
        x = t[key]
        mem = m.get(key, {})
        rows.append([f"**{key}**", f"{x['median_s']:.3f}", f"{x['min_s']:.3f}",
                     f"{x['prompts_timed']}" + (f" (scaled × {x['scaled_by']:.2f})" if x["scaled_by"] != 1 else ""),
                     f"{mem['peak_bytes'] / 1024**3:.2f}" if mem else "–",
                     f"{mem['attributable_bytes'] / 1024**2:.0f}" if mem else "–"])
    out += _table(["", "median wall (s)", "min (s)", "prompts timed", "peak GPU memory (GiB)",
                   "peak − allocated before (MiB)"], rows)
    out += [f"A/B = {_ratio(t, 'A', 'B'):.2f}, C/A = {_ratio(t, 'C', 'A'):.1f}, peak GPU memory A/B = "
            f"{m['A']['peak_bytes'] / m['B']['peak_bytes']:.3f} (`torch.cuda.max_memory_allocated`). "
            f"C's entropies equal A's to {t['C_matches_A_max_abs']:.1e} (bfloat16 patterns, batched vs single).", ""]
    return out


def pipeline_md(pipe: dict[str, Any]) -> list[str]:
    if (msg := _not_run(pipe)) is not None:
        return [msg, ""]
    out = []
    if "carried_from" in pipe:
        out += [f"*From an earlier run ({pipe['carried_from'].get('date')}); this run made none: "
                f"{pipe['not_run_now']}.*", ""]
    scratch = pipe["from_scratch"]
    out += [f"Fresh clone of commit {pipe['commit'][:10]} ({pipe['uncommitted_files_not_timed']} uncommitted "
            f"file(s) in the working tree were not part of it), this checkout's virtual environment on PATH "
            f"(install excluded), demo checkpoints regenerated into an empty folder, {pipe['cores']} cores.", ""]
    rows = [["`dvc repro --force` (from scratch)", f"{scratch['seconds']:.1f}", scratch["rc"]]]
    if pipe.get("noop"):
        rows.append(["`dvc repro` again (no-op)", f"{pipe['noop']['seconds']:.1f}", pipe["noop"]["rc"]])
    out += _table(["run", "wall (s)", "exit status"], rows)
    if scratch["stages"]:
        out += ["Per stage (from one `Running stage` line to the next, so DVC's own bookkeeping is included):", ""]
        out += _table(["stage", "wall (s)"], [[f"`{k}`", f"{v:.1f}"] for k, v in scratch["stages"].items()])
    if scratch["rc"] != 0:
        out += ["The run failed; the end of its output:", "", "```", scratch["output_tail"], "```", ""]
    return out


def stats_md(stats: dict[str, Any]) -> list[str]:
    if (msg := _not_run(stats)) is not None:
        return [msg, ""]
    def shown(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    rows = [[f"`{k}`", shown(v)] for k, v in stats["timings_s"].items()]
    return ["What `benchmarks/bench_stats.py` `measure()` returned (keys ending in `_s` are seconds):", ""] + \
        _table(["key", "value"], rows)


def markdown(r: dict[str, Any]) -> str:
    mc = r["machine"]
    out = ["# Benchmark results", "",
           f"Written by `make bench` (`benchmarks/run.py`) on {r['date']}, commit {r['commit'][:10]}"
           + (", **quick smoke run**" if r["quick"] else "") + f", in {r['seconds']:.0f} s.", "",
           "## Machine", ""]
    out += _table(["", ""], [
        ["CPU", f"{mc['cpu']}, {mc['cores']} cores ({mc['cores_usable']} usable)"], ["RAM", f"{mc['ram_gib']} GiB"],
        ["GPU", mc["gpu"] or "none (no CUDA device)"], ["platform", mc["platform"]], ["Python", mc["python"]],
        ["torch / transformers / transformer-lens / dvc",
         f"{mc['torch']} / {mc['transformers']} / {mc['transformer-lens']} / {mc['dvc']}"],
        ["load average at start / end", f"{mc['load_average_at_start']} / {mc.get('load_average_at_end')}"],
    ])
    out += ["The machine may be shared: the load average shows what else ran. Ratios are of medians of "
            "interleaved runs, which shared load disturbs less than absolute times.", "", "## Goals", ""]
    rows = [[g["goal"], g["target"], g["measured"], {True: "met", False: "**missed**", None: "–"}[g["met"]], g["why"]]
            for g in r["goals"]]
    out += _table(["goal", "target", "measured", "", "by how much and why, if missed"], rows)
    stats = r.get("stats", {})
    if "error" in stats or "not_run" in stats:
        out += [f"- Stats stage at the paper suite's shape: not timed ({stats.get('error') or stats.get('not_run')}).",
                ""]
    out += ["## 1. Extraction on the CPU: A, B, C", ""] + extraction_md(r["extraction"], r["quick"])
    out += ["### Artefact size", ""] + artefact_md(r["extraction"])
    out += ["## 2. Extraction on a GPU, Llama-3.1-8B's shape", ""] + gpu_md(r["gpu"])
    out += ["## 3. Whole pipeline (`dvc repro`, demo suite)", ""] + pipeline_md(r["pipeline"])
    out += ["## 4. Stats stage at the paper suite's shape", ""] + stats_md(stats)
    return "\n".join(out).rstrip() + "\n"


def write(r: dict[str, Any], md_path: Path) -> None:
    """results.json and results.md, each replaced atomically."""
    with atomic_path(md_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(r, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(r), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small checkpoint, one repetition, no pipeline")
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out the `dvc repro` timings")
    parser.add_argument("--skip-gpu", action="store_true", help="leave out the GPU run even when CUDA is present")
    parser.add_argument("--threads", type=int, help="torch CPU threads for the extraction benchmark")
    parser.add_argument("--output", type=Path, default=HERE / "results.md", help="markdown file (JSON beside it)")
    args = parser.parse_args(argv)

    import torch

    start = time.perf_counter()
    old = previous(args.output.with_suffix(".json"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    r: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "commit": commit or "unknown", "quick": args.quick, "machine": machine()}
    r["extraction"] = attempt("extraction (CPU)", lambda: extraction.measure(args.quick, args.threads, log))
    if torch.cuda.is_available() and not args.skip_gpu:
        r["gpu"] = attempt("extraction (GPU)", lambda: {**gpu_part(args.quick), "date": r["date"]})
    else:
        reason = "--skip-gpu" if torch.cuda.is_available() else (
            "no CUDA GPU on this machine. Where CUDA is present, `make bench` also runs `extraction.py --gpu` "
            "(A, B and C on random bfloat16 weights in Llama-3.1-8B's shape) and this section shows those figures, "
            "labelled with the GPU model")
        r["gpu"] = carry(old, "gpu", reason)
    if args.quick or args.skip_pipeline:
        r["pipeline"] = carry(old, "pipeline", "--quick" if args.quick else "--skip-pipeline")
    else:
        r["pipeline"] = attempt("pipeline", lambda: pipeline.measure(log))
    r["stats"] = attempt("stats stage", lambda: stats_part(args.quick))
    r["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    r["goals"] = goals(r)
    r["seconds"] = time.perf_counter() - start
    write(r, args.output)
    log(f"wrote {args.output} and {args.output.with_suffix('.json').name}")
    failed = [k for k in ("extraction", "gpu", "pipeline", "stats") if "error" in r[k]]
    if failed:
        log(f"benchmark incomplete, failed: {', '.join(failed)} (see {args.output.name})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
