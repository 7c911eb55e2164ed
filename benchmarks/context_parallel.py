"""Context parallelism on CPU: one causal LLN fwd+bwd over 1 vs P processes.

For every sequence length N and process count P, a fresh launch (P = 1: one plain Python
process running ``lln.lln_attention``; P > 1: ``torchrun --standalone --nproc-per-node P``
running ``lln.distributed.lln_attention`` over gloo) creates this rank's ``N / P`` tokens of
``q, k, v (B=1, H=12, N/P, D=64)`` float32 and a fixed output gradient, makes one untimed
priming call at 1024 tokens, then times one forward + backward. Per process it records the
wall time of forward and backward, the peak resident set of the whole process (``VmHWM``:
interpreter, torch, inputs, gradients and every temporary — what a memory limit sees), its
resident set before the inputs existed, and the bytes it received through the collectives
(forward; the backward exchange has the same volume).

Then, for a per-process memory budget (``--budget-mb``), the longest N that fits with 1 and
with P processes, from a least-squares line ``peak(N) = a + b N`` through the measured peaks
(memory is linear in N here; the fit is stated as such in the table).

Every process runs with one thread (``--threads``). On a shared machine times are noisy;
memory is not. Writes ``--out``/results.json and results.md (refuses to overwrite without
``--overwrite``)::

    python benchmarks/context_parallel.py --out benchmarks/results/context_parallel_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, H, D = 1, 12, 64


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(n: int, threads: int, out_dir: str, checkpoint: bool) -> None:
    """One rank (or the single process): prime, then time one causal fwd+bwd."""
    import torch
    import torch.distributed as dist

    import lln
    import lln.distributed as lln_dist

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    fn = lln_dist.lln_attention if world > 1 else lln.lln_attention

    def run(tokens: int, seed: int) -> tuple[float, float]:
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        q, k, v, grad = (
            torch.randn(B, H, tokens, D, generator=g).requires_grad_(i < 3) for i in range(4)
        )
        if world > 1:
            dist.barrier()
        tick = time.perf_counter()
        out = fn(q, k, v, is_causal=True, checkpoint=checkpoint)
        forward = time.perf_counter() - tick
        out.backward(grad)
        return forward, time.perf_counter() - tick - forward

    run(1024 // world, 0)  # priming: first-call costs (allocator, BLAS, gloo buffers)
    lln_dist.communication.reset()
    before = _status_kb("VmRSS") * 1024
    forward, backward = run(n // world, 1)
    record = {
        "rank": rank, "world_size": world, "n": n, "tokens": n // world,
        "forward_s": forward, "backward_s": backward, "fwd_bwd_s": forward + backward,
        "peak_rss_bytes": _status_kb("VmHWM") * 1024, "rss_before_inputs_bytes": before,
        "bytes_received_forward": lln_dist.communication.forward,
        "bytes_received_backward": lln_dist.communication.backward,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(n: int, world: int, threads: int, checkpoint: bool) -> list[dict]:
    """Run one configuration in fresh processes; the per-rank records."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(Path(__file__).resolve()), "--worker", str(n), "--threads", str(threads),
                "--worker-dir", tmp] + (["--checkpoint"] if checkpoint else [])
        if world == 1:
            command = [sys.executable, *args]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nnodes", "1", "--nproc-per-node", str(world), *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(
                f"N={n} P={world} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
            )
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def longest_fitting(points: list[tuple[int, int]], budget: int) -> tuple[int | None, float, float]:
    """``(N, a, b)``: the fit ``peak = a + b N`` and the longest N (a multiple of 1024) under
    ``budget`` bytes by it (None if even 1024 does not fit)."""
    ns = [p[0] for p in points]
    ys = [p[1] for p in points]
    mean_n, mean_y = sum(ns) / len(ns), sum(ys) / len(ys)
    b = sum((x - mean_n) * (y - mean_y) for x, y in zip(ns, ys, strict=True)) / sum(
        (x - mean_n) ** 2 for x in ns
    )
    a = mean_y - b * mean_n
    n = int((budget - a) / b) // 1024 * 1024
    return (n if n >= 1024 else None), a, b


def render(result: dict) -> str:
    """The Markdown table of a results.json."""
    processes = max(r["processes"] for r in result["rows"])
    largest = max(r["n"] for r in result["rows"])
    table = [
        f"Causal LLN fwd+bwd, B={result['batch']} H={result['heads']} D={result['dim']} "
        f"float32, {result['threads_per_process']} thread(s) per process, "
        f"checkpoint={result['checkpoint']}; {result['machine']}, torch {result['torch']}.",
        f"Command: `{result['command']}`",
        "",
        "| N | processes | fwd+bwd (s) | peak RSS / process (MiB) "
        "| bytes received / rank, forward | bytes received / rank, backward |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        table.append(f"| {r['n']} | {r['processes']} | {r['fwd_bwd_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['bytes_received_forward']} | "
                     f"{r['bytes_received_backward']} |")
    table += [
        "",
        f"Peak RSS per process at N={largest}: {processes} processes / 1 process = "
        f"{result['memory_ratio_at_largest_n']:.3f}.",
        "",
        f"Longest N within {result['budget_mb']:.0f} MiB per process (linear fit of the "
        "peaks above, a multiple of 1024):",
        "",
    ]
    for world, fit in result["fits"].items():
        table.append(f"- {world} process(es): N = {fit['longest_n']} "
                     f"(fit: {fit['intercept_mb']:.0f} MiB + {fit['bytes_per_token']:.0f} "
                     "B/token)")
    return "\n".join(table) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072, 262144])
    parser.add_argument("--processes", type=int, default=2, help="P to compare with 1")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--budget-mb", type=float, default=4096.0,
                        help="per-process memory budget for the longest-N estimate")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint=True in the op")
    parser.add_argument("--out", default=None, help="folder for results.json / results.md")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite --out/results.md from its results.json")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.threads, args.worker_dir, args.checkpoint)
        return
    if args.render:
        if args.out is None:
            parser.error("--render needs --out")
        result = json.loads(Path(args.out, "results.json").read_text())
        Path(args.out, "results.md").write_text(render(result))
        return
    if args.processes < 2:
        parser.error(f"--processes must be >= 2, got {args.processes}")
    bad = [n for n in args.lengths if n < 1024 or n % args.processes]
    if bad:
        parser.error(f"--lengths must be >= 1024 and divisible by --processes, got {bad}")
    out = Path(args.out) if args.out else None
    if out is not None and (out / "results.json").exists() and not args.overwrite:
        parser.error(f"{out / 'results.json'} exists; pass --overwrite to replace it")

    rows = []
    for n in args.lengths:
        for world in (1, args.processes):
            records = launch(n, world, args.threads, args.checkpoint)
            row = {
                "n": n, "processes": world,
                "fwd_bwd_s": max(r["fwd_bwd_s"] for r in records),
                "forward_s": max(r["forward_s"] for r in records),
                "peak_rss_mb": max(r["peak_rss_bytes"] for r in records) / 2**20,
                "rss_before_inputs_mb": max(r["rss_before_inputs_bytes"] for r in records) / 2**20,
                "bytes_received_forward": max(r["bytes_received_forward"] for r in records),
                "bytes_received_backward": max(r["bytes_received_backward"] for r in records),
                "ranks": records,
            }
            rows.append(row)
            print(f"N={n:>7} P={world}: fwd+bwd {row['fwd_bwd_s']:7.2f} s  peak RSS/process "
                  f"{row['peak_rss_mb']:8.0f} MiB  received {row['bytes_received_forward']} B",
                  flush=True)

    budget = int(args.budget_mb * 2**20)
    fits = {}
    for world in (1, args.processes):
        points = [(r["n"], r["peak_rss_mb"] * 2**20) for r in rows if r["processes"] == world]
        n_fit, a, b = longest_fitting(points, budget) if len(points) > 1 else (None, 0, 0)
        fits[world] = {"longest_n": n_fit, "intercept_mb": a / 2**20,
                       "bytes_per_token": b}
    largest = max(args.lengths)
    one = next(r for r in rows if r["n"] == largest and r["processes"] == 1)
    many = next(r for r in rows if r["n"] == largest and r["processes"] == args.processes)
    result = {
        "command": " ".join(["python", "benchmarks/context_parallel.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.system()}",
        "python": platform.python_version(), "batch": B, "heads": H, "dim": D,
        "threads_per_process": args.threads, "checkpoint": args.checkpoint,
        "budget_mb": args.budget_mb, "rows": rows, "fits": fits,
        "memory_ratio_at_largest_n": many["peak_rss_mb"] / one["peak_rss_mb"],
    }
    import torch

    result["torch"] = torch.__version__
    text = render(result)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
