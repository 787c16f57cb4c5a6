"""Independent pieces of work run side by side on the CPU's cores: forked worker processes ("lanes") that each write
their results as files, which the caller reads back. Nothing crosses between processes but files (no pickle), and
a lane that fails makes the whole run fail with its message."""

from __future__ import annotations

import multiprocessing
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from analysis.core.errors import UserError

ERROR_FILE = "error.txt"  # what a lane refused (a UserError) leaves in its folder: the message, raised again
CRASH_FILE = "crash.txt"  # what any other failure of a lane leaves: its traceback


def plan_lanes(costs: dict[str, float], n_lanes: int) -> list[list[str]]:
    """Split the keys of `costs` into at most `n_lanes` lanes of about equal total cost (longest first onto the
    lightest lane); each lane keeps the keys in the order of `costs`."""
    lanes: list[list[str]] = [[] for _ in range(max(1, min(n_lanes, len(costs))))]
    loads = [0.0] * len(lanes)
    for key in sorted(costs, key=lambda k: -costs[k]):
        lightest = loads.index(min(loads))
        lanes[lightest].append(key)
        loads[lightest] += costs[key]
    order = {key: i for i, key in enumerate(costs)}
    return [sorted(lane, key=order.__getitem__) for lane in lanes if lane]


def _fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def _run_lane(work: Callable[[Sequence[str], Path], None], keys: Sequence[str], folder: Path) -> None:
    """Run one lane's work; a failure leaves its message in the lane's folder."""
    try:
        work(keys, folder)
    except UserError as err:
        (folder / ERROR_FILE).write_text(str(err), encoding="utf-8")
        raise SystemExit(1) from None
    except BaseException:
        (folder / CRASH_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        raise SystemExit(1) from None


def run_lanes(lanes: list[list[str]], work: Callable[[Sequence[str], Path], None], scratch: Path) -> list[Path]:
    """Call `work(keys, folder)` for each lane, in forked processes when there is more than one lane and the
    platform can fork (else one after the other in this process); returns each lane's folder, in lane order."""
    scratch.mkdir(parents=True, exist_ok=True)
    folders = [Path(tempfile.mkdtemp(prefix=f"lane{i}-", dir=scratch)) for i in range(len(lanes))]
    if len(lanes) == 1 or not _fork_available():
        for keys, folder in zip(lanes, folders):
            work(keys, folder)
        return folders
    context = multiprocessing.get_context("fork")  # the child inherits the work and its inputs: nothing pickled
    processes = [context.Process(target=_run_lane, args=(work, keys, folder)) for keys, folder in zip(lanes, folders)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    for keys, folder, process in zip(lanes, folders, processes):
        if process.exitcode == 0:
            continue
        if (folder / ERROR_FILE).exists():
            raise UserError((folder / ERROR_FILE).read_text(encoding="utf-8"))
        crash = folder / CRASH_FILE
        detail = crash.read_text(encoding="utf-8") if crash.exists() else f"exit status {process.exitcode}"
        raise RuntimeError(f"the lane of {', '.join(keys)} failed:\n{detail}")
    return folders
