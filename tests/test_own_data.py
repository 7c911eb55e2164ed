"""Training on your own data: ``get_task("text" | "classify", ...)`` and ``lln train text`` /
``lln train classify`` end to end on tiny files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lln.cli import main as cli_main
from lln.data.own import HELD_OUT_FRACTION
from lln.data.tasks import collate, get_task

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat and then it ran away from the dog while a bird sang".split()


def write_text(path: Path, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return path


def labelled_docs(n_per_label: int = 10) -> list[tuple[str, str]]:
    """Two labels that differ in their bytes: 'x' documents and 'y' documents."""
    rng = random.Random(1)
    return [(f"{label} " * rng.randint(3, 12) + str(i), label)
            for label in ("x", "y") for i in range(n_per_label)]


def test_text_task_split_rule_without_val(tmp_path):
    path = write_text(tmp_path / "a.txt", 2000)
    data = path.read_bytes().strip()
    task = get_task("text", files=[str(path)], size="tiny")
    held = round(HELD_OUT_FRACTION * len(data))
    assert task.config["split_bytes"] == {"train": len(data) - held, "val": held // 2,
                                          "test": held - held // 2}
    assert task.kind == "lm" and task.causal and task.metric == "bits_per_byte"
    # the first training window is the first bytes of the file; the test split is its end
    x, y = task.train[0]
    assert bytes((x - 1).tolist()) == data[:32] and bytes((y - 1).tolist()) == data[1:33]
    xt, _ = task.test[0]
    assert bytes((xt - 1).tolist()) == data[len(data) - (held - held // 2):][:32]
    assert task.config["sources"][0]["bytes"] == len(path.read_bytes())


def test_text_task_with_val_files_and_folders(tmp_path):
    write_text(tmp_path / "train" / "b.txt", 400, seed=2)
    write_text(tmp_path / "train" / "sub" / "a.txt", 400, seed=3)
    (tmp_path / "train" / "ignored.bin").write_bytes(b"\x00" * 100)
    val = write_text(tmp_path / "val.txt", 300, seed=4)
    task = get_task("text", files=[str(tmp_path / "train")], val_files=[str(val)], size="tiny",
                    window=16)
    assert [Path(f).name for f in task.config["files"]] == ["b.txt", "a.txt"]  # sorted paths
    total = len(val.read_bytes().strip())
    assert task.config["split_bytes"]["val"] + task.config["split_bytes"]["test"] == total
    assert task.train[0][0].shape == (16,)
    batch = collate([task.val[0], task.val[1]])
    assert batch["target"].shape == (2, 16)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs files"),
    ({"files": ["/no/such/file.txt"]}, "no such file"),
    ({"files": "TINY"}, r"fewer than window \+ 1"),
])
def test_text_task_errors(tmp_path, kwargs, message):
    if kwargs.get("files") == "TINY":
        kwargs = {"files": [str(write_text(tmp_path / "t.txt", 20))]}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        get_task("text", size="tiny", **kwargs)


def make_classify_data(tmp_path: Path, kind: str) -> Path:
    docs = labelled_docs()
    if kind == "folder":
        for i, (text, label) in enumerate(docs):
            (tmp_path / "docs" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / "docs" / label / f"{i:03d}.txt").write_text(text)
        return tmp_path / "docs"
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                                for t, lab in docs))
        return path
    path = tmp_path / "docs.csv"
    path.write_text("label,text\n" + "".join(f'{lab},"{t}"\n' for t, lab in docs))
    return path


@pytest.mark.parametrize("kind", ["folder", "jsonl", "csv"])
def test_classify_task_reads_every_format_the_same(tmp_path, kind):
    task = get_task("classify", data=str(make_classify_data(tmp_path, kind)), size="tiny")
    assert task.config["labels"] == ["x", "y"] and task.num_classes == 2
    assert task.config["documents"] == {"train": 16, "val": 2, "test": 2}
    texts = {bytes((x - 1).tolist()).decode(): int(y)
             for split in (task.train, task.val, task.test) for x, y in split}
    assert texts == {t: ["x", "y"].index(lab) for t, lab in labelled_docs()}


def test_classify_task_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match="line 2 needs a string 'text' and a 'label'"):
        get_task("classify", data=str(bad), size="tiny")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"d{i}", "label": i % 2}) + "\n"
                           for i in range(4)))
    with pytest.raises(ValueError, match="too few"):
        get_task("classify", data=str(few), size="tiny")
    with pytest.raises(ValueError, match="needs data="):
        get_task("classify", size="tiny")


def test_lln_train_text_end_to_end(tmp_path, capsys):
    path = write_text(tmp_path / "a.txt", 2000)
    out = tmp_path / "run"
    cli_main(["train", "text", "--files", str(path), "--attn", "lln_diag", "--size", "tiny",
              "--out", str(out), "--no-progress", "--steps", "4", "--task-option", "window=24"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "text" and summary["steps"] == 4
    assert summary["data"]["window"] == 24
    assert summary["data"]["sources"][0]["path"] == str(path)
    assert 0 < summary["test"]["bits_per_byte"] < 12
    assert "text / lln_diag" in capsys.readouterr().out


def test_lln_train_classify_end_to_end_and_resume(tmp_path):
    data = make_classify_data(tmp_path, "folder")
    out = tmp_path / "run"
    common = ["train", "classify", "--data", str(data), "--attn", "lln", "--size", "tiny",
              "--out", str(out), "--no-progress"]
    cli_main([*common, "--stop-after", "3"])
    assert not (out / "summary.json").exists()
    cli_main([*common, "--resume"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classify" and summary["data"]["labels"] == ["x", "y"]
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["train", "text", "--attn", "lln"], "--files: task 'text' needs"),
    (["train", "classify", "--attn", "lln"], "--data: task 'classify' needs"),
    (["train", "listops", "--attn", "lln", "--files", "a.txt"], "--files applies to text"),
    (["train", "text", "--attn", "lln", "--files", "/no/such.txt"], "no such file"),
])
def test_own_data_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli_main([*argv, "--size", "tiny", "--out", str(tmp_path / "r"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_text_task_ids_are_bytes_plus_one(tmp_path):
    path = tmp_path / "u.txt"
    path.write_bytes(("é" * 200).encode())  # multi-byte characters stay raw bytes
    task = get_task("text", files=[str(path)], size="tiny", window=8)
    x, _ = task.train[0]
    assert torch.equal(x - 1, torch.tensor(list("é".encode() * 4)))
