"""Context-parallel training: 2 processes sharing every sequence equal 1 process (and 4
processes = 2 data-parallel replicas x 2 context ranks).

``lln train shakespeare --context-parallel 2`` under torchrun (gloo): both ranks take the
same examples, each its half of every 32-token window, and the LLN+Diag layers (block size
12, so a diagonal block crosses the rank boundary) run over ``lln.distributed``. The
per-step training losses over 20 steps and the validation losses agree with one process to
``rel 1e-5`` (measured: <= 3e-7), the final parameters to ``rtol=1e-4, atol=1e-6`` (the data
parallel test's tolerance). The helpers are tested without processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lln.data.tasks import collate, get_task
from lln.train import distributed
from lln.train.checkpoint import load_checkpoint
from lln.train.config import TrainConfig
from lln.train.metrics import read_metrics
from lln.train.trainer import build_model, train

ARGS = ["shakespeare", "--attn", "lln_diag", "--attn-option", "block_size=12", "--size",
        "tiny", "--steps", "20", "--eval-every", "10", "--seed", "2", "--threads", "1",
        "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4], ids=["2x_context", "2x_data_2x_context"])
def test_context_parallel_processes_train_like_one(tmp_path, processes):
    single_dir, cp_dir = tmp_path / "single", tmp_path / "cp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(task="shakespeare", attn="lln_diag", size="tiny", steps=20,
                          eval_every=10, seed=2, attn_options={"block_size": 12},
                          out=str(single_dir), progress=False))
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(processes), "-m", "lln.cli", "train", *ARGS,
               "--out", str(cp_dir), "--context-parallel", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((cp_dir / "summary.json").read_text())
    config = json.loads((cp_dir / "config.json").read_text())
    assert summary["world_size"] == processes and config["context_parallel"] == 2
    a, b = read_metrics(single_dir / "metrics.jsonl"), read_metrics(cp_dir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    assert sum(r["split"] == "train" for r in a) == 20
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra
    assert a[-1]["loss"] < a[0]["loss"] - 0.5  # it trained
    pa = load_checkpoint(single_dir / "checkpoint.pt")["model"]
    pb = load_checkpoint(cp_dir / "checkpoint.pt")["model"]
    for key in pa:
        torch.testing.assert_close(pb[key], pa[key], rtol=1e-4, atol=1e-6)


def test_split_sequence_pads_and_slices():
    task = get_task("shakespeare", size="tiny")
    items = [task.train[0], (task.train[1][0][:-5], task.train[1][1][:-5])]
    batch = collate(items, task.pad_id)  # widths 32 and 27
    width = batch["input_ids"].shape[1]
    parts = [distributed.split_sequence(batch, distributed.Context(rank=r, world_size=3,
                                                                   context_parallel=3))
             for r in range(3)]
    padded = -(-width // 3) * 3
    for key in ("input_ids", "key_padding_mask", "target"):
        assert all(p[key].shape == (2, padded // 3) for p in parts)
        joined = torch.cat([p[key] for p in parts], 1)
        assert torch.equal(joined[:, :width], batch[key])
    joined_mask = torch.cat([p["key_padding_mask"] for p in parts], 1)
    joined_target = torch.cat([p["target"] for p in parts], 1)
    assert not joined_mask[:, width:].any() and (joined_target[:, width:] == -100).all()
    one = distributed.Context()
    assert distributed.split_sequence(batch, one) is batch
    # data-parallel replicas: 4 processes = 2 replicas x 2 context ranks
    ctx = distributed.Context(rank=3, world_size=4, context_parallel=2)
    assert (ctx.data_rank, ctx.data_size, ctx.context_rank) == (1, 2, 1)
    assert distributed.shard(list(range(8)), ctx) == [4, 5, 6, 7]


def test_context_parallel_refuses_what_it_cannot_split(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="context_parallel must be a positive divisor"):
        distributed.setup(3)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="context_parallel must be a positive divisor"):
        distributed.setup(2)
    ctx = distributed.Context(rank=0, world_size=2, context_parallel=2)
    task = get_task("shakespeare", size="tiny")
    for attn, short_conv, message in (("softmax", 0, "attention 'lln' or 'lln_diag'"),
                                      ("lln", 3, "short_conv")):
        config = TrainConfig(task="shakespeare", attn=attn, size="tiny", out="unused",
                             short_conv=short_conv).resolved()
        with pytest.raises(ValueError, match=message):
            distributed.context_parallel(build_model(task, config), ctx)
