"""Side-by-side timing of one decoding step: the recurrent step path against the chunked
kernel it replaced (forced by lowering ``STEP_MAX_TOKENS``), and against softmax with a KV
cache, interleaved in one process so that machine load affects all alike.

    python benchmarks/decode_step_paths.py [--threads 1] [--batch 1] [--contexts 512 1024 ...]

Prints the median microseconds per step (B, H=12, D=64, float32, moment matching).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lln
import lln.ops.recurrent as recurrent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b, h, d = args.batch, 12, 64
    g = torch.Generator().manual_seed(0)
    print(f"B={b} H={h} D={d} float32, {torch.get_num_threads()} threads; median us per step")
    print("| T | lln step | lln chunked | lln_diag step | lln_diag chunked | softmax+KV |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t in args.contexts:
        cells = measure(t, b, h, d, g, args.steps, args.rounds)
        print(f"| {t} | " + " | ".join(f"{x * 1e6:.0f}" for x in cells) + " |", flush=True)


def measure(t: int, b: int, h: int, d: int, g: torch.Generator, steps: int,
            rounds: int) -> list[float]:
    """Median seconds per step of each case after a context of ``t`` tokens."""
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    tokens = [tuple(torch.randn(b, h, 1, d, generator=g) for _ in range(3))
              for _ in range(steps)]
    cache_k = torch.empty(b, h, t + 1, d)
    cache_v = torch.empty_like(cache_k)
    cache_k[:, :, :t], cache_v[:, :, :t] = k, v
    with torch.no_grad():
        states = {op: op(q, k, v, is_causal=True, output_final_state=True)[1]
                  for op in (lln.lln_attention, lln.lln_diag_attention)}

    def lln_case(op, threshold):
        def run(i):
            recurrent.STEP_MAX_TOKENS = threshold
            op(*tokens[i], is_causal=True, initial_state=states[op], output_final_state=True)
        return run

    def softmax(i):
        qt, kt, vt = tokens[i]
        cache_k[:, :, t:t + 1].copy_(kt)
        cache_v[:, :, t:t + 1].copy_(vt)
        F.scaled_dot_product_attention(qt, cache_k, cache_v)

    cases = [lln_case(lln.lln_attention, 16), lln_case(lln.lln_attention, 0),
             lln_case(lln.lln_diag_attention, 16), lln_case(lln.lln_diag_attention, 0),
             softmax]
    times: list[list[float]] = [[] for _ in cases]
    with torch.no_grad():
        for _ in range(rounds):  # interleaved rounds
            for case, sink in zip(cases, times, strict=True):
                for i in range(10):
                    case(i)
                for i in range(steps):
                    start = time.perf_counter()
                    case(i)
                    sink.append(time.perf_counter() - start)
    recurrent.STEP_MAX_TOKENS = 16
    return [statistics.median(x) for x in times]


if __name__ == "__main__":
    main()
