"""Cost of the exact gradient through LLN's moment-matching statistics.

By default ``lln_attention`` computes sigma_q, sigma_k without gradient (alpha, beta are
constants for autograd). The exact gradient is obtained by computing the per-head scales
with autograd and passing them as tensors; this script checks that those scales equal the
default ones, that ``gradcheck`` then passes (and fails with the defaults), and times one
non-causal forward+backward both ways (best of ``--repeats``, one thread).

    python benchmarks/stats_grad.py [--lengths 1024 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.autograd import gradcheck

import lln
from lln.ops.moment_matching import scales_from_variances


def scales_with_grad(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moment-matched alpha, beta per (batch, head) (``stats="head"``), differentiable."""
    var_q = q.var(dim=(-2, -1), unbiased=False, keepdim=True)
    var_k = k.var(dim=(-2, -1), unbiased=False, keepdim=True)
    return scales_from_variances(var_q, var_k)


def exact(q, k, v):
    alpha, beta = scales_with_grad(q, k)
    return lln.lln_attention(q, k, v, alpha=alpha, beta=beta)


def default(q, k, v):
    return lln.lln_attention(q, k, v)


def fwd_bwd_seconds(fn, q, k, v, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        start = time.perf_counter()
        fn(*leaves).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    small = [torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    checks = {"gradcheck_exact": bool(gradcheck(exact, small)),
              "gradcheck_default": bool(gradcheck(default, small, raise_exception=False))}
    rows = []
    for n in args.lengths:
        q, k, v = (torch.randn(1, args.heads, n, 64) for _ in range(3))
        same = all(torch.allclose(a, b, rtol=1e-5)
                   for a, b in zip(scales_with_grad(q, k), lln.moment_match(q, k), strict=True))
        t_default = fwd_bwd_seconds(default, q, k, v, args.repeats)
        t_exact = fwd_bwd_seconds(exact, q, k, v, args.repeats)
        rows.append({"n": n, "scales_equal": same, "default_ms": 1e3 * t_default,
                     "exact_ms": 1e3 * t_exact, "ratio": t_exact / t_default})
    print(f"gradcheck: exact statistics gradient {checks['gradcheck_exact']}, "
          f"default {checks['gradcheck_default']}")
    print("| N | default fwd+bwd (ms) | exact-gradient fwd+bwd (ms) | ratio |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['default_ms']:.1f} | {r['exact_ms']:.1f} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checks": checks, "rows": rows, "heads": args.heads, "threads": 1,
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
