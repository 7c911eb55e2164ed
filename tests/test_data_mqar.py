"""MQAR: every labelled position asks for the value paired with its key in the context."""

from __future__ import annotations

import pytest
import torch

from lln.data.mqar import MQAR_POINTS, generate_mqar
from lln.data.tasks import IGNORE_INDEX, get_task


def _sample(n=64, seq_len=64, num_pairs=4, vocab_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return generate_mqar(n, seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size,
                         generator=g)


def _perfect_recall(inputs: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """An oracle that reads the context and answers every later key with its value."""
    out = torch.full_like(inputs, IGNORE_INDEX)
    for r, row in enumerate(inputs.tolist()):
        table = {row[2 * i]: row[2 * i + 1] for i in range(num_pairs)}
        for p in range(2 * num_pairs, len(row)):
            if row[p] in table:
                out[r, p] = table[row[p]]
    return out


@pytest.mark.parametrize("seq_len,num_pairs", MQAR_POINTS)
def test_semantics_at_standard_points(seq_len, num_pairs):
    vocab = 256
    inputs, targets = _sample(n=32, seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab)
    assert inputs.shape == targets.shape == (32, seq_len)
    assert inputs.dtype == targets.dtype == torch.long
    assert int(inputs.min()) >= 1 and int(inputs.max()) < vocab  # 0 = pad never occurs
    ctx = 2 * num_pairs
    for row_in, row_t in zip(inputs.tolist(), targets.tolist(), strict=True):
        keys, values = row_in[0:ctx:2], row_in[1:ctx:2]
        assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs
        assert all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        pairs = dict(zip(keys, values, strict=True))
        labelled = [p for p, t in enumerate(row_t) if t != IGNORE_INDEX]
        assert len(labelled) == num_pairs
        assert all(p >= ctx and (p - ctx) % 2 == 0 for p in labelled)
        # each key is asked exactly once, and the label is its paired value
        assert sorted(row_in[p] for p in labelled) == sorted(keys)
        for p in labelled:
            assert row_t[p] == pairs[row_in[p]]


def test_perfect_recall_scores_one_and_guessing_scores_chance():
    inputs, targets = _sample(n=200, seq_len=128, num_pairs=8, vocab_size=128)
    answers = _perfect_recall(inputs, 8)
    mask = targets != IGNORE_INDEX
    assert (answers[mask] == targets[mask]).all()
    guess = torch.randint(64, 128, targets.shape, generator=torch.Generator().manual_seed(1))
    acc = (guess[mask] == targets[mask]).double().mean().item()
    assert abs(acc - 1 / 64) < 0.01


def test_context_value_guess_baseline():
    """Answering a random value of the sample's own context scores 1 / num_pairs."""
    inputs, targets = _sample(n=400, seq_len=64, num_pairs=4, vocab_size=64)
    g = torch.Generator().manual_seed(2)
    pick = torch.randint(0, 4, targets.shape, generator=g)
    context_values = inputs[:, 1:8:2]  # (n, 4)
    guess = context_values.gather(1, pick)
    mask = targets != IGNORE_INDEX
    acc = (guess[mask] == targets[mask]).double().mean().item()
    assert abs(acc - 0.25) < 0.04
    task = get_task("mqar", size="tiny", num_pairs=3, seq_len=20)
    assert task.baselines["context_value_guess"] == pytest.approx(1 / 3)


def test_gaps_follow_a_power_law():
    """Queries cluster right after the context (p(gap) ~ 1/gap), unlike uniform placement."""
    seq_len, num_pairs = 256, 16
    _, targets = _sample(n=200, seq_len=seq_len, num_pairs=num_pairs, vocab_size=256)
    rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    gaps = (pos - 2 * num_pairs) // 2
    slots = (seq_len - 2 * num_pairs) // 2  # 112
    # uniform choice of 16 of 112 slots would put the median near 56
    assert gaps.double().median().item() < slots / 4
    assert int(gaps.max()) < slots and int(gaps.min()) == 0
    assert int(gaps.max()) > slots / 2  # the tail is reached


def test_seeded():
    a, b = _sample(seed=5), _sample(seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = _sample(seed=6)
    assert not torch.equal(a[0], c[0])


def test_validation():
    with pytest.raises(ValueError, match="seq_len"):
        generate_mqar(1, seq_len=15, num_pairs=4, vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_mqar(1, seq_len=64, num_pairs=4, vocab_size=9)
    with pytest.raises(ValueError, match="num_pairs"):
        generate_mqar(1, seq_len=64, num_pairs=0, vocab_size=64)
    with pytest.raises(ValueError, match="power_a"):
        generate_mqar(1, seq_len=64, num_pairs=4, vocab_size=64, power_a=0.0)


def test_task_tiny_and_points():
    task = get_task("mqar", size="tiny")
    assert (task.kind, task.causal, task.metric) == ("recall", True, "accuracy")
    assert task.num_classes == task.vocab_size == 32
    assert (len(task.train), len(task.val), len(task.test)) == (64, 32, 32)
    x, y = task.train[0]
    assert x.shape == y.shape == (task.max_len,)
    assert abs(task.chance - 1 / 16) < 1e-12
    # splits come from independent streams: the test set does not depend on n_train
    bigger = get_task("mqar", size="tiny", n_train=100)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(task.test, bigger.test, strict=True))
    assert not torch.equal(task.train[0][0], task.test[0][0])
    for seq_len, num_pairs in MQAR_POINTS:
        point = get_task("mqar", size="tiny", seq_len=seq_len, num_pairs=num_pairs,
                         vocab_size=256)
        assert point.max_len == seq_len
        assert int((point.test[0][1] != IGNORE_INDEX).sum()) == num_pairs
