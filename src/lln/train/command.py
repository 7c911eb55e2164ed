"""``lln train TASK --attn NAME``: train one model on one task (resumable; torchrun-ready).

Examples::

    lln train listops --attn lln_diag --seed 1
    lln train shakespeare --attn softmax --out runs/sh --resume      # continue a killed run
    lln train text --files notes/ --attn lln_diag                     # byte LM on your text
    lln train classify --data reviews.jsonl --attn lln                # your labelled docs
    torchrun --nproc_per_node 2 -m lln.cli train mqar --attn lln      # data-parallel (gloo)
    torchrun --nproc_per_node 2 -m lln.cli train shakespeare --attn lln --context-parallel 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

HELP = ("train a model with a chosen attention on a task (ListOps, BBC, Shakespeare, MQAR) "
        "or on your own data (text, classify)")

#: lln.data.tasks.TASK_NAMES + TASK_VARIANTS + OWN_DATA_TASKS, spelt out so that parsing
#: imports no torch.
TASKS = ("listops", "bbc", "shakespeare", "mqar", "mqar-64x4", "mqar-128x8", "mqar-256x16",
         "text", "classify")


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
    parser.add_argument("task", choices=TASKS,
                        help="built-in task, or 'text' (byte-level LM on --files) or "
                             "'classify' (documents of --data)")
    own = parser.add_argument_group("your own data (docs/tasks.md#your-own-data)")
    own.add_argument("--files", nargs="+", default=None, metavar="PATH",
                     help="text: plain-text files or folders (their *.txt files) to train on")
    own.add_argument("--val", nargs="+", default=None, metavar="PATH",
                     help="text: held-out files or folders, cut in halves into validation "
                          "and test (default: the last 10%% of --files)")
    own.add_argument("--data", default=None, metavar="PATH",
                     help="classify: a folder of <label>/<doc>.txt, or a .jsonl / .csv with "
                          "text and label fields (split 80/10/10 per label by --data-seed)")
    parser.add_argument("--task-option", action="append", type=parse_option, default=[],
                        metavar="KEY=VALUE",
                        help="task option, repeatable (e.g. window=128 for text/shakespeare, "
                             "max_len=512 for classify/bbc; docs/tasks.md lists them)")
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
                        help="continue the run in OUT from its checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an OUT that holds a run, replacing it "
                             "(without --resume or --overwrite such an OUT is refused)")
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


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """``get_task`` keyword options from ``--files/--val/--data/--task-option`` (paths made
    absolute, so that ``--resume`` works from another folder)."""
    given = {"--files": args.files, "--val": args.val, "--data": args.data}
    wanted = {"text": ("--files", "--val"), "classify": ("--data",)}.get(args.task, ())
    for flag, value in given.items():
        if value is not None and flag not in wanted:
            raise ValueError(f"{flag} applies to "
                             f"{'text' if flag != '--data' else 'classify'}, not to task "
                             f"{args.task!r}")
    options = dict(args.task_option)
    if args.task == "text":
        if not args.files:
            raise ValueError("--files: task 'text' needs plain-text files or folders to train "
                             "on (--files PATH...)")
        options["files"] = [os.path.abspath(p) for p in args.files]
        if args.val:
            options["val_files"] = [os.path.abspath(p) for p in args.val]
    elif args.task == "classify":
        if not args.data:
            raise ValueError("--data: task 'classify' needs a folder of <label>/<doc>.txt or a "
                             ".jsonl / .csv file with text and label fields (--data PATH)")
        options["data"] = os.path.abspath(args.data)
    return options


def check_args(args: argparse.Namespace) -> None:
    """Usage errors before any work: one line naming the option and the expected value."""
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "log_every", "dim",
                 "depth", "num_heads", "mlp_ratio", "redraw_every", "threads", "stop_after"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {value}")
    for name in ("warmup_steps", "short_conv"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("lr",):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--lr must be > 0, got {value}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.weight_decay < 0 or args.grad_clip <= 0:
        raise ValueError("--weight-decay must be >= 0 and --grad-clip > 0, got "
                         f"{args.weight_decay} and {args.grad_clip}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or "
                         "replace it")
    check_attention(args.attn, dict(args.attn_option))


def check_attention(attn: str, options: dict[str, Any]) -> None:
    """Build the attention with ``options`` and run it once on a tiny input, so that an
    unknown name or option fails now, in one line, rather than deep in the first step."""
    import torch

    from ..models.attention import SelfAttention

    shown = " ".join(f"{k}={v}" for k, v in options.items())
    try:
        layer = SelfAttention(16, 2, attention=attn, options=options)
        with torch.no_grad():
            layer(torch.randn(1, 8, 16))
    except TypeError as error:
        raise ValueError(f"--attn-option {shown}: not an option of attention {attn!r} "
                         f"({error})") from None
    except ValueError as error:
        flag = f"--attn-option {shown}" if options else "--attn"
        raise ValueError(f"{flag}: {error}") from None


def config_from_args(args: argparse.Namespace):
    from .config import TrainConfig

    out = args.out or f"runs/{args.task}/{args.attn}/seed{args.seed}"
    return TrainConfig(
        task=args.task, attn=args.attn, size=args.size, seed=args.seed,
        data_seed=args.data_seed, out=out, resume=args.resume, overwrite=args.overwrite,
        task_options=task_options(args), steps=args.steps,
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
    from .trainer import check_run_folder, train

    check_args(args)
    config = config_from_args(args)
    check_run_folder(config)  # refuse before building anything
    from ..cli_util import prepare_out

    prepare_out(config.out, overwrite=True)  # an unwritable --out fails now
    summary = train(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if summary.get("interrupted"):
        command = getattr(args, "_argv", None)
        resume = "lln " + shlex.join([a for a in command if a not in ("--overwrite", "--resume")]
                                     + ["--resume"]) if command else "lln train ... --resume"
        print(f"interrupted after step {summary['stopped_at']}; checkpoint saved to "
              f"{summary['checkpoint']}\nresume with: {resume}", file=sys.stderr)
        raise SystemExit(130)
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
