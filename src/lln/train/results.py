"""``lln results``: run (or collect) the grid attention x task x seed and tabulate it.

Every run lives in ``OUT/runs/TASK/ATTN/seedS`` and is executed by ``lln train ... --resume``
in a fresh subprocess (so its peak memory is its own). A run whose ``summary.json`` exists
is complete and never re-run; an interrupted one resumes from its checkpoint. So the grid
can be stopped and continued across sessions, and ``--collect-only`` just re-tabulates.

Outputs in ``OUT``, named by ``--name NAME`` (default ``results``): ``NAME.md`` (mean ±
std over seeds of the test metric, median step time and peak RSS per attention x task),
``NAME.json`` (every summary) and ``NAME-curves.png`` (validation metric vs step, mean over
seeds). ``--doc PATH`` also replaces the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` in PATH. Several grids can share ``OUT`` (and its runs) and one page
under different names, e.g. the MQAR points ``--tasks mqar-64x4 mqar mqar-256x16 --name
mqar-points`` reuse the ``mqar`` runs of the main grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .machine import machine

HELP = "run or collect the training grid (attention x task x seed) into tables and curves"

DEFAULT_ATTNS = ("softmax", "lln", "lln_diag", "elu", "performer", "cosformer", "nystrom")
DEFAULT_TASKS = ("listops", "bbc", "shakespeare", "mqar")
#: Tasks trained with a causal decoder (attentions without causal support are "n/a").
CAUSAL_TASKS = ("shakespeare", "mqar")
#: Metrics where lower is better.
LOWER_IS_BETTER = ("bits_per_byte",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attns", nargs="+", default=list(DEFAULT_ATTNS))
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--out", default="results/train")
    parser.add_argument("--collect-only", action="store_true",
                        help="do not train: tabulate the runs already in OUT")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel (each a subprocess)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: cores // jobs)")
    parser.add_argument("--doc", default=None,
                        help="also write the tables between <!-- NAME:start --> and "
                             "<!-- NAME:end --> in this file")
    parser.add_argument("--name", default="results",
                        help="names the outputs (NAME.md, NAME.json, NAME-curves.png) and the "
                             "--doc markers (default: results)")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="extra argument passed to every `lln train` (repeatable, e.g. "
                             "--train-arg=--steps=20)")


def run_dir(out: Path, task: str, attn: str, seed: int) -> Path:
    return out / "runs" / task / attn / f"seed{seed}"


def applicable(attn: str, task: str) -> bool:
    """False where the attention cannot run the task (no causal support on a causal task)."""
    from ..data.tasks import base_task
    from ..ops.registry import get_attention

    return base_task(task) not in CAUSAL_TASKS or get_attention(attn).supports_causal


def train_command(task: str, attn: str, seed: int, args: argparse.Namespace, folder: Path):
    command = [
        sys.executable, "-m", "lln.cli", "train", task, "--attn", attn, "--seed", str(seed),
        "--size", args.size, "--out", str(folder), "--resume", "--no-progress",
        "--no-keep-checkpoint", *args.train_arg,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def run_grid(args: argparse.Namespace, out: Path) -> list[str]:
    """Run every missing run of the grid; returns the failures (their logs hold details)."""
    from tqdm.auto import tqdm

    todo = [
        (task, attn, seed)
        for task in args.tasks for attn in args.attns for seed in args.seeds
        if applicable(attn, task)
        and not (run_dir(out, task, attn, seed) / "summary.json").exists()
    ]
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    failures: list[str] = []
    bar = tqdm(total=len(todo), desc="grid", dynamic_ncols=True)

    def one(job: tuple[str, str, int]) -> None:
        task, attn, seed = job
        folder = run_dir(out, task, attn, seed)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "train.log", "a") as log:
            code = subprocess.call(train_command(task, attn, seed, args, folder),
                                   stdout=log, stderr=subprocess.STDOUT)
        if code:
            failures.append(f"{task}/{attn}/seed{seed} (exit {code}; see {folder}/train.log)")
        bar.update(1)
        bar.set_postfix_str(f"{task}/{attn}/seed{seed}")

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    bar.close()
    return failures


def collect(out: Path, attns, tasks, seeds) -> dict[str, Any]:
    """``{(task, attn): [summary, ...]}`` of the complete runs, plus their metrics logs."""
    from .metrics import read_metrics

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for task in tasks:
        for attn in attns:
            for seed in seeds:
                folder = run_dir(out, task, attn, seed)
                if (folder / "summary.json").exists():
                    summary = json.loads((folder / "summary.json").read_text())
                    summary["curve"] = [r for r in read_metrics(folder / "metrics.jsonl")
                                        if r["split"] == "val"]
                    runs.setdefault((task, attn), []).append(summary)
    return runs


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _test_metric(summaries: list[dict[str, Any]]) -> str:
    metric = summaries[0]["metric"]
    return _mean_std([s["test"][metric] for s in summaries], 2 if metric in LOWER_IS_BETTER else 3)


def _step_ms(summaries: list[dict[str, Any]]) -> str:
    """Fastest seed: on a shared machine contention only ever slows a run down."""
    return f"{1000 * min(s['step_time_s'] for s in summaries):.0f}"


def _peak_mib(summaries: list[dict[str, Any]]) -> str:
    return f"{max(s['peak_rss_mb'] for s in summaries):.0f}"


def _params(summaries: list[dict[str, Any]]) -> str:
    counts = summaries[0]["parameters"]
    return f"{counts['total']:,} ({counts['attention_extra']})"


def tables(runs, attns, tasks, seeds) -> str:
    """The markdown tables: test metric (with chance and trivial baselines), step time, peak
    RSS and parameter counts, one row per attention and one column per task."""
    first = {t: next((ss[0] for (task, _), ss in runs.items() if task == t), None)
             for t in tasks}

    def cell(task: str, attn: str, fmt) -> str:
        if not applicable(attn, task):
            return "n/a"
        done = runs.get((task, attn), [])
        if not done:
            return "—"
        text = fmt(done)
        return text if len(done) == len(seeds) else f"{text} ({len(done)}/{len(seeds)} seeds)"

    def table(title: str, fmt) -> list[str]:
        lines = [title, "", "| attention | " + " | ".join(tasks) + " |",
                 "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(cell(t, a, fmt) for t in tasks) + " |" for a in attns]
        return lines

    metrics = []
    for task in tasks:
        metric = first[task]["metric"] if first[task] else "?"
        metrics.append(f"{task}: {metric} {'↓' if metric in LOWER_IS_BETTER else '↑'}")
    lines = table("**Test metric** (mean ± std over seeds; " + "; ".join(metrics) + ")",
                  _test_metric)
    references: dict[str, dict[str, float]] = {}
    for task, summary in first.items():
        if summary:
            references.setdefault("chance", {})[task] = summary["chance"]
            for name, value in summary.get("baselines", {}).items():
                references.setdefault(name.replace("_", " "), {})[task] = value
    for name, values in references.items():
        row = [f"{values[t]:.3f}" if t in values else "" for t in tasks]
        lines.append(f"| *{name}* | " + " | ".join(row) + " |")
    lines += [""] + table("**Training time per step** (ms; median over the logged windows of "
                          "steps, min over seeds: other load only slows a run)", _step_ms)
    lines += [""] + table("**Peak memory** (MiB; RSS of the training process, max over seeds)",
                          _peak_mib)
    lines += [""] + table("**Parameters** (total; in parentheses those owned by the attention "
                          "method)", _params)
    return "\n".join(lines) + "\n"


def plot_curves(runs, attns, tasks, path: Path) -> bool:
    """Validation metric vs step per task (mean over seeds); False if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install lln[plot]): no {path.name}")
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for attn in attns:
            summaries = runs.get((task, attn), [])
            if not summaries:
                continue
            metric = summaries[0]["metric"]
            by_step: dict[int, list[float]] = {}
            for s in summaries:
                for record in s["curve"]:
                    by_step.setdefault(record["step"], []).append(record[metric])
            steps = sorted(by_step)
            ax.plot(steps, [statistics.mean(by_step[x]) for x in steps], marker=".", label=attn)
            ax.set_ylabel(f"val {metric}")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replace_between_markers(path: Path, text: str, name: str = "results",
                            check_only: bool = False) -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in
    ``path`` with ``text`` (``check_only``: only check that the markers are there)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if not path.is_file():
        raise ValueError(f"--doc {path} does not exist; expected a file holding {start} ... "
                         f"{end}")
    content = path.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{path} must contain the markers {start} and {end}")
    if check_only:
        return
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}{end}{tail}")


def check_args(args: argparse.Namespace) -> None:
    """Usage errors before any run starts (one line naming the option)."""
    from ..data.tasks import TASK_NAMES, TASK_VARIANTS
    from ..ops.registry import attention_names

    valid = (*TASK_NAMES, *TASK_VARIANTS)
    unknown = [t for t in args.tasks if t not in valid]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; valid tasks: {list(valid)}")
    unknown = [a for a in args.attns if a not in attention_names()]
    if unknown:
        raise ValueError(f"--attns: unknown attention(s) {unknown}; valid: "
                         f"{attention_names()}")
    if any(seed < 0 for seed in args.seeds):
        raise ValueError(f"--seeds must be non-negative integers, got {args.seeds}")
    for name in ("jobs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    out = Path(args.out)
    if args.collect_only and not (out / "runs").is_dir():
        raise ValueError(f"--collect-only: --out {out} holds no runs (expected "
                         f"{out}/runs/TASK/ATTN/seedS/summary.json); give the folder of a grid")
    if args.doc:
        replace_between_markers(Path(args.doc), "", args.name, check_only=True)


def machine_line(runs: dict, previous: Path, collect_only: bool) -> str:
    """The machine(s) the runs recorded in their summary.json. Runs from before that record
    fall back to the "Machine:" line of the previous table (collecting) or this machine."""
    recorded = sorted({s["machine"] for ss in runs.values() for s in ss if s.get("machine")})
    unrecorded = any(not s.get("machine") for ss in runs.values() for s in ss)
    if unrecorded:
        old = ""
        if previous.is_file():
            old = next((line[len("Machine: "):].strip() for line in
                        previous.read_text().splitlines() if line.startswith("Machine: ")), "")
        fallback = old or (machine() if not collect_only else "not recorded by the runs")
        recorded = [*recorded, fallback] if fallback not in recorded else recorded
    return "; ".join(recorded) or machine()


def run(args: argparse.Namespace) -> None:
    from ..cli_util import prepare_out

    check_args(args)
    out = prepare_out(args.out, overwrite=True)  # a grid folder is meant to be continued
    started = time.perf_counter()
    failures = [] if args.collect_only else run_grid(args, out)
    runs = collect(out, args.attns, args.tasks, args.seeds)
    if args.collect_only and not runs:
        raise ValueError(f"--collect-only: no complete run of --tasks {args.tasks} x --attns "
                         f"{args.attns} x --seeds {args.seeds} in {out}/runs")
    text = tables(runs, args.attns, args.tasks, args.seeds)
    command = "lln results " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "lln results"
    text += (f"\nRegenerate: `{command}`  \n"
             f"Machine: {machine_line(runs, out / f'{args.name}.md', args.collect_only)}")
    if not args.collect_only:
        text += f"; {args.jobs} run(s) in parallel, {args.threads} thread(s) each"
    text += "\n"
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(json.dumps(
        [s for ss in runs.values() for s in ss], indent=1) + "\n")
    plot_curves(runs, args.attns, args.tasks, out / f"{args.name}-curves.png")
    if args.doc:
        replace_between_markers(Path(args.doc), text, args.name)
    print(text)
    print(f"wrote {out / (args.name + '.md')} ({time.perf_counter() - started:.0f} s)")
    if failures:
        print("FAILED runs:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
