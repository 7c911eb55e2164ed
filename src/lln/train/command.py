"""``lln train TASK --attn NAME``: train one model on one task (resumable; torchrun-ready).

Examples::

    lln train listops --attn lln_diag --seed 1
    lln train shakespeare --attn softmax --out runs/sh --resume      # continue a killed run
    torchrun --nproc_per_node 2 -m lln.cli train mqar --attn lln      # data-parallel (gloo)
    torchrun --nproc_per_node 2 -m lln.cli train shakespeare --attn lln --context-parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

HELP = "train a model with a chosen attention on one task (ListOps, BBC, Shakespeare, MQAR)"

#: lln.data.tasks.TASK_NAMES + TASK_VARIANTS, spelt out so that parsing imports no torch.
TASKS = ("listops", "bbc", "shakespeare", "mqar", "mqar-64x4", "mqar-128x8", "mqar-256x16")


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; VALUE is read as JSON when it parses (numbers,
    true/false, null), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--attn", required=True,
                        help="attention name from the registry (softmax, lln, lln_diag, elu, "
                             "performer, cosformer, nystrom, ...)")
    parser.add_argument("--size", default="small", choices=("tiny", "small"),
                        help="data, model and recipe size (default: small)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="data generation/split seed (default 0; keep fixed across seeds)")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/TASK/ATTN/seedSEED)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt if it exists")
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float),
                       ("warmup-steps", int), ("eval-every", int), ("checkpoint-every", int),
                       ("log-every", int), ("short-conv", int),
                       ("dim", int), ("depth", int), ("num-heads", int), ("mlp-ratio", int)):
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help="override the recipe (see lln.train.config.RECIPES)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--redraw-every", type=int, default=100,
                        help="random-feature attentions: redraw the projection every N steps")
    parser.add_argument("--attn-option", action="append", type=parse_option, default=[],
                        metavar="KEY=VALUE",
                        help="option for the attention op or module, repeatable "
                             "(e.g. combine=scale, block_size=32, num_landmarks=32)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--context-parallel", type=_positive_int, default=1, metavar="P",
                        help="split every sequence over P processes (under torchrun; causal "
                             "tasks, lln / lln_diag; world size = data x P; default 1)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this step as if killed (for testing --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-keep-checkpoint", action="store_true",
                        help="delete checkpoint.pt once the run is complete")


def config_from_args(args: argparse.Namespace):
    from .config import TrainConfig

    out = args.out or f"runs/{args.task}/{args.attn}/seed{args.seed}"
    return TrainConfig(
        task=args.task, attn=args.attn, size=args.size, seed=args.seed,
        data_seed=args.data_seed, out=out, resume=args.resume, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, short_conv=args.short_conv, dim=args.dim,
        depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
        dropout=args.dropout, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        redraw_every=args.redraw_every, attn_options=dict(args.attn_option),
        threads=args.threads, stop_after=args.stop_after, progress=not args.no_progress,
        keep_checkpoint=not args.no_keep_checkpoint, context_parallel=args.context_parallel,
    )


def run(args: argparse.Namespace) -> None:
    from .trainer import train

    config = config_from_args(args)
    summary = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} (resume with --resume)")
        return
    metric = summary["metric"]
    print(
        f"{config.task} / {config.attn} / seed {config.seed}: test {metric} "
        f"{summary['test'][metric]:.4f} (chance {summary['chance']:.4f}), "
        f"{summary['parameters']['total']:,} parameters, "
        f"{1000 * summary['step_time_s']:.1f} ms/step, peak RSS {summary['peak_rss_mb']:.0f} MiB"
        f" -> {config.out}"
    )
