"""``lln bench``: time and peak memory of attentions vs sequence length, or decoding latency.

Every (method, N, mode) runs in a fresh worker process (``python -m lln.bench.worker``) so
that its peak memory is its own; see :mod:`lln.bench.measure` for the timing rule and the
memory measure, :mod:`lln.bench.runner` for time / memory limits and skipping.

Writes to ``--out`` (a folder): ``results.json`` (header + every result + fits, rewritten
after each configuration, so an interrupted run keeps what it measured), ``results.md``
(the tables) and ``time.png`` / ``memory.png`` (log-log). ``--readme PATH`` puts the
markdown between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in that file
(``bench-decode`` markers with ``--decode``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HELP = "time and peak memory of every attention vs sequence length (--decode: decoding)"

DEFAULT_LENGTHS = [1024 * 2**i for i in range(7)]  # 1k ... 64k
DEFAULT_METHODS = ["softmax", "lln", "lln_diag"]
DEFAULT_DECODE_METHODS = [
    "lln", "lln_diag", "softmax", "lln+compile", "lln_diag+compile", "softmax+compile",
]
#: Batch sizes of ``--decode`` (each gets its own table).
DEFAULT_DECODE_BATCHES = [1, 8]
MODES = ("fwd", "fwd_bwd")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    dflt = " (default: %(default)s)"
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--methods", nargs="+", default=None,
        help="registry names, 'all', or module:function for your own attention; "
        "NAME[KEY=VALUE,...] passes keyword options, e.g. 'lln[checkpoint=True]' "
        f"(default: {' '.join(DEFAULT_METHODS)}; with --decode: "
        f"{' '.join(DEFAULT_DECODE_METHODS)})",
    )
    what.add_argument("--lengths", type=_positive(int), nargs="+", default=DEFAULT_LENGTHS,
                      help="sequence lengths N (context lengths T with --decode)" + dflt)
    what.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                      help="fwd: forward under no_grad; fwd_bwd: forward + backward of a "
                      "fixed random output gradient" + dflt)
    what.add_argument("--decode", action="store_true",
                      help="decoding benchmark: per-token latency after a context of T tokens")
    what.add_argument("--batch", type=_positive(int), nargs="+", default=None,
                      help="B (default: 1; with --decode: "
                      f"{' '.join(map(str, DEFAULT_DECODE_BATCHES))}, one table each)")
    what.add_argument("--heads", type=_positive(int), default=12, help="H" + dflt)
    what.add_argument("--dim", type=_positive(int), default=64, help="head dim D" + dflt)
    what.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"],
                      default="float32", help=dflt)
    what.add_argument("--device", default="cpu", help="cpu or cuda[:i]" + dflt)
    what.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                      help="causal attention (default: causal)")
    what.add_argument("--threads", type=_positive(int), default=None,
                      help="torch threads per worker (default: all usable cores)")
    what.add_argument("--seed", type=int, default=0, help=dflt)
    what.add_argument("--contend", action="store_true",
                      help="run a CPU-bound process pinned to one core beside the benchmark "
                      "(contention robustness; compare with a run without it)")

    how = parser.add_argument_group("timing and limits")
    how.add_argument("--warmup", type=int, default=1, help="warm-up calls before timing" + dflt)
    how.add_argument("--repeats", type=_positive(int), default=None,
                     help="fixed timed calls (default: adaptive, see --target-seconds)")
    how.add_argument("--target-seconds", type=_positive(float), default=2.0,
                     help="adaptive repeats: about this much timed work, clamped to "
                     "[--min-repeats, --max-repeats]" + dflt)
    how.add_argument("--min-repeats", type=_positive(int), default=3, help=dflt)
    how.add_argument("--max-repeats", type=_positive(int), default=10, help=dflt)
    how.add_argument("--long-seconds", type=_positive(float), default=10.0,
                     help="a first warm-up call longer than this is the only measurement"
                     + dflt)
    how.add_argument("--decode-steps", type=_positive(int), default=64,
                     help="timed single-token steps per context length" + dflt)
    how.add_argument("--decode-warmup", type=int, default=8,
                     help="untimed single-token steps first" + dflt)
    how.add_argument("--timeout", type=_positive(float), default=600.0,
                     help="seconds per configuration (whole worker process) before it is "
                     "recorded as timeout; larger N of that method are then skipped" + dflt)
    how.add_argument("--memory-limit", type=_positive(float), default=None,
                     help="GiB of worker RSS before it is recorded as oom "
                     "(default: 80%% of physical memory)")
    how.add_argument("--fit-min", type=_positive(int), default=2048,
                     help="fit the time exponent on N >= this" + dflt)
    how.add_argument("--fit-max", type=_positive(int), default=None,
                     help="... and N <= this (default: no bound)")

    out = parser.add_argument_group("outputs")
    out.add_argument("--out", type=Path, default=None,
                     help="output folder (default: bench_results/<bench|decode>-<UTC time>)")
    out.add_argument("--readme", type=Path, default=None,
                     help="replace the text between the markers in this file by the tables")
    out.add_argument("--readme-marker", default=None,
                     help="marker name: <!-- NAME:start --> ... <!-- NAME:end --> "
                     "(default: bench, or bench-decode with --decode)")
    out.add_argument("--overwrite", action="store_true",
                     help="write into an --out that already holds results, replacing them")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--quiet", action="store_true", help="no progress bar or per-config lines")


def _command_line() -> str:
    name = Path(sys.argv[0]).name
    if name == "lln":
        return shlex.join(["lln", *sys.argv[1:]])
    if name == "cli.py":
        return shlex.join(["python", "-m", "lln.cli", *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def resolve_methods(names: list[str] | None, *, decode: bool) -> list[str]:
    """Expand ``all`` and check registry names (``module:attr`` passes through).

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    from .decode import DECODE_METHODS
    from .worker import split_method

    if decode:
        names = names or DEFAULT_DECODE_METHODS
        names = list(DECODE_METHODS) if names == ["all"] else names
        unknown = [n for n in names if n not in DECODE_METHODS]
        if unknown:
            raise ValueError(
                f"--decode supports the methods {', '.join(DECODE_METHODS)}; got {unknown}"
            )
        return list(dict.fromkeys(names))
    from ..ops.registry import attention_names, get_attention

    names = names or DEFAULT_METHODS
    if "all" in names:
        names = attention_names() + [n for n in names if n != "all"]
    for name in names:
        base = split_method(name)[0]
        if ":" not in base:
            get_attention(base)
    return list(dict.fromkeys(names))


def _unsupported(config: dict[str, Any]) -> str | None:
    """Why a registry method cannot run this config (None when it can)."""
    from .worker import split_method

    method = split_method(config["method"])[0]
    if config["mode"] == "decode" or ":" in method or not config["causal"]:
        return None
    from ..ops.registry import get_attention

    if not get_attention(method).supports_causal:
        return f"{config['method']} has no causal mode"
    return None


def batch_sizes(args: argparse.Namespace) -> list[int]:
    """The batch sizes to run: ``--batch`` (several only with ``--decode``) or the default.

    Raises:
        ValueError: several batch sizes without ``--decode``.
    """
    batches = args.batch or (DEFAULT_DECODE_BATCHES if args.decode else [1])
    if len(batches) > 1 and not args.decode:
        raise ValueError("--batch takes several sizes only with --decode")
    return list(dict.fromkeys(batches))


def build_configs(args: argparse.Namespace, methods: list[str]) -> list[dict[str, Any]]:
    """One worker config per (N, batch, method, mode), ordered by N, then batch, method,
    mode. With several batch sizes each config has a ``label`` (``"lln B=8"``) that names
    its results."""
    batches = batch_sizes(args)
    common = {
        "heads": args.heads, "dim": args.dim, "dtype": args.dtype,
        "device": args.device, "causal": args.causal, "threads": args.threads,
        "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
        "long_seconds": args.long_seconds, "target_seconds": args.target_seconds,
        "min_repeats": args.min_repeats, "max_repeats": args.max_repeats,
        "decode_steps": args.decode_steps, "decode_warmup": args.decode_warmup,
    }
    modes = ["decode"] if args.decode else list(args.modes)
    return [
        {**common, "batch": batch, "method": method, "mode": mode, "n": n,
         **({"label": f"{method} B={batch}"} if len(batches) > 1 else {})}
        for n in sorted(set(args.lengths))
        for batch in batches
        for method in methods
        for mode in modes
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; returns the JSON document it wrote."""
    from . import report
    from .contend import contender
    from .runner import sweep, total_memory_bytes

    if args.max_repeats < args.min_repeats:
        raise ValueError("--max-repeats must be >= --min-repeats")
    if args.warmup < 0 or args.decode_warmup < 0:
        raise ValueError("--warmup and --decode-warmup must be >= 0")
    methods = resolve_methods(args.methods, decode=args.decode)
    marker = args.readme_marker or ("bench-decode" if args.decode else "bench")
    if args.readme is not None:
        report.check_marked_section(args.readme, marker=marker)  # fail before running
    if args.threads is None:
        args.threads = usable_cores()
    memory_limit = (
        int(args.memory_limit * 2**30) if args.memory_limit is not None
        else int(0.8 * (total_memory_bytes() or 0)) or None
    )
    kind = "decode" if args.decode else "bench"
    out_dir = args.out or Path("bench_results") / (
        f"{kind}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    )
    from ..cli_util import prepare_out

    # a non-empty or unwritable --out fails now, not after a run
    prepare_out(out_dir, overwrite=args.overwrite)
    configs = build_configs(args, methods)
    settings = {
        key: value for key, value in configs[0].items()
        if key not in ("method", "mode", "n", "label")
    }
    settings["batch"] = batch_sizes(args) if args.decode else configs[0]["batch"]
    settings.update(
        mode="decode" if args.decode else "sweep", methods=methods,
        lengths=sorted(set(args.lengths)), modes=sorted({c["mode"] for c in configs}),
        timeout_s=args.timeout, memory_limit_bytes=memory_limit, fit_min=args.fit_min,
        fit_max=args.fit_max, contend=bool(getattr(args, "contend", False)),
    )
    header = report.make_header(settings, command=getattr(args, "command_line", None)
                                or _command_line())
    fit_range = f"(N ≥ {args.fit_min}" + (f", ≤ {args.fit_max})" if args.fit_max else ")")
    document: dict[str, Any] = {"header": header, "results": [], "fits": {},
                                "fit_range": fit_range, "complete": False}
    json_path = out_dir / "results.json"

    def save(result: dict[str, Any] | None = None) -> None:
        if result is not None:
            document["results"].append(result)
        document["fits"] = report.scaling_fits(
            document["results"], n_min=args.fit_min, n_max=args.fit_max
        )
        json_path.write_text(json.dumps(document, indent=1) + "\n")

    if not args.quiet:
        print(report.machine_line(header, args.threads), flush=True)
        load = header.get("loadavg_start")
        if load is not None and load > 0.5:
            print(f"warning: 1-minute load average {load:.2f} before the start; other work on "
                  "this machine inflates the timings", flush=True)
    with contender(settings["contend"]) as core:
        if settings["contend"]:
            settings["contend_core"] = core
            if not args.quiet:
                print(f"contention: a CPU-bound process pinned to core {core}", flush=True)
        sweep(configs, timeout=args.timeout, memory_limit=memory_limit, skip=_unsupported,
              on_result=save, progress=not args.quiet)
    document["complete"] = True
    try:
        header["loadavg_end"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        header["loadavg_end"] = None
    save()
    markdown = (report.decode_markdown if args.decode else report.sweep_markdown)(document)
    (out_dir / "results.md").write_text(markdown + "\n")
    written = [json_path, out_dir / "results.md"]
    if not args.no_plots:
        written += report.write_plots(document, out_dir)
    if args.readme is not None:
        report.replace_marked_section(args.readme, markdown, marker=marker)
        written.append(args.readme)
    if not args.quiet:
        print()
        print(markdown)
        print("Wrote " + ", ".join(str(p) for p in written))
    return document
