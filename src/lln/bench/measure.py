"""Clocks and memory probes used inside one benchmark process.

Timing (:func:`time_runs`) follows one documented rule so that long configurations do not
blow up the run time:

* ``warmup`` untimed-for-the-result calls run first (each is timed, to pick the repeats);
* if the first warm-up call alone took longer than ``long_seconds`` (default 10 s), that
  call is the one and only measurement (``repeats = 1``, ``warmup_reused = True``): at that
  length one-off costs (first-touch page faults, thread start-up) are a negligible part;
* otherwise ``repeats = clamp(ceil(target_seconds / t_warm), min_repeats, max_repeats)``
  with ``t_warm`` the last warm-up time (defaults: 2 s, 3, 10), unless ``repeats`` is fixed.

Memory on CPU is the resident set of the process (Linux ``/proc/self/status``): the peak
(``VmHWM``) is reset to the current RSS after the inputs exist (``/proc/self/clear_refs``,
Linux >= 4.0), so ``delta = peak - baseline`` is what the measured calls added on top of the
interpreter, torch and the inputs. Where the peak cannot be reset the delta is an upper
bound (it may include an earlier peak); without ``/proc`` the fallback is ``ru_maxrss``
against the peak so far, a lower bound. The record's ``source`` says which. On CUDA the probe
uses ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

STATUS_PATH = "/proc/self/status"
CLEAR_REFS_PATH = "/proc/self/clear_refs"


# --------------------------------------------------------------------------- time


def plan_repeats(
    warm_seconds: float,
    *,
    target_seconds: float = 2.0,
    min_repeats: int = 3,
    max_repeats: int = 10,
) -> int:
    """Timed repeats after a warm-up call of ``warm_seconds``: about ``target_seconds`` of work,
    clamped to ``[min_repeats, max_repeats]``."""
    wanted = math.ceil(target_seconds / max(warm_seconds, 1e-9))
    return max(min_repeats, min(max_repeats, wanted))


def summarize(times: list[float]) -> dict[str, Any]:
    """Median, min, max, quartiles and IQR of ``times`` (seconds), plus the raw list."""
    ordered = sorted(times)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "repeats": len(ordered),
        "times": times,
    }


def time_runs(
    run: Callable[[], object],
    *,
    reset: Callable[[], None] = lambda: None,
    sync: Callable[[], None] = lambda: None,
    warmup: int = 1,
    repeats: int | None = None,
    long_seconds: float = 10.0,
    target_seconds: float = 2.0,
    min_repeats: int = 3,
    max_repeats: int = 10,
) -> dict[str, Any]:
    """Time ``run()`` by the rule in the module docstring.

    ``reset()`` runs before every call and ``sync()`` right before the clock starts and
    stops (``torch.cuda.synchronize`` on GPU); both are outside the timed region, and the
    result of ``run()`` is released only after the clock stops.

    Returns :func:`summarize` of the timed calls plus ``warmup_times`` and ``warmup_reused``.
    """
    warmup_times: list[float] = []

    def timed() -> float:
        reset()
        sync()
        start = time.perf_counter()
        result = run()
        sync()
        elapsed = time.perf_counter() - start
        del result
        return elapsed

    for _ in range(max(warmup, 0)):
        warmup_times.append(timed())
        if len(warmup_times) == 1 and warmup_times[0] > long_seconds:
            summary = summarize(warmup_times[:1])
            summary.update(warmup_times=warmup_times, warmup_reused=True)
            return summary
    if repeats is None:
        repeats = (
            plan_repeats(
                warmup_times[-1],
                target_seconds=target_seconds,
                min_repeats=min_repeats,
                max_repeats=max_repeats,
            )
            if warmup_times
            else min_repeats
        )
    summary = summarize([timed() for _ in range(repeats)])
    summary.update(warmup_times=warmup_times, warmup_reused=False)
    return summary


# --------------------------------------------------------------------------- memory


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, if readable."""
    try:
        with open(STATUS_PATH) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    """``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryProbe:
    """Peak memory of the calls between :meth:`start` and :meth:`stop`.

    ``device="cpu"``: process RSS (see the module docstring). ``device="cuda..."``: the
    CUDA caching allocator's allocated bytes; the RSS numbers are recorded too.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.source = ""
        self.baseline_rss: int | None = None
        self.baseline_cuda: int | None = None

    def start(self) -> None:
        """Record the baseline (now) and reset the peak to it."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_cuda = torch.cuda.memory_allocated(self.device)
        try:
            with open(CLEAR_REFS_PATH, "w") as clear_refs:
                clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            reset = True
        except OSError:
            reset = False
        rss = _status_bytes("VmRSS")
        if rss is not None:
            self.source = (
                "VmHWM (reset after the inputs were made)" if reset
                else "VmHWM (could not be reset: delta is an upper bound)"
            )
            self.baseline_rss = rss
        else:
            self.source = "ru_maxrss (no /proc: delta is a lower bound)"
            self.baseline_rss = _maxrss_bytes()

    def stop(self) -> dict[str, Any]:
        """``{"baseline_bytes", "peak_bytes", "delta_bytes", "source", ...}`` since start."""
        if self.source.startswith("VmHWM"):
            peak_rss = _status_bytes("VmHWM")
        else:
            peak_rss = _maxrss_bytes()
        baseline_rss = self.baseline_rss or 0
        peak_rss = max(peak_rss or 0, baseline_rss)
        record: dict[str, Any] = {
            "rss_baseline_bytes": baseline_rss,
            "rss_peak_bytes": peak_rss,
            "rss_delta_bytes": peak_rss - baseline_rss,
            "rss_source": self.source,
        }
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            baseline = self.baseline_cuda or 0
            record.update(
                baseline_bytes=baseline,
                peak_bytes=peak,
                delta_bytes=peak - baseline,
                source="torch.cuda.max_memory_allocated",
            )
        else:
            record.update(
                baseline_bytes=baseline_rss,
                peak_bytes=peak_rss,
                delta_bytes=peak_rss - baseline_rss,
                source=self.source,
            )
        return record
