"""Pipeline benchmark: `dvc repro --force` of the demo suite in a fresh clone, then a no-op `dvc repro`.

The clone is of the current commit (uncommitted changes are not in it) and runs its own code with this
checkout's virtual environment, so installing is excluded from the time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
TIMEOUT_S = 3600
SUITE = "demo"  # what the from-scratch goal of benchmarks/goals.yaml is about


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def timed_run(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run a command, streaming its output; total wall time and the time from each DVC stage's start to the next."""
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            found = STAGE_LINE.search(line)
            if found:
                marks.append((found.group(1), time.perf_counter() - start))
            if time.perf_counter() - start > TIMEOUT_S:
                proc.kill()
                lines.append(f"[benchmark] killed after {TIMEOUT_S} s")
                break
        rc = proc.wait()
    total = time.perf_counter() - start
    ends = [t for _, t in marks[1:]] + [total]
    stages = {name: round(end - begin, 2) for (name, begin), end in zip(marks, ends)}
    return {"seconds": total, "rc": rc, "stages": stages, "output_tail": "\n".join(lines[-40:])}


def measure(log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time `dvc repro --force` from scratch and a no-op `dvc repro` in a fresh clone of HEAD."""
    commit = _git("rev-parse", "HEAD")
    dirty = [line for line in _git("status", "--porcelain").splitlines() if line.strip()]
    bin_dir = str(Path(sys.executable).parent)
    result: dict[str, Any] = {"commit": commit, "uncommitted_files_not_timed": len(dirty), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="selfref-bench-pipeline-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "checkout", "--quiet", commit], cwd=clone, check=True)
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
               "PYTHONPATH": str(clone),  # the clone's `analysis`, not this checkout's editable install
               "SELFREF_ROOT": str(clone), "SELFREF_DEMO_MODELS": str(Path(tmp) / "models"), "TQDM_DISABLE": "1"}
        env.pop("HF_TOKEN", None)
        # the goal is about the demo suite: the default suite adds the real checkpoints (benchmarks/real.py)
        subprocess.run([sys.executable, "-m", "analysis.cli", "suite", "use", SUITE], cwd=clone, env=env, check=True,
                       capture_output=True)
        log(f"dvc repro --force in a fresh clone of {commit[:10]} ({SUITE} suite)")
        scratch = timed_run(["dvc", "repro", "--force"], clone, env)
        log(f"  {scratch['seconds']:.1f} s, exit status {scratch['rc']}")
        if scratch["rc"] != 0:
            raise RuntimeError(f"dvc repro --force exited {scratch['rc']}: ...{scratch['output_tail'][-1500:]}")
        scratch.pop("output_tail")
        result["from_scratch"] = scratch
        result["slowest"] = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(scratch["stages"].items(),
                                                                           key=lambda kv: -kv[1])[:3])
        log("no-op dvc repro")
        noop = timed_run(["dvc", "repro"], clone, env)
        noop["stages_rerun"] = len(noop["stages"])
        noop.pop("output_tail")
        result["noop"] = noop
        log(f"  {noop['seconds']:.1f} s, exit status {noop['rc']}, {noop['stages_rerun']} stage(s) re-ran")
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
