"""torch.compile against eager for the two inference paths of causal LLN / LLN+Diag:
the prefill (one causal forward over N tokens, no grad) and one decoding step after it.

    python benchmarks/compile_speed.py [--threads 2] [--n 16384] [--ops lln lln_diag]

Compiled and eager calls alternate in one process (machine load affects both alike).
Prints the compile time (first calls) and the median time per call of each.
B=1, H=12, D=64, float32, moment matching (the library defaults).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

import lln


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--ops", nargs="+", default=["lln", "lln_diag"])
    parser.add_argument("--prefill-repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = {"lln": lln.lln_attention, "lln_diag": lln.lln_diag_attention}
    g = torch.Generator().manual_seed(0)
    b, h, d = 1, 12, 64
    q, k, v = (torch.randn(b, h, args.n, d, generator=g) for _ in range(3))
    tokens = [tuple(torch.randn(b, h, 1, d, generator=g) for _ in range(3))
              for _ in range(args.steps)]
    print(f"B={b} H={h} D={d} float32, N={args.n}, {torch.get_num_threads()} threads")
    print("| op | path | compile (s) | eager | compiled | eager / compiled |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.ops:
        op = ops[name]
        compiled = torch.compile(op, fullgraph=True)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(q, k, v, is_causal=True, output_final_state=True)
            compile_prefill = time.perf_counter() - start
            eager_t, comp_t = [], []
            for _ in range(args.prefill_repeats):
                eager_t += timed(partial(op, q, k, v, is_causal=True), 1)
                comp_t += timed(partial(compiled, q, k, v, is_causal=True), 1)
            e, c = statistics.median(eager_t), statistics.median(comp_t)
            print(f"| {name} | prefill N={args.n} | {compile_prefill:.0f} | {e * 1e3:.1f} ms | "
                  f"{c * 1e3:.1f} ms | {e / c:.2f}× |", flush=True)

            _, state = op(q, k, v, is_causal=True, output_final_state=True)
            step = torch.compile(op, fullgraph=True)
            states = {"eager": state, "compiled": state}
            start = time.perf_counter()
            for i in range(70):  # static graph, the dynamic one, a diagonal-block wrap
                _, states["compiled"] = step(*tokens[i], is_causal=True,
                                             initial_state=states["compiled"],
                                             output_final_state=True)
            compile_step = time.perf_counter() - start
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for i in range(70, args.steps):
                for label, fn in (("eager", op), ("compiled", step)):
                    start = time.perf_counter()
                    _, states[label] = fn(*tokens[i], is_causal=True,
                                          initial_state=states[label], output_final_state=True)
                    times[label].append(time.perf_counter() - start)
            e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
            print(f"| {name} | decode step | {compile_step:.0f} | {e * 1e6:.0f} µs | "
                  f"{c * 1e6:.0f} µs | {e / c:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
