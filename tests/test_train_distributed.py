"""Data-parallel training: 2 processes launched by torchrun (gloo) equal 1 process.

Both train the same tiny ListOps model (LLN+Diag, padded variable-length batches) with the
same global batch of 4; with 2 processes each rank takes 2 examples per step, divides its
summed loss by the global count and the gradients are summed. The two runs differ only in
the order of floating-point additions, so after 6 AdamW steps the parameters agree to
float32 rounding: ``rtol=1e-4, atol=1e-6`` (measured: max abs difference 6e-8), and the logged
losses and the final metrics to ``rel 1e-5``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lln.data.tasks import get_task
from lln.train.checkpoint import load_checkpoint, seed_everything
from lln.train.config import TrainConfig
from lln.train.metrics import read_metrics
from lln.train.trainer import build_model, train

ARGS = dict(task="listops", attn="lln_diag", size="tiny", steps=6, batch_size=4,
            eval_every=3, seed=3)


def test_two_processes_equal_one(tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainConfig(out=str(single_dir), progress=False, **ARGS))
    finally:
        torch.set_num_threads(threads)

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "2", "-m", "lln.cli", "train", ARGS["task"], "--attn", ARGS["attn"],
        "--size", ARGS["size"], "--steps", "6", "--batch-size", "4", "--eval-every", "3",
        "--seed", "3", "--out", str(ddp_dir), "--threads", "1", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ddp = json.loads((ddp_dir / "summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    for split in ("val", "test"):
        for key, value in single[split].items():
            assert ddp[split][key] == pytest.approx(value, rel=1e-5), (split, key)
    a, b = read_metrics(single_dir / "metrics.jsonl"), read_metrics(ddp_dir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    pa = load_checkpoint(single_dir / "checkpoint.pt")["model"]
    pb = load_checkpoint(ddp_dir / "checkpoint.pt")["model"]
    for key in pa:
        torch.testing.assert_close(pb[key], pa[key], rtol=1e-4, atol=1e-6)
    # training moved the parameters far beyond that tolerance, so the agreement means something
    config = TrainConfig(out=str(tmp_path), **ARGS).resolved()
    seed_everything(config.seed)
    initial = build_model(get_task("listops", size="tiny"), config).state_dict()
    moved = max((pa[k] - initial[k]).abs().max().item() for k in pa)
    assert moved > 1e-3
