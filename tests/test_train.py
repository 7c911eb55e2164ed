"""The trainer: schedule, data order, checkpoints, exact resume, CLI, results grid.

Runs use the tiny task configurations (ListOps and MQAR: generated, always available).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lln.cli import main as cli_main
from lln.train import results
from lln.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lln.train.config import TIMING_KEYS, TrainConfig
from lln.train.metrics import MetricsLog, loss_terms, metric_value, read_metrics
from lln.train.sampler import BatchOrder
from lln.train.trainer import lr_factor, train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path: Path, name: str, **kw) -> TrainConfig:
    kw.setdefault("task", "listops")
    kw.setdefault("attn", "lln_diag")
    return TrainConfig(size="tiny", out=str(tmp_path / name), progress=False, **kw)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def final_parameters(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoint.pt")["model"]


# --- pieces -----------------------------------------------------------------------------


def test_lr_schedule():
    f = [lr_factor(s, warmup=4, total=20, floor=0.1) for s in range(25)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[20] == pytest.approx(0.1) and f[24] == pytest.approx(0.1)
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))


def test_batch_order_is_deterministic_resumable_and_covers_each_epoch():
    order = BatchOrder(10, 3, seed=5)
    epoch0 = [order.next_batch() for _ in range(3)]
    flat = sorted(i for batch in epoch0 for i in batch)
    assert len(set(flat)) == 9  # 3 full batches, the 10th example dropped
    saved = order.state_dict()
    rest = [order.next_batch() for _ in range(2)]  # into epoch 1
    assert order.epoch == 1
    again = BatchOrder(10, 3, seed=5)
    assert [again.next_batch() for _ in range(3)] == epoch0
    resumed = BatchOrder(10, 3, seed=5)
    resumed.load_state_dict(saved)
    assert [resumed.next_batch() for _ in range(2)] == rest
    assert [BatchOrder(10, 3, seed=6).next_batch() for _ in range(3)] != epoch0
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(2, 3, seed=0)
    with pytest.raises(ValueError, match="seed=5"):
        BatchOrder(10, 3, seed=7).load_state_dict(saved)


def test_checkpoint_is_atomic_and_restores_rng(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "x": torch.ones(2)})
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    save_checkpoint(path, {"step": 2, "rng": state})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left
    loaded = load_checkpoint(path)  # weights_only=True
    assert loaded["step"] == 2
    torch.rand(5), np.random.rand(5), random.random()  # noqa: NPY002
    set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_metrics_log_truncates_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path, resume_step=None)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    MetricsLog(path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path, resume_step=None)
    assert read_metrics(path) == []


def test_loss_terms_and_metrics():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]])
    target = torch.tensor([[0, -100], [0, 0]])
    loss_sum, count, correct = loss_terms(logits, target)
    expected = sum(-torch.log_softmax(logits[b, t], -1)[0] for b, t in ((0, 0), (1, 0), (1, 1)))
    assert loss_sum.item() == pytest.approx(expected.item())
    assert (count.item(), correct.item()) == (3, 2)
    assert metric_value("accuracy", 1.0, 4.0, 3.0) == 0.75
    assert metric_value("bits_per_byte", 2 * math.log(2), 2.0, 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="metric"):
        metric_value("f1", 1.0, 1.0, 1.0)


# --- whole runs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "attn"), [("listops", "lln_diag"), ("mqar", "performer")])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, task, attn):
    """Stop after step 7 (last checkpoint at step 4, so steps 5-7 are redone), resume, and get
    exactly the metrics and parameters of an uninterrupted run. The train loss logged at
    step 6 averages steps 4-6 (log_every=3), across the checkpoint; dropout draws from the
    restored torch RNG; Performer redraws its features every 2 steps."""
    common = dict(task=task, attn=attn, steps=8, eval_every=2, checkpoint_every=4,
                  log_every=3, redraw_every=2, dropout=0.1)
    full = train(tiny(tmp_path, "full", **common))
    assert train(tiny(tmp_path, "cut", stop_after=7, **common)) == {"stopped_at": 7}
    cut_log = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    # records of step 6 were written after the last checkpoint: resume must drop them
    assert [r["step"] for r in cut_log if r["split"] == "train"] == [3, 6]
    resumed = train(tiny(tmp_path, "cut", resume=True, **common))
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in a if r["split"] == "train"] == [3, 6, 8]
    assert without_timing(a) == without_timing(b)  # exact equality of every value
    assert full["test"] == resumed["test"] and full["val"] == resumed["val"]
    pa, pb = final_parameters(tmp_path / "full"), final_parameters(tmp_path / "cut")
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny(tmp_path, "run", attn="softmax", steps=2, eval_every=2))
    with pytest.raises(ValueError, match="lr"):
        train(tiny(tmp_path, "run", attn="softmax", steps=2, eval_every=2, lr=0.5, resume=True))


def test_training_learns_and_writes_its_files(tmp_path):
    """A few dozen steps on tiny MQAR lower the loss; the run folder holds every file."""
    summary = train(tiny(tmp_path, "run", task="mqar", attn="softmax", steps=30,
                         eval_every=10, lr=3e-3))
    log = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_loss = [r["loss"] for r in log if r["split"] == "train"]
    assert sum(train_loss[-5:]) / 5 < sum(train_loss[:5]) / 5
    assert [r["step"] for r in log if r["split"] == "val"] == [10, 20, 30]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["test"] == summary["test"] and on_disk["metric"] == "accuracy"
    assert on_disk["parameters"]["total"] > 0 and on_disk["step_time_s"] > 0
    assert on_disk["peak_rss_mb"] > 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot be trained on the causal task"):
        train(tiny(tmp_path, "x", task="mqar", attn="nystrom"))
    with pytest.raises(ValueError, match="unknown task"):
        train(tiny(tmp_path, "x", task="imdb"))
    with pytest.raises(ValueError, match="size"):
        TrainConfig(task="listops", attn="lln", size="huge").resolved()


# --- command line ---------------------------------------------------------------------


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "cli"
    cli_main(["train", "listops", "--attn", "lln_diag", "--size", "tiny", "--steps", "2",
              "--eval-every", "1", "--out", str(out), "--no-progress",
              "--attn-option", "combine=scale", "--attn-option", "block_size=8",
              "--no-keep-checkpoint"])
    text = capsys.readouterr().out
    assert "listops / lln_diag / seed 0: test accuracy" in text
    config = json.loads((out / "config.json").read_text())
    assert config["attn_options"] == {"combine": "scale", "block_size": 8}
    assert config["parameters"]["attention_extra"] > 0
    assert (out / "summary.json").exists() and not (out / "checkpoint.pt").exists()


def test_results_grid_runs_missing_runs_only_and_tabulates(tmp_path, monkeypatch, capsys):
    """The grid calls `lln train --resume` for the missing runs only (complete ones keep
    their summary), skips causal tasks for non-causal attentions, and writes the tables,
    the curves and the docs section."""
    out = tmp_path / "grid"
    for seed in (0, 1):  # already complete: must not be re-run
        train(TrainConfig(task="listops", attn="softmax", size="tiny", seed=seed, steps=2,
                          eval_every=1, out=str(results.run_dir(out, "listops", "softmax", seed)),
                          progress=False))
    calls = []

    def fake_call(command, stdout, stderr):
        calls.append(command)
        task, attn = command[4], command[6]
        seed = int(command[command.index("--seed") + 1])
        train(TrainConfig(task=task, attn=attn, size="tiny", seed=seed, steps=2, eval_every=1,
                          out=command[command.index("--out") + 1], progress=False))
        return 0

    monkeypatch.setattr(results.subprocess, "call", fake_call)
    doc = tmp_path / "doc.md"
    doc.write_text("# Results\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    cli_main(["results", "--attns", "softmax", "nystrom", "--tasks", "listops", "mqar",
              "--seeds", "0", "1", "--size", "tiny", "--out", str(out), "--doc", str(doc)])
    ran = sorted((c[4], c[6], c[c.index("--seed") + 1]) for c in calls)
    assert ran == [("listops", "nystrom", "0"), ("listops", "nystrom", "1"),
                   ("mqar", "softmax", "0"), ("mqar", "softmax", "1")]
    assert all("--resume" in c for c in calls)
    table = (out / "results.md").read_text()
    assert "| nystrom |" in table and "n/a" in table and "± " in table
    assert "| *chance* | 0.100 |" in table
    fastest = min(s["step_time_s"] for s in json.loads((out / "results.json").read_text())
                  if s["task"] == "listops" and s["attn"] == "softmax")
    assert f"| softmax | {1000 * fastest:.0f} |" in table  # the fastest seed's step time
    assert (out / "results-curves.png").stat().st_size > 0
    assert len(json.loads((out / "results.json").read_text())) == 6
    text = doc.read_text()
    assert "old" not in text and "| nystrom |" in text and text.endswith("tail\n")
    calls.clear()
    cli_main(["results", "--attns", "softmax", "--tasks", "listops", "--seeds", "0",
              "--size", "tiny", "--out", str(out), "--collect-only", "--name", "other"])
    assert calls == []
    def first_row(name: str) -> str:
        return next(line for line in (out / name).read_text().splitlines()
                    if line.startswith("| softmax |"))

    assert "±" not in first_row("other.md")  # one seed: no spread
    assert "±" in first_row("results.md")  # the first grid's table is left alone


def test_doc_sections_are_replaced_independently(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:start -->\nA\n<!-- results:end -->\n"
                   "<!-- mqar:start -->\nB\n<!-- mqar:end -->\n")
    results.replace_between_markers(doc, "new\n", "mqar")
    assert doc.read_text() == ("<!-- results:start -->\nA\n<!-- results:end -->\n"
                               "<!-- mqar:start -->\nnew\n<!-- mqar:end -->\n")
    with pytest.raises(ValueError, match="<!-- other:start -->"):
        results.replace_between_markers(doc, "x", "other")


def test_task_variants_train_with_their_base_recipe():
    """`mqar-256x16` is MQAR at that point, trained with MQAR's recipe (short convolution);
    the CLI's task list is the library's."""
    from lln.data.tasks import OWN_DATA_TASKS, TASK_NAMES, TASK_VARIANTS
    from lln.train.command import TASKS

    assert TASKS == (*TASK_NAMES, *TASK_VARIANTS, *OWN_DATA_TASKS)
    config = TrainConfig(task="mqar-256x16", attn="lln").resolved()
    assert config.short_conv == 3
    assert config.steps == TrainConfig(task="mqar", attn="lln").resolved().steps
    with pytest.raises(ValueError, match="mqar-64x4"):
        TrainConfig(task="mqar-1x1", attn="lln").resolved()


def test_resume_after_a_real_kill(tmp_path):
    """SIGKILL a `lln train` process mid-run (possibly mid-checkpoint), resume it, and get the
    metrics and parameters of an uninterrupted run exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["mqar", "--attn", "lln", "--size", "tiny", "--steps", "300", "--eval-every", "50",
            "--checkpoint-every", "7", "--threads", "1", "--no-progress"]
    base = [sys.executable, "-m", "lln.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*base, "--out", str(tmp_path / "full")], check=True, env=env)
    process = subprocess.Popen([*base, "--out", str(tmp_path / "cut")], env=env)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(log)) < 120:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(read_metrics(log)) < 306, "the run finished before it could be killed"
    subprocess.run([*base, "--out", str(tmp_path / "cut"), "--resume"], check=True, env=env)
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)
    pa, pb = final_parameters(tmp_path / "full"), final_parameters(tmp_path / "cut")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
