"""``lln bench --contend``: the contending process is pinned, busy, and ended afterwards."""

from __future__ import annotations

import os
import time

import pytest

from lln.bench import report
from lln.bench.contend import contender


def _children() -> set[int]:
    path = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    with open(path) as f:
        return {int(pid) for pid in f.read().split()}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists(
    f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="Linux affinity and /proc")
def test_contender_is_pinned_busy_and_stopped():
    before = _children()
    with contender(True) as core:
        (pid,) = _children() - before
        assert core == max(os.sched_getaffinity(0))
        assert os.sched_getaffinity(pid) == {core}
        time.sleep(0.5)
        with open(f"/proc/{pid}/stat") as f:
            user_ticks = int(f.read().rsplit(")", 1)[1].split()[11])
        assert user_ticks > 0  # spinning, not sleeping
    assert pid not in _children()
    with contender(False) as core:
        assert core is None and _children() == before


def test_machine_line_names_the_contention():
    header = {
        "machine": {"cpu": "x", "cpu_count": 2, "os": "Linux"}, "torch": "2", "lln": "0",
        "date": "d", "settings": {"batch": 1, "heads": 2, "dim": 4, "dtype": "float32",
                                  "device": "cpu", "causal": True, "contend": True,
                                  "contend_core": 1},
    }
    assert "CPU-bound process pinned to core 1 (--contend)" in report.machine_line(header, 2)
    header["settings"]["contend"] = False
    assert "contend" not in report.machine_line(header, 2)
