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


class StartedLanes:
    """Lanes that were started: `join()` waits for them and returns each lane's folder, in lane order."""

    def __init__(self, lanes: list[list[str]], folders: list[Path], processes: list) -> None:
        self.lanes, self.folders, self.processes = lanes, folders, processes

    def join(self) -> list[Path]:
        for process in self.processes:
            process.join()
        for keys, folder, process in zip(self.lanes, self.folders, self.processes):
            if process.exitcode == 0:
                continue
            if (folder / ERROR_FILE).exists():
                raise UserError((folder / ERROR_FILE).read_text(encoding="utf-8"))
            crash = folder / CRASH_FILE
            detail = crash.read_text(encoding="utf-8") if crash.exists() else f"exit status {process.exitcode}"
            raise RuntimeError(f"the lane of {', '.join(keys)} failed:\n{detail}")
        return self.folders


def start_lanes(lanes: list[list[str]], work: Callable[[Sequence[str], Path], None], scratch: Path,
                fork: bool = True) -> StartedLanes:
    """Start `work(keys, folder)` for each lane in a forked process, so that the caller can work meanwhile; where
    `fork` is off or the platform cannot fork, run each lane here, one after the other, before returning."""
    scratch.mkdir(parents=True, exist_ok=True)
    folders = [Path(tempfile.mkdtemp(prefix=f"lane{i}-", dir=scratch)) for i in range(len(lanes))]
    if not (fork and _fork_available()):
        for keys, folder in zip(lanes, folders):
            work(keys, folder)
        return StartedLanes(lanes, folders, [])
    context = multiprocessing.get_context("fork")  # the child inherits the work and its inputs: nothing pickled
    processes = [context.Process(target=_run_lane, args=(work, keys, folder)) for keys, folder in zip(lanes, folders)]
    for process in processes:
        process.start()
    return StartedLanes(lanes, folders, processes)


def run_lanes(lanes: list[list[str]], work: Callable[[Sequence[str], Path], None], scratch: Path) -> list[Path]:
    """Call `work(keys, folder)` for each lane, in forked processes when there is more than one lane (else in this
    process); returns each lane's folder, in lane order."""
    return start_lanes(lanes, work, scratch, fork=len(lanes) > 1).join()
