"""How many threads or processes a stage gets on the CPU: `extract.cpu_threads` (torch threads of a forward pass),
`probe.workers` and `stats.workers` (processes side by side, analysis/core/lanes.py).

More threads than free cores make every operation wait for the thread that lost its core (on a 2-core machine
that another job kept busy, 2 threads ran SmolLM2 7x slower than 1); on idle cores, 2 threads ran it 1.6x faster
than 1 (README, "Real checkpoints"). `auto` therefore counts the cores that are idle when the stage starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.25  # how long the idle time of the usable cores is sampled
IDLE_FRACTION_FOR_A_THREAD = 0.7  # a core idle at least this much of the sample counts as free


def _core_times(stat_text: str, cores: set[int]) -> tuple[int, int]:
    """(idle, total) jiffies summed over `cores`, from the per-core lines of /proc/stat (idle and iowait are idle)."""
    idle = total = 0
    for line in stat_text.splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        idle += ticks[3] + ticks[4]
        total += sum(ticks)
    return idle, total


def usable_cores() -> set[int]:
    """The cores this process may run on (its affinity where the platform reports one)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return set(range(os.cpu_count() or 1))


def idle_cores(before: str, after: str, cores: set[int]) -> float:
    """Idle cores between two readings of /proc/stat: the usable cores times the idle share of their time."""
    idle0, total0 = _core_times(before, cores)
    idle1, total1 = _core_times(after, cores)
    if total1 <= total0:
        return float(len(cores))
    return len(cores) * (idle1 - idle0) / (total1 - total0)


def free_threads(idle: float, n_cores: int) -> int:
    """Threads for `idle` idle cores of `n_cores`: one per core idle enough to count as free, at least one."""
    whole, part = divmod(max(idle, 0.0), 1.0)
    return max(1, min(n_cores, int(whole) + (part >= IDLE_FRACTION_FOR_A_THREAD)))


def cpu_threads(setting: int | str | None) -> int | None:
    """Torch threads for `extract.cpu_threads`: the number given, the free cores now (`auto`), or None (torch's own
    default). Without /proc/stat (macOS, Windows) `auto` is torch's default."""
    if setting != "auto":
        return setting
    cores = usable_cores()
    try:
        before = PROC_STAT.read_text()
        time.sleep(SAMPLE_SECONDS)
        after = PROC_STAT.read_text()
    except OSError:
        return None
    return free_threads(idle_cores(before, after, cores), len(cores))
