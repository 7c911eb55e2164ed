"""``TrainConfig``: every setting of one training run, with per-task defaults ("recipes").

A run is fully described by its :class:`TrainConfig` (saved as ``config.json`` next to the
metrics). Fields left as ``None`` take the recipe of ``(task, size)`` from :data:`RECIPES`;
the ``"small"`` recipes are the budget of the ``lln results`` grid (see docs/results.md),
the ``"tiny"`` ones keep the tests fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Model sizes shared by every task of a size: head dim 64 for "small" (the head dim the
#: moment-matching constants were fitted for, and the paper's).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2, "short_conv": 0},
    "small": {"dim": 128, "depth": 2, "num_heads": 2, "mlp_ratio": 2, "short_conv": 0},
}

#: Training settings per (task, size). Steps are counted in optimizer updates of one
#: global batch.
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    **{
        (task, "tiny"): {"steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                         "eval_every": 3, "eval_batch_size": 32, "log_every": 1}
        for task in ("listops", "bbc", "shakespeare", "mqar")
    },
    ("listops", "small"): {"steps": 600, "batch_size": 32, "lr": 1e-3, "warmup_steps": 50,
                           "eval_every": 100, "log_every": 10},
    ("bbc", "small"): {"steps": 300, "batch_size": 16, "lr": 1e-3, "warmup_steps": 30,
                       "eval_every": 50, "log_every": 10},
    ("shakespeare", "small"): {"steps": 600, "batch_size": 16, "lr": 2e-3, "warmup_steps": 50,
                               "eval_every": 100, "log_every": 10},
    # MQAR adds a short causal convolution (kernel 3) to every block, for every attention:
    # without it softmax stayed at the "answer a context value" baseline (val 0.142 vs 0.125
    # after 1000 steps); with it softmax reached 0.99 by step 200 (docs/results.md).
    ("mqar", "small"): {"steps": 600, "batch_size": 32, "lr": 2e-3, "warmup_steps": 50,
                        "eval_every": 100, "log_every": 10, "short_conv": 3},
}

#: Tasks on your own data train with the recipe of the built-in task of the same kind.
RECIPE_OF = {"text": "shakespeare", "classify": "bbc"}

#: Metric keys that depend on the machine (wall time, memory): everything else in the
#: metrics log is reproduced exactly by a resumed run.
TIMING_KEYS = ("step_time_s", "elapsed_s", "eval_time_s", "rss_mb")


@dataclass
class TrainConfig:
    """Settings of one run. ``None`` = the recipe's value for ``(task, size)``.

    Attributes:
        task, attn: task name (``lln.data.tasks``) and attention name (``lln.ops.registry``).
        task_options: keyword options of :func:`lln.data.tasks.get_task` (e.g. ``{"files":
            ["a.txt"]}`` for ``text``, ``{"data": "docs/"}`` for ``classify``,
            ``{"window": 128}``).
        size: ``"tiny"`` or ``"small"`` (data size, model size and recipe).
        seed: training seed: initialisation, data order, random features. The data itself
            uses ``data_seed`` (fixed across a grid so every run is scored on the same data).
        out: run folder (metrics.jsonl, checkpoint.pt, config.json, summary.json).
        resume: continue from ``out/checkpoint.pt`` when it exists.
        overwrite: start afresh even if ``out`` holds a run (its files are replaced).
            Without ``resume`` or ``overwrite`` a folder holding a run is refused.
        steps, batch_size (global, over all processes), lr (peak), warmup_steps,
        min_lr_ratio (cosine floor / peak), weight_decay, grad_clip, eval_every, log_every,
        checkpoint_every (default: eval_every), eval_batch_size: the optimisation.
        dim, depth, num_heads, mlp_ratio, dropout, short_conv: the model (see
            :class:`lln.models.Trunk`).
        attn_options: keyword options for the attention op (e.g. ``{"combine": "scale"}``).
        redraw_every: random-feature methods: redraw the projection every this many steps.
        threads: ``torch.set_num_threads`` (None = leave as is).
        context_parallel: processes that share each sequence (torchrun; causal tasks with
            lln / lln_diag; see :mod:`lln.train.distributed`). 1 = none.
        stop_after: stop after this many steps as if killed (tests of ``resume``).
        progress: show a tqdm bar.
        keep_checkpoint: keep ``checkpoint.pt`` once the run is complete (the results grid
            deletes it: a finished run needs no resumption).
    """

    task: str
    attn: str
    size: str = "small"
    seed: int = 0
    data_seed: int = 0
    out: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    eval_batch_size: int | None = None
    dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: int | None = None
    dropout: float = 0.0
    short_conv: int | None = None
    attn_options: dict[str, Any] = field(default_factory=dict)
    redraw_every: int | None = 100
    threads: int | None = None
    context_parallel: int = 1
    stop_after: int | None = None
    progress: bool = True
    keep_checkpoint: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in from the recipe and model size."""
        if self.size not in MODEL_SIZES:
            raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {self.size!r}")
        from ..data.tasks import TASK_VARIANTS, base_task

        base = base_task(self.task)
        recipe = (RECIPE_OF.get(base, base), self.size)  # a variant trains with its base's recipe
        if recipe not in RECIPES:
            tasks = sorted({t for t, _ in RECIPES} | set(TASK_VARIANTS) | set(RECIPE_OF))
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {tasks}")
        defaults = {**MODEL_SIZES[self.size], **RECIPES[recipe]}
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **filled)
        if config.checkpoint_every is None:
            config.checkpoint_every = config.eval_every
        if config.eval_batch_size is None:
            config.eval_batch_size = config.batch_size
        for name in ("steps", "batch_size", "eval_every", "log_every", "checkpoint_every",
                     "eval_batch_size", "dim", "depth", "num_heads", "mlp_ratio"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "short_conv"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(config.task_options, dict):
            raise ValueError(f"task_options must be a dict, got {config.task_options!r}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
