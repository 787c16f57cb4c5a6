"""`make bench`: extraction A/B/C on the CPU, on a GPU when CUDA is present, the pipeline, the stats stage, patching.

Writes benchmarks/results.json (every number) and renders benchmarks/results.md from it (benchmarks/report.py).
Exits 1 when a part failed; the files then say which and why.
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
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars (ours and transformers') would clutter the log
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

import report  # noqa: E402

from analysis.core.artefacts import atomic_path  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "cores usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            **{name: metadata.version(name) for name in ("torch", "transformers", "transformer-lens", "dvc")},
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "load average at start": [round(x, 2) for x in os.getloadavg()]}


def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; a failure becomes {"error": ...} so the other parts are still measured and written."""
    log(f"== {name}")
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - each part fails on its own, its message kept
        traceback.print_exc()
        out = {"error": f"{type(err).__name__}: {err}"}
    out["part_seconds"] = round(time.perf_counter() - start, 1)
    return out


def gpu_part(quick: bool) -> dict[str, Any]:
    """`extraction.py --gpu` in its own process, so the CPU parts never share its memory."""
    cmd = [sys.executable, str(HERE / "extraction.py"), "--gpu"] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"extraction.py --gpu exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write(results: dict[str, Any], json_path: Path) -> None:
    """results.json, then results.md rendered from it; each replaced atomically."""
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_path(json_path.with_suffix(".md")) as tmp:
        tmp.write_text(report.render(results), encoding="utf-8")


PARTS = ("extraction", "gpu", "pipeline", "stats", "patching", "real", "probes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small checkpoint, one run, no pipeline")
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out the `dvc repro` timings")
    parser.add_argument("--threads", type=int, help="torch CPU threads for extraction")
    parser.add_argument("--output", type=Path, default=HERE / "results.json", help="JSON file (Markdown beside it)")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="measure only these parts and keep the others' "
                        "results from the existing JSON file (each part records its own date and commit)")
    args = parser.parse_args(argv)

    import torch

    import extraction
    import patching
    import pipeline
    import probes
    import real
    import stats_stage

    start = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    wanted = set(args.only or PARTS)
    here = machine()
    r: dict[str, Any] = json.loads(args.output.read_text()) if args.only and args.output.exists() else {}
    if not r:  # a whole run: its date, commit and machine head results.md; --only keeps the last whole run's
        r.update({"date": date, "commit": commit or "unknown", "quick": args.quick, "machine": here})

    def part(name: str, label: str, run: Callable[[], dict[str, Any]]) -> None:
        if name in wanted:
            r[name] = {**attempt(label, run), "measured": f"{date}, commit {(commit or 'unknown')[:10]}, "
                       f"{here.get('cpu', 'cpu unknown')}, load average {here.get('load average at start')}"}

    part("extraction", "extraction (CPU)", lambda: extraction.measure(args.quick, args.threads, log))
    if "gpu" in wanted and not torch.cuda.is_available():
        r["gpu"] = {"not_run": "no CUDA GPU on this machine (none was lent to the session that made these figures)"}
    else:
        part("gpu", "extraction (GPU)", lambda: gpu_part(args.quick))
    if "pipeline" in wanted and (args.quick or args.skip_pipeline):
        r["pipeline"] = {"not_run": "left out of this run (%s)" % ("--quick" if args.quick else "--skip-pipeline")}
    else:
        part("pipeline", "pipeline", lambda: pipeline.measure(log))
    part("stats", "stats stage", lambda: {s: stats_stage.measure(s, args.quick) for s in ("demo", "paper")})
    part("patching", "patching", lambda: patching.measure(args.quick, log))
    if "real" in wanted and args.quick:
        r["real"] = {"not_run": "left out of this run (--quick)"}
    else:
        part("real", "real checkpoints", lambda: real.measure(log))
    part("probes", "probes", lambda: probes.measure(log))
    if not args.only:
        r["machine"]["load average at end"] = [round(x, 2) for x in os.getloadavg()]
        r["seconds"] = time.perf_counter() - start
    write(r, args.output)
    log(f"wrote {args.output} and {args.output.with_suffix('.md').name}")
    failed = [k for k in PARTS if "error" in r.get(k, {})]
    if failed:
        log(f"benchmark incomplete, failed: {', '.join(failed)} (see {args.output.with_suffix('.md').name})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
