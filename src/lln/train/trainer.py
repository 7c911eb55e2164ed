"""The training loop, readable top to bottom: :func:`train` runs one :class:`TrainConfig`.

What it does, in order:

1. join the data-parallel group if launched by ``torchrun`` (else: one process);
2. build the task (fixed ``data_seed``), seed everything with ``seed``, build the model;
3. AdamW (weight decay on the linear layers' weights only) with linear warm-up and cosine
   decay to ``min_lr_ratio`` of the peak (a ``LambdaLR``);
4. resume from ``out/checkpoint.pt`` if asked: model, optimizer, scheduler, step, data
   order and random states, so the continued run equals an uninterrupted one exactly;
5. loop: next global batch -> this rank's shard -> summed loss / global count -> backward
   (DistributedDataParallel sums the gradients over the ranks) -> clip -> step; log every
   step, evaluate on the validation set every ``eval_every`` steps, checkpoint atomically
   every ``checkpoint_every`` steps;
6. evaluate the final model on the test set and write ``summary.json``.

Files in ``out``: ``config.json``, ``metrics.jsonl`` (one JSON record per line:
``{"step", "split": "train", "loss", "lr", "grad_norm", "step_time_s", "elapsed_s"}`` every
``log_every`` steps (loss and step time averaged over those steps; lr and gradient norm
of the last one) and
``{"step", "split": "val", "loss", <metric>, "eval_time_s", "rss_mb"}``), ``checkpoint.pt``,
``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..data.tasks import TaskData, collate, get_task
from ..models import DecoderLM, EncoderClassifier, parameter_counts
from . import distributed
from .checkpoint import (
    CHECKPOINT_KEYS,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import TrainConfig
from .machine import machine
from .metrics import MetricsLog, loss_terms, metric_value, read_metrics
from .sampler import BatchOrder

#: Config fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("resume", "overwrite", "stop_after", "threads", "progress", "out",
                     "keep_checkpoint")
#: Files of a run in its folder: a folder holding any of them holds a run.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")


class RunExistsError(ValueError):
    """``out`` already holds a run and neither ``resume`` nor ``overwrite`` was asked for."""


def build_model(task: TaskData, config: TrainConfig) -> nn.Module:
    """An :class:`EncoderClassifier` for classification tasks, a :class:`DecoderLM` else."""
    trunk_kw = dict(
        dim=config.dim, depth=config.depth, num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio, dropout=config.dropout, short_conv=config.short_conv,
        attention=config.attn,
        options=config.attn_options, redraw_every=config.redraw_every, seed=config.seed,
    )
    if task.kind == "classify":
        return EncoderClassifier(task.vocab_size, task.max_len, task.num_classes, **trunk_kw)
    return DecoderLM(task.vocab_size, task.max_len, task.num_classes, **trunk_kw)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on ``nn.Linear`` weights only (not on embeddings, norms, biases)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_batch(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(loss_sum, count, correct)`` of one collated batch."""
    logits = model(batch["input_ids"], batch["key_padding_mask"])
    return loss_terms(logits, batch["target"])


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset, task: TaskData, batch_size: int, ctx: distributed.Context
) -> dict[str, float]:
    """``{"loss", <metric>}`` over the whole ``dataset``; each data-parallel replica scores
    every ``data_size``-th example (context-parallel ranks: their slices of it) and the sums
    are all-reduced."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, count, correct
    mine = list(range(ctx.data_rank, len(dataset), ctx.data_size))
    for start in range(0, len(mine), batch_size):
        batch = collate([dataset[i] for i in mine[start : start + batch_size]], task.pad_id)
        batch = distributed.split_sequence(batch, ctx)
        loss_sum, count, correct = run_batch(model, batch)
        totals += torch.stack([loss_sum.double(), count, correct])
    loss_sum, count, correct = distributed.all_reduce_sum(totals, ctx).tolist()
    model.train(was_training)
    return {"loss": loss_sum / count, task.metric: metric_value(task.metric, loss_sum, count,
                                                                 correct)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 2**10


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.to_dict()
    defaults = TrainConfig(task=config.task, attn=config.attn).to_dict()  # older checkpoints
    changed = sorted(
        k for k in current
        if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != current[k]
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"cannot resume: the configuration changed ({details})")


def check_run_folder(config: TrainConfig) -> str:
    """What :func:`train` will do with ``config.out``: ``"new"`` (no run there),
    ``"resume"`` (a checkpoint to continue) or ``"overwrite"``.

    Raises:
        RunExistsError: the folder holds a run (any of :data:`RUN_FILES`) and the config asks
            neither to resume it nor to overwrite it, or asks to resume a complete run whose
            checkpoint is gone. The message names ``--resume`` and ``--overwrite``.
    """
    out = Path(config.out)
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return "new"
    if config.overwrite:
        return "overwrite"
    if config.resume and (out / "checkpoint.pt").exists():
        return "resume"
    if config.resume and "summary.json" not in present:
        return "new"  # killed before its first checkpoint: nothing to resume, nothing final
    what = ("a complete run (summary.json) and no checkpoint.pt to resume"
            if config.resume else "a run (" + ", ".join(present) + ")")
    raise RunExistsError(
        f"--out {out} already holds {what}: pass --resume to continue it or --overwrite to "
        "start again and replace it (or choose another --out)"
    )


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns the summary (also in ``summary.json``).

    With ``config.stop_after`` set the run stops after that step as if killed and returns
    ``{"stopped_at": step}``.
    """
    config = config.resolved()
    mode = check_run_folder(config)
    ctx = distributed.setup(config.context_parallel)
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"

    # --- data, model, optimisation --------------------------------------------------------
    task = get_task(config.task, size=config.size, seed=config.data_seed, **config.task_options)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if mode == "overwrite":
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    distributed.barrier(ctx)
    if task.causal and not _registry_spec(config.attn).supports_causal:
        raise ValueError(f"attention {config.attn!r} cannot be trained on the causal task "
                         f"{config.task!r}")
    seed_everything(config.seed)
    model = build_model(task, config)
    if ctx.context_parallel > 1 and not task.causal:
        raise ValueError(f"context parallelism needs a causal task, {config.task!r} is not")
    distributed.context_parallel(model, ctx)
    optimizer = make_optimizer(model, config)
    scheduler = LambdaLR(optimizer, partial(
        lr_factor, warmup=config.warmup_steps, total=config.steps, floor=config.min_lr_ratio))
    order = BatchOrder(len(task.train), config.batch_size, seed=config.seed)
    counts = parameter_counts(model)

    # --- resume ---------------------------------------------------------------------------
    start_step, resumed, state = 0, False, {}
    if mode == "resume":
        state = load_checkpoint(checkpoint_path, required=CHECKPOINT_KEYS)
        _check_resumable(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order.load_state_dict(state["order"])
        set_rng_state(state["rng"])
        start_step, resumed = state["step"], True
    log = MetricsLog(out / "metrics.jsonl", resume_step=start_step if resumed else None,
                     enabled=ctx.is_main)
    if ctx.is_main:
        _write_json(out / "config.json", {**config.to_dict(), "parameters": counts,
                                          "world_size": ctx.world_size})

    # --- the loop -------------------------------------------------------------------------
    model.train()
    trained = distributed.wrap(model, ctx)  # DDP under torchrun (gradients summed)
    started = time.perf_counter()
    window_losses = list(state["window_losses"]) if resumed else []  # since the last record
    window_times: list[float] = []
    step_times: list[float] = []
    val = None
    progress = _progress_bar(config, ctx, start_step)

    def save(step: int) -> None:
        if ctx.is_main:
            save_checkpoint(checkpoint_path, {
                "step": step, "config": config.to_dict(), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "order": order.state_dict(), "rng": rng_state(),
                "window_losses": window_losses,
            })
        distributed.barrier(ctx)

    with _Interrupt(enabled=ctx.world_size == 1) as interrupt:
        for step in range(start_step + 1, config.steps + 1):
            tick = time.perf_counter()
            items = [task.train[i] for i in distributed.shard(order.next_batch(), ctx)]
            batch = distributed.split_sequence(collate(items, task.pad_id), ctx)
            global_count = distributed.all_reduce_sum(
                (batch["target"] != -100).sum().double().reshape(1), ctx)
            lr = scheduler.get_last_lr()[0]
            loss_sum, _, _ = run_batch(trained, batch)
            loss = loss_sum / global_count.float()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            train_loss = distributed.all_reduce_sum(loss.detach().double().reshape(1), ctx).item()
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss is {train_loss} at step {step}")
            step_times.append(time.perf_counter() - tick)
            window_losses.append(train_loss)
            window_times.append(step_times[-1])
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.3f}")

            if step % config.log_every == 0 or step == config.steps:
                log.write({"step": step, "split": "train",
                           "loss": statistics.fmean(window_losses), "lr": lr,
                           "grad_norm": grad_norm.item(),
                           "step_time_s": statistics.fmean(window_times),
                           "elapsed_s": time.perf_counter() - started})
                window_losses, window_times = [], []
            if step % config.eval_every == 0 or step == config.steps:
                tick = time.perf_counter()
                val = evaluate(model, task.val, task, config.eval_batch_size, ctx)
                log.write({"step": step, "split": "val", **val,
                           "eval_time_s": time.perf_counter() - tick, "rss_mb": peak_rss_mb()})
            if step % config.checkpoint_every == 0 or step == config.steps:
                save(step)
            if config.stop_after is not None and step == config.stop_after:
                progress.close()
                distributed.teardown(ctx)
                return {"stopped_at": step}
            if interrupt.asked:  # Ctrl-C: the step is complete; save it and stop
                if step % config.checkpoint_every and step != config.steps:
                    save(step)
                progress.close()
                distributed.teardown(ctx)
                return {"stopped_at": step, "interrupted": True,
                        "checkpoint": str(checkpoint_path)}
    progress.close()

    # --- final evaluation -----------------------------------------------------------------
    if val is None:  # resumed after the last step
        val = evaluate(model, task.val, task, config.eval_batch_size, ctx)
    test = evaluate(model, task.test, task, config.eval_batch_size, ctx)
    summary = {
        "task": config.task, "attn": config.attn, "seed": config.seed, "size": config.size,
        "steps": config.steps, "metric": task.metric, "chance": task.chance,
        "baselines": dict(task.baselines), "val": val, "test": test,
        "parameters": counts, "world_size": ctx.world_size,
        "threads": torch.get_num_threads(),
        "step_time_s": _median_step_time(out / "metrics.jsonl", step_times, ctx),
        "peak_rss_mb": peak_rss_mb(), "torch": torch.__version__, "machine": machine(),
        "data": task.config,
    }
    if ctx.is_main:
        _write_json(out / "summary.json", summary)
        if not config.keep_checkpoint:
            checkpoint_path.unlink(missing_ok=True)
    distributed.teardown(ctx)
    return summary


class _Interrupt:
    """Ctrl-C (SIGINT) during training: the first one asks the loop to finish its step, save
    a checkpoint and return; a second one interrupts at once (``KeyboardInterrupt``).
    Installed only in the main thread of a single-process run."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.asked = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\nCtrl-C: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> _Interrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def _median_step_time(log_path: Path, step_times: list[float], ctx) -> float | None:
    """Median training-step time over the whole run: from the metrics log (which spans
    every resumption) on the main process, from this process's own steps elsewhere."""
    if ctx.is_main:
        logged = [r["step_time_s"] for r in read_metrics(log_path) if r["split"] == "train"]
        step_times = logged or step_times
    return statistics.median(step_times) if step_times else None


def _registry_spec(name: str):
    from ..ops.registry import get_attention

    return get_attention(name)


def _progress_bar(config: TrainConfig, ctx: distributed.Context, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=f"{config.task}/{config.attn}",
                disable=not (config.progress and ctx.is_main), dynamic_ncols=True)
