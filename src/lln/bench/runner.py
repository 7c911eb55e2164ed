"""Run benchmark configurations in fresh worker processes, with time and memory limits.

:func:`run_in_subprocess` starts ``python -m lln.bench.worker`` for one configuration and
watches it: past ``timeout`` seconds it is killed and recorded as ``timeout``; when its
resident memory exceeds ``memory_limit`` bytes it is killed and recorded as ``oom``; a
worker killed by a signal (for instance by the kernel's out-of-memory killer) or exiting
without a result is recorded as ``oom`` / ``error`` with the reason in ``detail``.

:func:`sweep` runs every (length, method, mode) in that order -- all methods at one length
before the next length, so slow drifts of the machine hit every method alike -- and once a
(method, mode) has timed out or run out of memory at some length, records it as
``skipped`` at every larger length without running it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: Statuses after which larger lengths of the same (method, mode) are not attempted.
GIVE_UP_STATUSES = ("timeout", "oom")
POLL_SECONDS = 0.05


def _rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` (Linux ``/proc``), or None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def total_memory_bytes() -> int | None:
    """Physical memory of the machine, or None if unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _worker_env() -> dict[str, str]:
    """This environment, with the folder holding the ``lln`` package first on PYTHONPATH
    (so that the worker imports the same ``lln``, installed or not)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def run_in_subprocess(
    config: dict[str, Any],
    *,
    timeout: float | None = None,
    memory_limit: int | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run one configuration in a fresh ``python -m lln.bench.worker`` process.

    Args:
        config: the worker config (:func:`lln.bench.worker.default_config` keys).
        timeout: seconds of wall time before the worker is killed (None = no limit).
        memory_limit: bytes of worker RSS before it is killed (None = no limit).
        python: the interpreter to run the worker with.

    Returns:
        The worker's result record, with ``wall_s`` (the whole process, start-up included)
        and, for failures, ``status`` ``timeout`` / ``oom`` / ``error`` and ``detail``.
    """
    with tempfile.TemporaryDirectory(prefix="lln-bench-") as tmp:
        tmp_path = Path(tmp)
        result_path = tmp_path / "result.json"
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps({**config, "result_path": str(result_path)}))
        stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
        with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
            start = time.perf_counter()
            process = subprocess.Popen(
                [python, "-m", "lln.bench.worker", f"@{config_path}"],
                stdout=stdout,
                stderr=stderr,
                env=_worker_env(),
            )
            killed_for: str | None = None
            peak_seen = 0
            try:
                while process.poll() is None:
                    elapsed = time.perf_counter() - start
                    if timeout is not None and elapsed > timeout:
                        killed_for = "timeout"
                    rss = _rss_bytes(process.pid)
                    if rss is not None:
                        peak_seen = max(peak_seen, rss)
                        if memory_limit is not None and rss > memory_limit:
                            killed_for = "oom"
                    if killed_for:
                        process.kill()
                        process.wait()
                        break
                    time.sleep(POLL_SECONDS)
            except BaseException:
                process.kill()
                process.wait()
                raise
            wall = time.perf_counter() - start
        if killed_for == "timeout":
            record = {"status": "timeout", "detail": f"killed after {timeout:g} s"}
        elif killed_for == "oom":
            record = {
                "status": "oom",
                "detail": f"killed at {peak_seen / 2**20:.0f} MiB RSS "
                f"(limit {memory_limit / 2**20:.0f} MiB)",
            }
        elif result_path.exists():
            record = json.loads(result_path.read_text())
        elif process.returncode < 0:
            number = -process.returncode
            name = signal.Signals(number).name if number in signal.valid_signals() else number
            status = "oom" if number == signal.SIGKILL else "error"
            record = {
                "status": status,
                "detail": f"worker killed by {name}"
                + (" (most likely the kernel's out-of-memory killer)" if status == "oom" else ""),
            }
        else:
            record = {
                "status": "error",
                "detail": f"worker exited with code {process.returncode} and no result: "
                + _tail(stderr_path, 500),
            }
        record["wall_s"] = wall
        if record["status"] != "ok":
            record.setdefault("stderr_tail", _tail(stderr_path))
        return record


def sweep(
    configs: Iterable[dict[str, Any]],
    *,
    timeout: float | None = None,
    memory_limit: int | None = None,
    skip: Callable[[dict[str, Any]], str | None] = lambda config: None,
    on_result: Callable[[dict[str, Any]], None] = lambda result: None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``configs`` (ordered by length) one process each; returns one result per config.

    Each result is ``{"method", "mode", "n", **record}``, with ``method`` the config's
    ``label`` when it has one. ``skip(config)`` may return a
    reason (e.g. ``"unsupported: ..."``) to record a config without running it (status
    ``unsupported``). ``on_result`` sees every result as soon as it exists (to save partial
    results). A tqdm progress bar is shown when ``progress``.
    """
    from tqdm import tqdm

    configs = list(configs)
    given_up: dict[tuple[str, str], int] = {}
    results: list[dict[str, Any]] = []
    bar = tqdm(configs, desc="lln bench", unit="config", disable=not progress, leave=False)
    for config in bar:
        name = config.get("label", config["method"])  # e.g. "lln B=8" when batches vary
        key = (name, config["mode"])
        where = {"method": name, "mode": config["mode"], "n": config["n"]}
        bar.set_postfix_str(f"{name} {config['mode']} N={config['n']}")
        reason = skip(config)
        if reason is not None:
            record: dict[str, Any] = {"status": "unsupported", "detail": reason}
        elif key in given_up:
            record = {
                "status": "skipped",
                "detail": f"gave up at N={given_up[key]} (timeout or out of memory)",
            }
        else:
            record = run_in_subprocess(config, timeout=timeout, memory_limit=memory_limit)
            if record["status"] in GIVE_UP_STATUSES:
                given_up[key] = config["n"]
        result = {**where, **record}
        results.append(result)
        if progress:
            bar.write(describe(result))
        on_result(result)
    bar.close()
    return results


def describe(result: dict[str, Any]) -> str:
    """One line for the log: ``N=  1024  lln       fwd_bwd   12.3 ms  +45 MiB``."""
    head = f"N={result['n']:>6}  {result['method']:<12} {result['mode']:<8}"
    if result["status"] != "ok":
        detail = f" ({result['detail']})" if result.get("detail") else ""
        return f"{head} {result['status']}{detail}"
    seconds = result["time"]["median"]
    delta = result["memory"]["delta_bytes"] / 2**20
    return f"{head} {seconds * 1e3:>10.2f} ms  +{delta:.0f} MiB"
