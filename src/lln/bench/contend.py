"""``lln bench --contend``: a CPU-bound process pinned beside the benchmark.

Reproduces a shared machine: one busy process (a pure-Python spin loop) pinned to one of
the usable cores while the workers run with their usual threads, so a kernel made of many
small operations (which waits for the slowest thread at every op) shows its sensitivity to
contention. Compare the speed ratios of a ``--contend`` run with a quiet run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

SPIN = "while True: pass"


@contextlib.contextmanager
def contender(enabled: bool) -> Iterator[int | None]:
    """Run the spinning process for the duration of the block; yields the core it is pinned
    to (the last usable core; None when off, or where affinity is not supported)."""
    if not enabled:
        yield None
        return
    process = subprocess.Popen([sys.executable, "-c", SPIN])
    core = None
    try:
        if hasattr(os, "sched_setaffinity"):
            core = max(os.sched_getaffinity(0))
            os.sched_setaffinity(process.pid, {core})
        yield core
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
