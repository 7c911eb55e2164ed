"""Losses and metrics per task kind, and the JSON-lines metrics log.

Losses are returned as *sums* with the number of terms, so that data-parallel ranks can
divide by the global count (see :mod:`lln.train.distributed`):

* ``classify``: cross-entropy of the class logits ``(B, C)``, one term per sequence;
  metric accuracy.
* ``recall`` / ``lm``: cross-entropy at every labelled position of ``(B, N, V)`` (label
  ``-100`` = ignored); metric accuracy over labelled positions (recall) or bits per byte
  ``= mean nats / ln 2`` (lm: one token is one byte).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def loss_terms(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss_sum, count, correct)`` of logits ``(B, C)`` / ``(B, N, V)`` against ``target``
    ``(B,)`` / ``(B, N)``; ``count`` and ``correct`` are float tensors without gradient."""
    logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    loss_sum = F.cross_entropy(logits.float(), target, reduction="sum", ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        labelled = target != IGNORE_INDEX
        count = labelled.sum().to(torch.float64)
        correct = ((logits.argmax(-1) == target) & labelled).sum().to(torch.float64)
    return loss_sum, count, correct


def metric_value(metric: str, loss_sum: float, count: float, correct: float) -> float:
    """The task metric from summed terms: ``accuracy`` or ``bits_per_byte``."""
    if count == 0:
        raise ValueError("cannot compute a metric over zero labelled targets")
    if metric == "accuracy":
        return correct / count
    if metric == "bits_per_byte":
        return loss_sum / count / math.log(2)
    raise ValueError(f"metric must be 'accuracy' or 'bits_per_byte', got {metric!r}")


class MetricsLog:
    """Append-only JSON lines, one record per line, written by the main process only.

    Args:
        path: the ``metrics.jsonl`` file.
        resume_step: None starts a fresh log; an int keeps the records with
            ``step <= resume_step`` (those a checkpoint at that step has seen) and drops any
            written after it by the interrupted run, so a resumed log equals an
            uninterrupted one.
        enabled: False makes every call a no-op (non-main ranks).
    """

    def __init__(self, path: str | Path, *, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = [] if resume_step is None else [
            r for r in read_metrics(self.path) if r["step"] <= resume_step
        ]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log ([] if the file does not exist).

    A last line cut short by a killed process is dropped; a bad line elsewhere raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records
