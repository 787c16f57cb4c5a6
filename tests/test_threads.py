"""`extract.cpu_threads: auto`: the idle cores counted from two readings of /proc/stat, by hand."""

from __future__ import annotations

import pytest

from analysis.core import threads

# user nice system idle iowait irq softirq steal, per core; the aggregate `cpu` line is ignored
BEFORE = """cpu  900 0 0 900 0 0 0 0 0 0
cpu0 100 0 0 900 0 0 0 0 0 0
cpu1 500 0 0 100 0 0 0 0 0 0
cpu2 100 0 0 100 0 0 0 0 0 0
intr 1 2 3
"""
# over the sample: cpu0 idle 90 of 100 ticks (80 idle + 10 iowait), cpu1 busy (0 of 100), cpu2 idle 50 of 100
AFTER = """cpu  0 0 0 0 0 0 0 0 0 0
cpu0 110 0 0 980 10 0 0 0 0 0
cpu1 590 0 0 100 0 0 10 0 0 0
cpu2 150 0 0 150 0 0 0 0 0 0
intr 1 2 3
"""


def test_idle_cores_by_hand():
    assert threads.idle_cores(BEFORE, AFTER, {0, 1, 2}) == pytest.approx(3 * (90 + 0 + 50) / 300)
    assert threads.idle_cores(BEFORE, AFTER, {0, 1}) == pytest.approx(2 * 90 / 200)  # only the usable cores count
    assert threads.idle_cores(BEFORE, BEFORE, {0, 1}) == 2.0  # no tick elapsed: nothing seen busy


@pytest.mark.parametrize(("idle", "cores", "expected"), [
    (1.95, 2, 2), (1.7, 2, 2), (1.5, 2, 1), (0.9, 2, 1), (0.0, 2, 1), (-0.1, 2, 1), (7.8, 8, 8), (3.2, 8, 3),
    (5.0, 4, 4),
])
def test_one_thread_per_free_core_and_at_least_one(idle, cores, expected):
    assert threads.free_threads(idle, cores) == expected


def test_a_number_or_an_empty_setting_is_used_as_given(monkeypatch):
    monkeypatch.setattr(threads, "PROC_STAT", threads.PROC_STAT.with_name("no-such-stat-file"))
    assert threads.cpu_threads(3) == 3 and threads.cpu_threads(None) is None
    assert threads.cpu_threads("auto") is None  # no /proc/stat: torch's own default


def test_auto_reads_the_machine(monkeypatch):
    readings = iter([BEFORE, AFTER])
    monkeypatch.setattr(threads, "PROC_STAT", type("Stat", (), {"read_text": lambda self: next(readings)})())
    monkeypatch.setattr(threads, "usable_cores", lambda: {0, 1, 2})
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.cpu_threads("auto") == 1  # 1.4 cores idle: one free
