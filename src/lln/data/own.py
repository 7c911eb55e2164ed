"""Your own data: a byte-level LM on plain-text files (``text``) and document classification
(``classify``), built by :func:`lln.data.tasks.get_task` like the built-in tasks.

``text`` — ``get_task("text", files=[...], val_files=None)``, ``lln train text --files PATH...
[--val PATH...]``. ``files`` (and ``val_files``) are plain-text files or folders; a folder
stands for every ``*.txt`` file under it (recursively, sorted by path). The files are read
as bytes (no decoding) and joined in the given order with a blank line between them.

Split rule: the held-out text is ``val_files`` when given; otherwise the **last 10 % of the
training bytes** (cut at a byte, so with several files that is mostly the last file(s)) and
training uses the first 90 %. The held-out text is then cut in two halves: the first half is
the validation split (evaluated during training), the second the test split (the final
score). Each split is cut into non-overlapping windows of ``window + 1`` bytes exactly as
the ``shakespeare`` task (:class:`lln.data.shakespeare.ByteWindows`); ids are ``byte + 1``.
Each split must hold at least one window: a clear error says how many bytes are missing.

``classify`` — ``get_task("classify", data=PATH)``, ``lln train classify --data PATH``.
``PATH`` is

* a folder of ``<label>/<doc>.txt`` files (labels = sub-folder names), or
* a ``.jsonl`` file, one JSON object per line with ``"text"`` and ``"label"`` fields, or
* a ``.csv`` file with a header row naming ``text`` and ``label`` columns.

Labels are compared as strings and numbered in sorted order. Exact duplicate documents are
dropped (first one kept) and the rest is split per label, seeded by the data seed, 80 / 10 / 10
into train / val / test (:func:`lln.data.bbc.split_articles`, the BBC rule). Inputs are the
first ``max_len`` bytes of each document.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from ..ops._validation import check_positive_int
from .bbc import Article, dedupe, encode_bytes, split_articles
from .shakespeare import VOCAB_SIZE, ByteWindows, unigram_bits_per_byte, window_starts
from .tasks import PAD_ID, SequenceDataset, TaskData, majority_accuracy, resolve_config

#: Share of the training text held out (val + test) when no validation file is given.
HELD_OUT_FRACTION = 0.1
_SEPARATOR = b"\n\n"

TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    size: {"files": None, "val_files": None, **limits}
    for size, limits in (
        ("tiny", dict(window=32, max_train_windows=64, max_eval_windows=16)),
        ("small", dict(window=256, max_train_windows=None, max_eval_windows=1024)),
        ("full", dict(window=1024, max_train_windows=None, max_eval_windows=None)),
    )
}
CLASSIFY_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(data=None, max_len=64),
    "small": dict(data=None, max_len=1024),
    "full": dict(data=None, max_len=4096),
}


def text_files(paths: Any, name: str = "files") -> list[Path]:
    """The files that ``paths`` (files or folders; folders -> their ``*.txt``, recursively,
    sorted) stand for, in order.

    Raises:
        ValueError: ``paths`` is not a non-empty list of paths, or a folder holds no .txt file.
        FileNotFoundError: a path does not exist (the message names it).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not paths:
        raise ValueError(f"{name} must be a non-empty list of text files or folders, "
                         f"got {paths!r}")
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not inside:
                raise ValueError(f"{name}: folder {path} holds no .txt file")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{name}: no such file or folder: {path}")
    return found


def file_records(files: list[Path]) -> list[dict[str, Any]]:
    """``[{"path", "bytes", "sha256"}]`` of ``files`` (what a run was trained on)."""
    records = []
    for f in files:
        data = f.read_bytes()
        records.append({"path": str(f), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    return records


def read_text(files: list[Path]) -> bytes:
    """The files' bytes, each stripped of surrounding whitespace, joined by a blank line."""
    return _SEPARATOR.join(f.read_bytes().strip() for f in files)


def split_text(train: bytes, held_out: bytes | None) -> dict[str, bytes]:
    """The split rule of the module doc: ``{"train", "val", "test"}`` bytes."""
    if held_out is None:
        cut = len(train) - max(1, round(HELD_OUT_FRACTION * len(train)))
        train, held_out = train[:cut], train[cut:]
    half = len(held_out) // 2
    return {"train": train, "val": held_out[:half], "test": held_out[half:]}


def _own_config(task: str, defaults: dict[str, dict[str, Any]], size: str,
                overrides: dict[str, Any], required: str, hint: str) -> dict[str, Any]:
    """The resolved options of an own-data task; ``required`` (where the data is) must be
    given."""
    config = resolve_config(task, defaults, size, overrides)
    if config[required] is None:
        raise ValueError(f"task {task!r} needs {hint}")
    return config


def _positive_or_none(config: dict[str, Any], key: str) -> None:
    value = config[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{key} must be None or a positive int, got {value!r}")


def build_text(*, size: str, seed: int, overrides: dict[str, Any]) -> TaskData:
    """The ``text`` task (see the module doc and :func:`lln.data.tasks.get_task`)."""
    config = _own_config("text", TEXT_DEFAULTS, size, overrides, "files",
                         "files=[...] (plain-text files or folders; CLI: --files PATH...)")
    window = check_positive_int(config["window"], "window")
    _positive_or_none(config, "max_train_windows")
    _positive_or_none(config, "max_eval_windows")
    files = text_files(config["files"], "files")
    val_files = None if config["val_files"] is None else text_files(config["val_files"],
                                                                     "val_files")
    parts = split_text(read_text(files), None if val_files is None else read_text(val_files))
    datasets = {}
    for split, data in parts.items():
        count = max(0, (len(data) - 1) // window)
        if count == 0:
            held = "the --val text" if val_files else (
                f"the last {int(100 * HELD_OUT_FRACTION)}% of the training text")
            origin = "the training text" if split == "train" else f"half of {held}"
            raise ValueError(
                f"files: the {split} split ({origin}) has {len(data)} bytes, fewer than "
                f"window + 1 = {window + 1}: give more text, a --val file, or a smaller "
                f"window (window=N)")
        limit = config["max_train_windows" if split == "train" else "max_eval_windows"]
        datasets[split] = ByteWindows(data, window, window_starts(len(data), window, limit))
    resolved = {**config, "files": [str(f) for f in files],
                "val_files": None if val_files is None else [str(f) for f in val_files],
                "seed": seed, "split_bytes": {k: len(v) for k, v in parts.items()},
                "sources": file_records(files + (val_files or []))}
    return TaskData(
        name="text", kind="lm", vocab_size=VOCAB_SIZE, num_classes=VOCAB_SIZE,
        max_len=window, pad_id=PAD_ID, train=datasets["train"], val=datasets["val"],
        test=datasets["test"], metric="bits_per_byte", chance=8.0, causal=True,
        baselines={"unigram_bpb": unigram_bits_per_byte(parts["train"], parts["test"])},
        config=resolved,
    )


def read_labelled(path: str | Path) -> list[Article]:
    """Documents of a ``classify`` data path (folder, .jsonl or .csv; see the module doc)."""
    path = Path(path)
    if path.is_dir():
        docs = [Article(path=f"{label.name}/{f.name}", label=label.name, data=f.read_bytes())
                for label in sorted(p for p in path.iterdir() if p.is_dir())
                for f in sorted(label.glob("*.txt"))]
        if not docs:
            raise ValueError(f"data: folder {path} holds no <label>/<doc>.txt file")
        return docs
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file or folder: {path}")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"data: {path} line {number} is not JSON ({error.msg})") \
                    from None
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
        rows = list(enumerate(reader, 2))
    else:
        raise ValueError(f"data must be a folder of <label>/<doc>.txt files, a .jsonl or a "
                         f".csv file, got {path}")
    docs = []
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) \
                or row.get("label") in (None, ""):
            raise ValueError(f"data: {path} line {number} needs a string 'text' and a "
                             f"'label' field")
        docs.append(Article(path=f"{number:09d}", label=str(row["label"]),
                            data=row["text"].encode("utf-8")))
    if not docs:
        raise ValueError(f"data: {path} holds no document")
    return docs


def build_classify(*, size: str, seed: int, overrides: dict[str, Any]) -> TaskData:
    """The ``classify`` task (see the module doc and :func:`lln.data.tasks.get_task`)."""
    config = _own_config("classify", CLASSIFY_DEFAULTS, size, overrides, "data",
                         "data=PATH (a folder of <label>/<doc>.txt, or a .jsonl / .csv with "
                         "text and label fields; CLI: --data PATH)")
    max_len = check_positive_int(config["max_len"], "max_len")
    docs = dedupe(read_labelled(config["data"]))
    labels = sorted({d.label for d in docs})
    if len(labels) < 2:
        raise ValueError(f"data: {config['data']} holds {len(labels)} label(s); "
                         "classification needs at least 2")
    splits = split_articles(docs, seed=seed)
    for name in ("val", "test"):
        if not splits[name]:
            raise ValueError(
                f"data: {config['data']} holds {len(docs)} distinct documents, too few for a "
                f"{name} split (10% per label, rounded): give at least 5 documents per label")
    class_id = {label: i for i, label in enumerate(labels)}
    datasets = {
        name: SequenceDataset([encode_bytes(d.data, max_len) for d in group],
                              [torch.tensor(class_id[d.label]) for d in group])
        for name, group in splits.items()
    }
    majority = majority_accuracy([int(t) for t in datasets["train"].targets],
                                 [int(t) for t in datasets["test"].targets])
    data_path = Path(config["data"])
    return TaskData(
        name="classify", kind="classify", vocab_size=VOCAB_SIZE, num_classes=len(labels),
        max_len=max_len, pad_id=PAD_ID, train=datasets["train"], val=datasets["val"],
        test=datasets["test"], metric="accuracy", chance=1 / len(labels), causal=False,
        baselines={"majority_class": majority},
        config={**config, "data": str(data_path), "seed": seed, "labels": labels,
                "documents": {k: len(v) for k, v in splits.items()}},
    )
