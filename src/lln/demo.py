"""``lln demo``: LLN+Diag against softmax attention (SDPA) on random data.

Prints three things a new user wants to see first:

1. correctness — the fast LLN+Diag kernel against its float64 quadratic oracle;
2. agreement with softmax — how close LLN and LLN+Diag outputs are to SDPA's on the same
   inputs (cosine similarity; they are different attentions, so not 1);
3. cost — forward+backward time and the memory autograd keeps for backward, causal,
   LLN+Diag vs SDPA, at growing sequence lengths.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import lln_attention, lln_diag_attention, lln_diag_attention_matrix


def saved_for_backward_bytes(fn, *inputs: Tensor) -> tuple[float, int]:
    """Run ``fn(*inputs)`` forward+backward; return (seconds, bytes autograd saved).

    Saved bytes are counted once per storage via ``torch.autograd.graph.saved_tensors_hooks``:
    the activation memory that training at this length needs, independent of the allocator.
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    leaves = [t.detach().requires_grad_(True) for t in inputs]
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start, sum(storages.values())


def _cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.flatten(2), b.flatten(2), dim=-1).mean().item()


#: 1-minute load average above which the demo warns that other work skews its timings
#: (the threshold ``lln bench`` uses).
BUSY_LOAD = 0.5


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes, averaged), None where unavailable;
    ``lln bench`` records the same number in its header."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_demo(
    lengths: tuple[int, ...] = (1024, 4096, 8192), heads: int = 12, dim: int = 64, seed: int = 0
) -> None:
    torch.manual_seed(seed)
    print(f"lln demo: B=1, H={heads}, D={dim}, float32, {torch.get_num_threads()} threads\n")
    load = machine_load()
    if load is not None and load > BUSY_LOAD:
        print(f"warning: the machine is busy (1-minute load average {load:.2f} before the "
              "start, measured as `lln bench` does): other work slows the two attentions "
              "unevenly (LLN's chunked kernel suffers more under contention than SDPA), so the "
              "times below can mislead. Rerun on a quiet machine"
              + (", or with --threads 1" if torch.get_num_threads() > 1 else "") + ".\n",
              flush=True)

    q, k, v = (torch.randn(1, heads, 500, dim, dtype=torch.float64) for _ in range(3))
    oracle = lln_diag_attention_matrix(q, k, is_causal=True) @ v
    fast = lln_diag_attention(q.float(), k.float(), v.float(), is_causal=True)
    err = ((fast.double() - oracle).abs().max() / oracle.abs().max()).item()
    print(f"1. correctness  causal LLN+Diag (fp32) vs float64 oracle, N=500: "
          f"max rel err {err:.1e}")

    q, k, v = (torch.randn(1, heads, 1024, dim) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    print("2. agreement with softmax (cosine similarity of outputs, causal, N=1024;")
    print("   different attentions on random inputs, so not 1):")
    print(f"   LLN      {_cosine(lln_attention(q, k, v, is_causal=True), sdpa):.3f}")
    print(f"   LLN+Diag {_cosine(lln_diag_attention(q, k, v, is_causal=True), sdpa):.3f}\n")

    print("3. cost, causal, forward+backward (best of 3; benchmarks/ has the full table):")
    print(f"   {'N':>6} {'LLN+Diag':>10} {'SDPA':>10} {'speed-up':>9}   "
          f"{'saved LLN+Diag':>15} {'saved SDPA':>11}")
    for n in lengths:
        q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
        runs_lln = [saved_for_backward_bytes(
            lambda q, k, v: lln_diag_attention(q, k, v, is_causal=True), q, k, v
        ) for _ in range(3)]
        runs_sdpa = [saved_for_backward_bytes(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v
        ) for _ in range(3)]
        (t_lln, m_lln), (t_sdpa, m_sdpa) = min(runs_lln), min(runs_sdpa)
        print(f"   {n:>6} {t_lln:>9.3f}s {t_sdpa:>9.3f}s {t_sdpa / t_lln:>8.1f}x   "
              f"{m_lln / 2**20:>12.0f} MiB {m_sdpa / 2**20:>7.0f} MiB")
    print("\n   What the numbers mean: time = one forward+backward of one attention call "
          f"(B=1, {heads} heads), best of 3,\n   with {torch.get_num_threads()} thread(s); "
          "speed-up = SDPA time / LLN+Diag time (> 1: LLN+Diag is faster).\n"
          "   saved = memory autograd keeps for backward (the activations training needs at "
          "this length),\n   not the process's peak memory. LLN+Diag's time and memory grow "
          "linearly in N, SDPA's time\n   quadratically, so the speed-up grows with N. "
          "Timings depend on the machine and its load;\n   `lln bench` measures properly "
          "(repeats, peak memory, load recorded).")
    end = machine_load()
    if load is not None and end is not None and max(load, end) > BUSY_LOAD:
        print(f"   Load average {load:.2f} at the start, {end:.2f} at the end: other work "
              "inflated these timings.")


HELP = "LLN+Diag vs softmax attention on random data: agreement, time, memory"


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192],
                        help="sequence lengths to time (default: 1024 4096 8192)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: PyTorch's, usually one per core; "
                             "on a busy machine 1 gives steadier numbers)")


def check_args(args) -> None:
    """Usage errors before any work: one line naming the option and the expected value."""
    bad = [n for n in args.lengths if n < 1]
    if bad:
        raise ValueError(f"--lengths must be positive integers, got {bad}")
    for name in ("heads", "dim", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {args.seed}")


def run(args) -> None:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(tuple(args.lengths), heads=args.heads, dim=args.dim, seed=args.seed)
