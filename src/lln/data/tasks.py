"""The four training tasks behind one call: :func:`get_task` returns a :class:`TaskData`.

============  ==========  ======================================  ========  ==============
name          kind        inputs -> target                        causal    metric
============  ==========  ======================================  ========  ==============
listops       classify    ListOps tokens -> value 0-9             no        accuracy
bbc           classify    article bytes -> topic (5 classes)      no        accuracy
shakespeare   lm          byte window -> next byte at each step   yes       bits_per_byte
mqar          recall      keys/values/queries -> value at queries yes       accuracy
============  ==========  ======================================  ========  ==============

Every item of ``TaskData.train``/``val``/``test`` is a pair ``(input_ids, target)``:
``input_ids`` is a ``LongTensor (L,)`` (lengths may differ within a split) and ``target`` is
a ``LongTensor ()`` (classify) or ``LongTensor (L,)`` aligned with the inputs (lm, recall;
``-100`` = no loss). For ``lm`` the shift is already done: ``target[t]`` is the token that
follows ``input_ids[t]``. :func:`collate` pads a list of items into a batch.

Token id 0 is padding for every task and never occurs inside a sequence.

``seed`` is the *data* seed (generation and splits). Keep it fixed (the default 0) across
training seeds so that every run of a grid is scored on the same test set.

Sizes: ``"tiny"`` builds in well under a second (tests); ``"small"`` is the budget of the
``lln results`` grid; ``"full"`` is the published configuration where one exists (LRA
ListOps lengths, BBC at 4096 bytes). ``docs/tasks.md`` lists every number and every
deviation from the published setups.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

#: The label value that the losses and metrics ignore (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
#: Padding id shared by every task.
PAD_ID = 0

TASK_NAMES = ("listops", "bbc", "shakespeare", "mqar")
#: Tasks on the user's own data (:mod:`lln.data.own`): ``text`` needs ``files=[...]``,
#: ``classify`` needs ``data=PATH``.
OWN_DATA_TASKS = ("text", "classify")
#: Named variants of a task: the base task with some options fixed. The three Zoology MQAR
#: points, so that ``lln train mqar-256x16`` and the results grid can name them.
TASK_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    f"mqar-{seq_len}x{num_pairs}": ("mqar", {"seq_len": seq_len, "num_pairs": num_pairs})
    for seq_len, num_pairs in ((64, 4), (128, 8), (256, 16))
}
SIZES = ("tiny", "small", "full")

# task name -> module implementing ``build(size, seed, overrides) -> TaskData`` (or
# ``module:function`` naming another builder)
_MODULES = {
    "listops": "lln.data.listops",
    "bbc": "lln.data.bbc",
    "shakespeare": "lln.data.shakespeare",
    "mqar": "lln.data.mqar",
    "text": "lln.data.own:build_text",
    "classify": "lln.data.own:build_classify",
}


@dataclass
class TaskData:
    """A task: its splits and everything a model and a trainer need to know about it.

    Attributes:
        name: task name (one of :data:`TASK_NAMES`).
        kind: ``"classify"`` (one label per sequence), ``"lm"`` (next token at every
            position) or ``"recall"`` (labels at some positions, ``-100`` elsewhere).
        vocab_size: number of input token ids (ids are ``0 .. vocab_size - 1``; 0 = pad).
        num_classes: output size of the head: the class count for ``classify``,
            ``vocab_size`` for ``lm`` and ``recall``.
        max_len: longest sequence any split can hold (size positional tables with it).
        pad_id: padding id (always 0).
        train, val, test: datasets of ``(input_ids (L,), target)`` pairs, see module doc.
        metric: ``"accuracy"`` (higher is better) or ``"bits_per_byte"`` (lower is better).
        chance: the metric of a uniform guess (``1 / classes``; 8.0 bits per byte).
        causal: whether the model must be causal (``lm`` and ``recall``: decoder).
        baselines: stronger trivial references measured on the data, e.g.
            ``{"majority_class": 0.23}`` (accuracy of always answering the most frequent
            training class, scored on test) or ``{"unigram_bpb": 4.6}``.
        config: the resolved configuration (defaults of the size plus overrides).
    """

    name: str
    kind: str
    vocab_size: int
    num_classes: int
    max_len: int
    pad_id: int
    train: Dataset
    val: Dataset
    test: Dataset
    metric: str
    chance: float
    causal: bool = False
    baselines: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


class SequenceDataset(Dataset):
    """A list of ``(input_ids, target)`` pairs held in memory.

    Args:
        inputs: ``LongTensor (L_i,)`` per item.
        targets: ``LongTensor ()`` or ``LongTensor (L_i,)`` per item.
    """

    def __init__(self, inputs: Sequence[Tensor], targets: Sequence[Tensor]):
        if len(inputs) != len(targets):
            raise ValueError(
                f"inputs and targets must have one entry per item, got {len(inputs)} inputs "
                f"and {len(targets)} targets"
            )
        self.inputs = list(inputs)
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


def resolve_config(
    task: str, defaults: dict[str, dict[str, Any]], size: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Defaults for ``size`` updated with ``overrides``; unknown sizes or keys raise ValueError."""
    if size not in defaults:
        raise ValueError(f"size for task {task!r} must be one of {sorted(defaults)}, got {size!r}")
    config = dict(defaults[size])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for task {task!r}; valid options: {sorted(config)}"
        )
    config.update(overrides)
    return config


def get_task(name: str, *, size: str = "small", seed: int = 0, **overrides: Any) -> TaskData:
    """Build a task: generate or read its data and split it.

    Args:
        name: one of ``"listops"``, ``"bbc"``, ``"shakespeare"``, ``"mqar"``, a variant
            of :data:`TASK_VARIANTS` (``"mqar-64x4"``, ``"mqar-128x8"``, ``"mqar-256x16"``),
            or a task on your own data (:mod:`lln.data.own`): ``"text"`` (byte-level LM;
            ``files=[paths]``, optional ``val_files=[paths]``) or ``"classify"``
            (``data=path``: a folder of ``<label>/<doc>.txt``, or a JSONL/CSV file with
            ``text`` and ``label`` fields).
        size: ``"tiny"`` (tests), ``"small"`` (the results grid) or ``"full"``.
        seed: data seed (generation and split); independent of any training seed.
        **overrides: task options replacing the size's defaults (e.g. ``max_length=300`` for
            ListOps, ``seq_len=256, num_pairs=16`` for MQAR); ``TaskData.config`` lists them.

    Returns:
        The :class:`TaskData`. Same arguments give identical data.

    Raises:
        ValueError: unknown task, size or option, or an option out of range.
        FileNotFoundError: the data package of ``bbc``/``shakespeare`` is not installed, or
            a file given to ``text``/``classify`` does not exist.
    """
    if not isinstance(name, str) or (name not in _MODULES and name not in TASK_VARIANTS):
        raise ValueError(f"unknown task {name!r}; valid tasks: "
                         f"{[*TASK_NAMES, *TASK_VARIANTS, *OWN_DATA_TASKS]}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    base = base_task(name)
    fixed = TASK_VARIANTS[name][1] if name in TASK_VARIANTS else {}
    clash = sorted(set(fixed) & set(overrides))
    if clash:
        raise ValueError(f"task {name!r} fixes {clash}; use {base!r} to choose them")
    module_name, _, builder = _MODULES[base].partition(":")
    build = getattr(importlib.import_module(module_name), builder or "build")
    task = build(size=size, seed=seed, overrides={**fixed, **overrides})
    return replace(task, name=name)


def base_task(name: str) -> str:
    """The task a name refers to: ``"mqar-256x16"`` -> ``"mqar"``; a task name itself."""
    return TASK_VARIANTS[name][0] if name in TASK_VARIANTS else name


def collate(
    batch: Sequence[tuple[Tensor, Tensor]], pad_id: int = PAD_ID
) -> dict[str, Tensor]:
    """Pad a list of ``(input_ids, target)`` items into a batch (right padding).

    Args:
        batch: items as returned by a task dataset; inputs ``(L_i,)`` long, targets ``()``
            (classification) or ``(L_i,)`` (per-position labels).
        pad_id: id written into padded input positions.

    Returns:
        ``{"input_ids": (B, L) long, "key_padding_mask": (B, L) bool (True = real token),
        "lengths": (B,) long, "target": (B,) long or (B, L) long with -100 at padding}``,
        with ``L = max L_i``.
    """
    if len(batch) == 0:
        raise ValueError("batch must hold at least one item")
    inputs = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    for x in inputs:
        if not isinstance(x, Tensor) or x.dim() != 1 or x.dtype != torch.long:
            raise TypeError("each input_ids must be a 1-D torch.long tensor")
    lengths = torch.tensor([x.numel() for x in inputs], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    for i, x in enumerate(inputs):
        input_ids[i, : x.numel()] = x
    if all(t.dim() == 0 for t in targets):
        target = torch.stack(targets).long()
    elif all(t.dim() == 1 for t in targets):
        target = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, (x, t) in enumerate(zip(inputs, targets, strict=True)):
            if t.numel() != x.numel():
                raise ValueError(
                    f"item {i}: per-position target must match input_ids length "
                    f"{x.numel()}, got {t.numel()}"
                )
            target[i, : t.numel()] = t
    else:
        raise ValueError("targets must all be scalars (classify) or all be 1-D (per position)")
    return {"input_ids": input_ids, "key_padding_mask": mask, "lengths": lengths, "target": target}


def majority_accuracy(train_labels: Sequence[int], test_labels: Sequence[int]) -> float:
    """Accuracy on ``test_labels`` of always answering the most frequent training label."""
    counts: dict[int, int] = {}
    for label in train_labels:
        counts[label] = counts.get(label, 0) + 1
    top = min(counts, key=lambda c: (-counts[c], c))
    return sum(1 for label in test_labels if label == top) / max(1, len(test_labels))
