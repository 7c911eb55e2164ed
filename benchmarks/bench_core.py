"""Wall-clock benchmark of the core ops against PyTorch's softmax attention.

Run from the repository root::

    python benchmarks/bench_core.py                    # full run: N = 1024 ... 16384
    python benchmarks/bench_core.py --lengths 256 512 --repeats 1 --out /tmp/bench.json

What it measures, for every sequence length N, with ``(B, H, N, D)`` inputs
(default B=1, H=12, D=64, float32, CPU):

* ``lln``             ``lln.lln_attention(q, k, v)``                    (non-causal)
* ``lln_causal``      ``lln.lln_attention(q, k, v, is_causal=True)``
* ``lln_diag_causal`` ``lln.lln_diag_attention(q, k, v, is_causal=True)``
* ``sdpa``            ``F.scaled_dot_product_attention(q, k, v)``       (non-causal)
* ``sdpa_causal``     ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``

Every op runs with its library defaults. Two timings per op and N:

* ``fwd``: the forward call alone, on inputs that do not require grad.
* ``fwd_bwd``: forward plus ``out.backward(grad)`` on leaf ``q, k, v`` with
  ``requires_grad=True`` and a pre-made random ``grad``.

Methodology: inputs (and ``grad``) are created outside the timed region. Each timing
starts with ``--warmup`` untimed runs (the first one is timed only to decide whether to
skip), then reports the median of ``--repeats`` runs timed with ``time.perf_counter``
(default: 5 runs for N <= 4096, 3 above). Methods are interleaved per N (all methods for one
N, then the next N), so slow drifts of the machine affect all methods alike. A timing whose
first warm-up run exceeds ``--max-seconds`` is recorded as ``"skipped"`` (and so is that
method and mode at every larger N); running out of memory is recorded as ``"oom"``.

Outputs: a JSON file (default ``benchmarks/results/core_cpu.json``) with a header (machine,
torch version, threads, dtype, shapes, date, exact command) and the per-method, per-N
seconds; a markdown file next to it (same name, ``.md``) with the tables, which are also
printed to stdout. Ratios: ``SDPA time / LLN time`` for matching causal and non-causal
pairs (> 1 means LLN is faster) and the scaling ``t(N) / t(N/4)`` of every method
(16 for quadratic cost, 4 for linear cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import lln

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "core_cpu.json"
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: Default repeats: this many for N <= REPEATS_SPLIT_N, REPEATS_LONG above.
REPEATS_SHORT, REPEATS_LONG, REPEATS_SPLIT_N = 5, 3, 4096
MODES = ("fwd", "fwd_bwd")

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]

#: The benchmarked methods, in table order.
METHODS: dict[str, Attention] = {
    "lln": lambda q, k, v: lln.lln_attention(q, k, v),
    "lln_causal": lambda q, k, v: lln.lln_attention(q, k, v, is_causal=True),
    "lln_diag_causal": lambda q, k, v: lln.lln_diag_attention(q, k, v, is_causal=True),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "sdpa_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}

#: Speed-up columns: (label, SDPA method, LLN method); value = t(SDPA) / t(LLN).
SPEEDUPS: list[tuple[str, str, str]] = [
    ("sdpa_causal / lln_causal", "sdpa_causal", "lln_causal"),
    ("sdpa_causal / lln_diag_causal", "sdpa_causal", "lln_diag_causal"),
    ("sdpa / lln", "sdpa", "lln"),
]

#: A timing in seconds, or why there is none: "skipped" or "oom".
Timing = float | str


# --------------------------------------------------------------------------- timing


def is_out_of_memory(error: RuntimeError) -> bool:
    """True for torch's out-of-memory errors (CPU allocator or CUDA)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


def time_call(
    run: Callable[[], object],
    *,
    reset: Callable[[], None],
    repeats: int,
    warmup: int,
    max_seconds: float,
) -> Timing:
    """Median seconds of ``run()`` over ``repeats`` calls, after ``warmup`` calls.

    ``reset()`` runs before every call, outside the timed region. The result of ``run()``
    is released only after the clock stops. Returns ``"skipped"`` when the first warm-up
    call takes longer than ``max_seconds`` and ``"oom"`` when memory runs out.
    """
    try:
        for i in range(warmup):
            reset()
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            del result
            if i == 0 and elapsed > max_seconds:
                return "skipped"
        times = []
        for _ in range(repeats):
            reset()
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
            del result
    except RuntimeError as error:
        if is_out_of_memory(error):
            return "oom"
        raise
    return statistics.median(times)


def bench_length(
    n: int,
    methods: list[str],
    args: argparse.Namespace,
    given_up: set[tuple[str, str]],
) -> dict[str, dict[str, Timing | int]]:
    """Time every method at sequence length ``n``: ``{method: {"fwd_s": ..., ...}}``.

    ``given_up`` holds the (method, mode) pairs skipped or out of memory at a smaller N;
    they are skipped here without running, and new failures are added to it.
    """
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, n, args.dim)
    generator = torch.Generator().manual_seed(n)
    q, k, v, grad = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(4))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    repeats = args.repeats or (REPEATS_SHORT if n <= REPEATS_SPLIT_N else REPEATS_LONG)

    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    results: dict[str, dict[str, Timing | int]] = {}
    for name in methods:
        attention = METHODS[name]

        def forward(attention: Attention = attention) -> Tensor:
            with torch.no_grad():
                return attention(q, k, v)

        def forward_backward(attention: Attention = attention) -> None:
            attention(*leaves).backward(grad)

        runs = {"fwd": forward, "fwd_bwd": forward_backward}
        row: dict[str, Timing | int] = {}
        for mode in MODES:
            if (name, mode) in given_up:
                timing: Timing = "skipped"
            else:
                timing = time_call(
                    runs[mode],
                    reset=clear_grads,
                    repeats=repeats,
                    warmup=args.warmup,
                    max_seconds=args.max_seconds,
                )
            if isinstance(timing, str):
                given_up.add((name, mode))
            row[f"{mode}_s"] = timing
            print(f"N={n:>6}  {name:<16} {mode:<8} {format_ms(timing):>10}", flush=True)
        row["repeats"] = repeats
        results[name] = row
    return results


# --------------------------------------------------------------------------- reporting


def format_ms(timing: Timing | None) -> str:
    """Seconds as milliseconds (1 decimal from 10 ms, else 2); strings pass through."""
    if timing is None:
        return "-"
    if isinstance(timing, str):
        return timing
    ms = timing * 1e3
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def ratio(numerator: Timing | None, denominator: Timing | None) -> float | None:
    """``numerator / denominator`` when both are measured times, else None."""
    if isinstance(numerator, float) and isinstance(denominator, float) and denominator > 0:
        return numerator / denominator
    return None


def format_ratio(value: float | None) -> str:
    """``1.43x``; two significant digits below 0.1 (``0.0042x``); ``-`` when missing."""
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def compute_ratios(
    results: dict[str, dict[int, dict[str, Timing | int]]], lengths: list[int]
) -> tuple[dict, dict]:
    """Speed-ups ``{mode: {label: {N: x}}}`` and scaling ``{mode: {method: {N: x}}}``."""
    speedups: dict = {}
    scaling: dict = {}
    for mode in MODES:
        key = f"{mode}_s"
        speedups[mode] = {
            label: {
                n: ratio(results[sdpa][n][key], results[ours][n][key])
                for n in lengths
                if sdpa in results and ours in results
            }
            for label, sdpa, ours in SPEEDUPS
        }
        scaling[mode] = {
            name: {
                n: ratio(per_n[n][key], per_n[n // 4][key])
                for n in lengths
                if n % 4 == 0 and n // 4 in per_n
            }
            for name, per_n in results.items()
        }
    return speedups, scaling


def machine_info() -> dict[str, object]:
    """Processor name, OS, CPU counts: enough to tell two result files apart."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    uname = platform.uname()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": cpu_model,
        "processor": platform.processor(),
        "uname": f"{uname.system} {uname.release} {uname.machine}",
        "node": uname.node,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": platform.python_version(),
    }


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine skews timings), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def git_commit() -> str | None:
    """The checked-out commit (with ``-dirty`` for local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        describe = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return describe.stdout.strip() or None


def markdown_report(header: dict, results: dict, speedups: dict, scaling: dict) -> str:
    """The markdown tables: fwd+bwd with speed-ups, forward with speed-ups, scaling."""
    machine = header["machine"]
    lengths: list[int] = header["lengths"]
    methods = list(results)
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpu_count']} CPUs, "
        f"{header['threads']} torch threads, {machine['uname']}; torch {header['torch']}, "
        f"lln {header['lln']}; B={header['batch']} H={header['heads']} D={header['dim']} "
        f"{header['dtype']}; {header['date']}.",
        "",
        f"Command: `{header['command']}`",
        "",
    ]
    for mode, title in (("fwd_bwd", "Forward + backward"), ("fwd", "Forward only")):
        labels = [label for label, sdpa, ours in SPEEDUPS if sdpa in results and ours in results]
        lines += [
            f"**{title}** (median wall time; ratios are SDPA time / LLN time, > 1 = LLN faster)",
            "",
            "| N | " + " | ".join(methods + labels) + " |",
            "|---:" * (1 + len(methods) + len(labels)) + "|",
        ]
        for n in lengths:
            cells = [format_ms(results[name][n][f"{mode}_s"]) for name in methods]
            cells += [format_ratio(speedups[mode][label][n]) for label in labels]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    scaled = [n for n in lengths if n % 4 == 0 and n // 4 in lengths]
    if scaled:
        lines += [
            "**Scaling** t(N) / t(N/4), forward + backward (4 = linear, 16 = quadratic)",
            "",
            "| N | " + " | ".join(methods) + " |",
            "|---:" * (1 + len(methods)) + "|",
        ]
        for n in scaled:
            cells = [format_ratio(scaling["fwd_bwd"][name][n]) for name in methods]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="%(default)s"
    )
    parser.add_argument("--batch", type=int, default=1, help="%(default)s")
    parser.add_argument("--heads", type=int, default=12, help="%(default)s")
    parser.add_argument("--dim", type=int, default=64, help="%(default)s")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="%(default)s")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per measurement (default: {REPEATS_SHORT} for N <= "
        f"{REPEATS_SPLIT_N}, {REPEATS_LONG} above)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs first, >= 1 (%(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=float("inf"),
        help="skip a measurement whose first warm-up run takes longer (default: no limit)",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="all"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON output; the markdown goes next to it as .md (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first warm-up run decides --max-seconds)")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if min(args.lengths) < 1:
        parser.error("--lengths must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    lengths = sorted(set(args.lengths))
    methods = [name for name in METHODS if name in args.methods]
    header = {
        "machine": machine_info(),
        "torch": torch.__version__,
        "lln": lln.__version__,
        "git": git_commit(),
        "threads": torch.get_num_threads(),
        "threads_set": args.threads is not None,
        "dtype": args.dtype,
        "batch": args.batch,
        "heads": args.heads,
        "dim": args.dim,
        "lengths": lengths,
        "repeats": args.repeats
        or f"{REPEATS_SHORT} for N <= {REPEATS_SPLIT_N}, {REPEATS_LONG} above",
        "warmup": args.warmup,
        "max_seconds": args.max_seconds if args.max_seconds != float("inf") else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv),
        "loadavg_start": load_average(),
    }
    print(
        f"# {header['machine']['cpu']}, {header['threads']} threads, torch {header['torch']}, "
        f"B={args.batch} H={args.heads} D={args.dim} {args.dtype}",
        flush=True,
    )
    if (header["loadavg_start"] or 0.0) > 0.5:
        print(
            f"# warning: 1-minute load average {header['loadavg_start']:.2f} before the start; "
            "other work on this machine will inflate the timings",
            flush=True,
        )

    results: dict[str, dict[int, dict[str, Timing | int]]] = {name: {} for name in methods}
    given_up: set[tuple[str, str]] = set()
    for n in lengths:
        for name, row in bench_length(n, methods, args, given_up).items():
            results[name][n] = row
    speedups, scaling = compute_ratios(results, lengths)
    header["loadavg_end"] = load_average()

    report = markdown_report(header, results, speedups, scaling)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"header": header, "results": results, "speedups": speedups, "scaling": scaling},
            f,
            indent=2,
        )
        f.write("\n")
    markdown_path = args.out.with_suffix(".md")
    markdown_path.write_text(report)
    print()
    print(report)
    print(f"Wrote {args.out} and {markdown_path}")


if __name__ == "__main__":
    main()
