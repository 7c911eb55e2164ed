"""Cost of moment matching, before vs after the fused statistics pass (issue 11), side by side.

"before" is ``src/lln/ops/moment_matching.py`` at commit ``95051c9`` (per-head ``torch.var``
for non-causal, float32 per-token sums for causal), loaded from git; "after" is the working
tree. Both run in the same process, interleaved, best of ``--repeats``; the full
``lln_attention`` forward is timed with each statistics implementation patched in.

    PYTHONPATH=src python benchmarks/stats_cost.py --out benchmarks/results/stats_cost

Writes ``stats_cost.json`` and ``stats_cost.md`` (``--out``; refuses to overwrite without
``--overwrite``) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lln
import lln.ops.lln as lln_module
import lln.ops.moment_matching as after

BEFORE_COMMIT = "95051c9"


def load_before() -> object:
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:src/lln/ops/moment_matching.py"], cwd=root,
        check=True, capture_output=True, text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "moment_matching_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lln.ops._moment_matching_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def best_of(fn, inputs: tuple, repeats: int) -> float:
    fn(*inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - t0)
    return min(times)


def _stats_call(impl, q, k, v, causal, kw) -> None:
    impl(q, k, is_causal=causal, **kw)


def _forward_call(impl, q, k, v, causal, kw) -> None:
    saved = lln_module.moment_match_with_moments
    lln_module.moment_match_with_moments = impl
    try:
        lln.lln_attention(q, k, v, is_causal=causal)
    finally:
        lln_module.moment_match_with_moments = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.out is not None and (args.out / "stats_cost.json").exists() and not args.overwrite:
        parser.exit(2, f"stats_cost: error: {args.out}/stats_cost.json exists (--overwrite)\n")
    torch.set_num_threads(args.threads)
    before = load_before()
    impls = {"before": before.moment_match_with_moments, "after": after.moment_match_with_moments}
    kw = dict(stats="head", key_padding_mask=None, temperature=1.0)
    rows = []
    for n in args.lengths:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=gen) for _ in range(3))
        for causal in (False, True):
            row = {"N": n, "causal": causal}
            for part in ("stats", "forward"):
                best = {"before": float("inf"), "after": float("inf")}
                for _ in range(2):  # interleave the two implementations
                    for name, impl in impls.items():
                        call = _stats_call if part == "stats" else _forward_call
                        inputs = (impl, q, k, v, causal, kw)
                        best[name] = min(best[name], best_of(call, inputs, args.repeats))
                row[f"{part}_before_ms"] = 1e3 * best["before"]
                row[f"{part}_after_ms"] = 1e3 * best["after"]
                row[f"{part}_speedup"] = best["before"] / best["after"]
            rows.append(row)
            print(f"N={n:6d} {'causal    ' if causal else 'non-causal'} "
                  f"stats {row['stats_before_ms']:7.1f} -> {row['stats_after_ms']:7.1f} ms "
                  f"({row['stats_speedup']:.2f}x)  forward {row['forward_before_ms']:7.1f} -> "
                  f"{row['forward_after_ms']:7.1f} ms ({row['forward_speedup']:.2f}x)", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "B": 1, "H": args.heads, "D": args.dim,
            "dtype": "float32", "before_commit": BEFORE_COMMIT,
            "command": "python benchmarks/stats_cost.py " + " ".join(argv or sys.argv[1:])}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stats_cost.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                             indent=1))
        lines = ["| N | causal | stats before (ms) | stats after (ms) | forward before (ms) "
                 "| forward after (ms) | forward speed-up |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['causal']} | {r['stats_before_ms']:.1f} | "
                  f"{r['stats_after_ms']:.1f} | {r['forward_before_ms']:.1f} | "
                  f"{r['forward_after_ms']:.1f} | {r['forward_speedup']:.2f}x |" for r in rows]
        (args.out / "stats_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
