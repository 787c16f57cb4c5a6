"""Lanes (analysis/core/lanes.py): work split by cost, run in forked processes that hand back only files."""

from __future__ import annotations

import os

import pytest

from analysis.core.errors import UserError
from analysis.core.lanes import plan_lanes, run_lanes


def test_lanes_balance_cost_longest_first_and_keep_the_given_order():
    # by hand: a(5) -> lane 0, b(4) -> lane 1, c(3) -> lane 1 (4 < 5), d(2) -> lane 0 (5 < 7); e(1) -> either at 7
    costs = {"d": 2.0, "a": 5.0, "c": 3.0, "b": 4.0, "e": 1.0}
    lanes = plan_lanes(costs, 2)
    assert sorted(map(sorted, lanes)) == [["a", "d", "e"], ["b", "c"]] or sorted(map(sorted, lanes)) == [
        ["a", "d"], ["b", "c", "e"]]
    for lane in lanes:  # each lane in the order of `costs`
        assert lane == [k for k in costs if k in lane]
    assert plan_lanes(costs, 1) == [list(costs)]
    assert plan_lanes({"x": 1.0}, 8) == [["x"]]  # never more lanes than pieces of work


def _write_pid(keys, folder):
    for key in keys:
        (folder / f"{key}.txt").write_text(str(os.getpid()))


def test_two_lanes_run_in_two_other_processes_and_hand_back_files(tmp_path):
    lanes = [["a", "b"], ["c"]]
    folders = run_lanes(lanes, _write_pid, tmp_path)
    pids = {key: int((folder / f"{key}.txt").read_text()) for lane, folder in zip(lanes, folders) for key in lane}
    assert pids["a"] == pids["b"] != pids["c"]
    assert os.getpid() not in pids.values()


def test_one_lane_runs_in_this_process(tmp_path):
    (folder,) = run_lanes([["a"]], _write_pid, tmp_path)
    assert int((folder / "a.txt").read_text()) == os.getpid()


def test_a_refusal_in_a_lane_is_raised_with_its_message_and_a_crash_with_its_traceback(tmp_path):
    def refuse(keys, folder):
        if "bad" in keys:
            raise UserError("data/x.parquet: missing; run `dvc repro`")

    with pytest.raises(UserError, match=r"^data/x.parquet: missing; run `dvc repro`$"):
        run_lanes([["good"], ["bad"]], refuse, tmp_path / "refuse")

    def crash(keys, folder):
        if "bad" in keys:
            raise ZeroDivisionError("a bug")

    with pytest.raises(RuntimeError, match=r"(?s)the lane of bad failed:.*ZeroDivisionError: a bug"):
        run_lanes([["good"], ["bad"]], crash, tmp_path / "crash")
