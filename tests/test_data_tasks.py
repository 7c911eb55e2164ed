"""get_task and collate: the contract the models and the trainer rely on."""

from __future__ import annotations

import time

import pytest
import torch

from lln.data.tasks import IGNORE_INDEX, TASK_NAMES, TASK_VARIANTS, collate, get_task


def _available(name: str) -> bool:
    try:
        get_task(name, size="tiny")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tiny_task_contract(name):
    if not _available(name):
        pytest.skip(f"data package for {name} is not installed")
    start = time.perf_counter()
    task = get_task(name, size="tiny")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"tiny {name} took {elapsed:.2f} s (target < 1 s on a quiet machine)"
    assert task.name == name
    assert task.kind in {"classify", "lm", "recall"}
    assert task.metric == ("bits_per_byte" if task.kind == "lm" else "accuracy")
    assert task.causal == (task.kind != "classify")
    assert task.pad_id == 0
    assert 0 < task.chance < (8.0 + 1e-9 if task.kind == "lm" else 1.0)
    for split in (task.train, task.val, task.test):
        assert len(split) > 0
        for ids, target in split:
            assert ids.dtype == torch.long and ids.dim() == 1
            assert 1 <= ids.numel() <= task.max_len
            assert int(ids.min()) >= 1 and int(ids.max()) < task.vocab_size  # no pad inside
            if task.kind == "classify":
                assert target.shape == () and 0 <= int(target) < task.num_classes
            else:
                assert target.shape == ids.shape
                real = target[target != IGNORE_INDEX]
                assert real.numel() > 0
                assert int(real.min()) >= 1 and int(real.max()) < task.num_classes


def test_unknown_names_sizes_and_options():
    with pytest.raises(ValueError, match="valid tasks.*mqar-256x16"):
        get_task("imdb")
    with pytest.raises(ValueError, match="size"):
        get_task("listops", size="huge")
    with pytest.raises(ValueError, match="valid options"):
        get_task("mqar", size="tiny", seq_length=64)
    with pytest.raises(ValueError, match="seed"):
        get_task("mqar", size="tiny", seed=-1)


@pytest.mark.parametrize("name", TASK_VARIANTS)
def test_task_variants_fix_their_options(name):
    """`mqar-256x16` = `mqar` with seq_len 256 and 16 pairs: same data, its own name; the
    fixed options cannot be overridden."""
    base, fixed = TASK_VARIANTS[name]
    variant = get_task(name, size="tiny", n_train=4, vocab_size=64)
    plain = get_task(base, size="tiny", n_train=4, vocab_size=64, **fixed)
    assert variant.name == name and plain.name == base
    assert {k: variant.config[k] for k in fixed} == fixed
    assert variant.max_len == fixed["seq_len"]
    for a, b in zip(variant.test, plain.test, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="fixes"):
        get_task(name, size="tiny", num_pairs=2)


def test_collate_classify_pads_right():
    batch = [(torch.tensor([3, 4, 5]), torch.tensor(2)), (torch.tensor([7]), torch.tensor(0))]
    out = collate(batch, pad_id=0)
    assert torch.equal(out["input_ids"], torch.tensor([[3, 4, 5], [7, 0, 0]]))
    assert torch.equal(out["key_padding_mask"],
                       torch.tensor([[True, True, True], [True, False, False]]))
    assert torch.equal(out["lengths"], torch.tensor([3, 1]))
    assert torch.equal(out["target"], torch.tensor([2, 0]))


def test_collate_per_position_targets():
    batch = [
        (torch.tensor([1, 2]), torch.tensor([2, 9])),
        (torch.tensor([4, 5, 6]), torch.tensor([-100, 6, 7])),
    ]
    out = collate(batch, pad_id=0)
    assert torch.equal(out["target"], torch.tensor([[2, 9, IGNORE_INDEX], [-100, 6, 7]]))
    assert out["input_ids"].shape == (2, 3) and int(out["input_ids"][0, 2]) == 0


def test_collate_errors():
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="length"):
        collate([(torch.tensor([1, 2]), torch.tensor([1]))], pad_id=0)
    with pytest.raises(ValueError, match="scalars"):
        collate([(torch.tensor([1]), torch.tensor(1)), (torch.tensor([1]), torch.tensor([1]))])
    with pytest.raises(TypeError, match="1-D torch.long"):
        collate([(torch.tensor([1.0]), torch.tensor(1))])


def test_collate_with_a_dataloader():
    task = get_task("listops", size="tiny")
    loader = torch.utils.data.DataLoader(
        task.train, batch_size=8, collate_fn=lambda b: collate(b, task.pad_id)
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8
    # the mask is exactly "not padding" for ListOps (no pad id inside a sequence)
    assert torch.equal(batch["key_padding_mask"], batch["input_ids"] != task.pad_id)
