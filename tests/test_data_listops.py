"""ListOps: golden expressions, the generator's guarantees and the task's splits."""

from __future__ import annotations

import random

import pytest

from lln.data import listops
from lln.data.listops import (
    VOCAB,
    decode,
    encode,
    evaluate,
    evaluate_tokens,
    generate_trees,
    parse,
    to_tokens,
)
from lln.data.tasks import get_task

GOLDEN = [
    ("7", 7),
    ("[MIN 4 7 ]", 4),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    # MED truncates the mean of the two middle values of an even-length list
    ("[MED 1 2 ]", 1),
    ("[MED 3 8 ]", 5),
    ("[MED 0 0 1 1 ]", 0),
    ("[MED 7 8 9 9 ]", 8),
    ("[MED 1 9 4 ]", 4),
    ("[MED 9 0 5 5 2 ]", 5),
    # SM is the sum modulo 10
    ("[SM 5 7 ]", 2),
    ("[SM 9 9 9 ]", 7),
    ("[SM 0 0 ]", 0),
    ("[SM 1 2 3 4 ]", 0),
    # nesting
    ("[SM [MAX 9 1 ] [MIN 8 3 ] ]", 2),
    ("[MIN [MAX [SM 4 6 ] 3 ] 5 ]", 3),
    ("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", 5),
    ("[MED [SM 5 5 5 ] [MAX 0 1 ] [MIN 9 8 7 ] [SM 9 9 ] ]", 6),  # MED(5, 1, 7, 8) = int(6.0)
]


@pytest.mark.parametrize("text,value", GOLDEN)
def test_golden_values(text, value):
    assert evaluate(parse(text)) == value
    assert evaluate_tokens(text.split()) == value


@pytest.mark.parametrize("text,_", GOLDEN)
def test_tokens_round_trip(text, _):
    tree = parse(text)
    assert to_tokens(tree) == text.split()
    ids = encode(text.split())
    assert decode(ids) == text.split()
    assert int(ids.min()) >= 1 and int(ids.max()) < len(VOCAB)


@pytest.mark.parametrize("bad", ["", "[MAX 1", "]", "1 2", "[FOO 1 2 ]", "[MAX ]", "12"])
def test_malformed_expressions_raise(bad):
    with pytest.raises(ValueError):
        parse(bad)
    with pytest.raises(ValueError):
        evaluate_tokens(bad.split())


def test_vocab_layout():
    assert VOCAB[0] == "<pad>"
    assert VOCAB[1:11] == tuple(str(d) for d in range(10))
    assert set(VOCAB[11:]) == {"[MIN", "[MAX", "[MED", "[SM", "]"}
    with pytest.raises(ValueError, match="unknown ListOps token"):
        encode(["[MAX", "x", "]"])


def _depth(tree) -> int:
    return 1 if isinstance(tree, int) else 1 + max(_depth(a) for a in tree[1])


def _arities(tree):
    if isinstance(tree, int):
        return []
    return [len(tree[1])] + [n for a in tree[1] for n in _arities(a)]


def test_generator_guarantees():
    trees = generate_trees(200, seed=3, min_length=20, max_length=120, max_depth=6, max_args=5)
    assert len(trees) == 200
    assert len({tuple(to_tokens(t)) for t in trees}) == 200  # distinct
    for t in trees:
        n = len(to_tokens(t))
        assert 20 < n < 120
        assert _depth(t) <= 6
        assert all(2 <= a <= 5 for a in _arities(t))
        assert evaluate(t) == evaluate_tokens(to_tokens(t))
    # every operator and every answer shows up in a sample this size
    ops = {tok for t in trees for tok in to_tokens(t) if tok.startswith("[")}
    assert ops == {"[MIN", "[MAX", "[MED", "[SM"}
    assert {evaluate(t) for t in trees} == set(range(10))


def test_lra_length_bounds():
    trees = generate_trees(10, seed=0)  # the LRA defaults: 500 < length < 2000
    assert all(500 < len(to_tokens(t)) < 2000 for t in trees)
    assert all(_depth(t) <= 10 for t in trees)


def test_generator_is_seeded():
    a = generate_trees(30, seed=1, min_length=10, max_length=60)
    b = generate_trees(30, seed=1, min_length=10, max_length=60)
    c = generate_trees(30, seed=2, min_length=10, max_length=60)
    assert a == b
    assert a != c
    # a longer list extends the shorter one (dedupe keeps generation order)
    assert generate_trees(40, seed=1, min_length=10, max_length=60)[:30] == a


def test_early_stop_keeps_the_unbounded_tree():
    """Abandoning a tree at the length budget never changes a tree that fits the budget."""
    for seed in range(300):
        full = listops._sample_tree(random.Random(seed), budget=10**9, max_depth=6, max_args=10,
                                    leaf_prob=0.75)
        bounded = listops._sample_tree(random.Random(seed), budget=60, max_depth=6, max_args=10,
                                       leaf_prob=0.75)
        if full[1] < 60:
            assert bounded == full
        else:
            assert bounded is None


def test_generator_validation():
    with pytest.raises(ValueError, match="max_length"):
        generate_trees(1, min_length=10, max_length=11)
    with pytest.raises(ValueError, match="leaf_prob"):
        generate_trees(1, leaf_prob=0.0)
    with pytest.raises(ValueError, match="max_args"):
        generate_trees(1, max_args=1)
    with pytest.raises(RuntimeError, match="widen the length bounds"):
        # depth 2 allows at most 2 + 10 tokens
        generate_trees(1, min_length=20, max_length=40, max_depth=2)


def test_task_tiny():
    task = get_task("listops", size="tiny", seed=0)
    assert (task.kind, task.metric, task.num_classes, task.causal) == ("classify", "accuracy",
                                                                       10, False)
    assert (len(task.train), len(task.val), len(task.test)) == (64, 32, 32)
    seen = set()
    for split in (task.train, task.val, task.test):
        for ids, label in split:
            tokens = decode(ids)
            assert 10 < len(tokens) < 40 and len(tokens) <= task.max_len
            assert int(label) == evaluate_tokens(tokens)
            assert label.shape == ()
            seen.add(tuple(tokens))
    assert len(seen) == 128  # splits are disjoint and free of duplicates
    again = get_task("listops", size="tiny", seed=0)
    assert all((a[0] == b[0]).all() for a, b in zip(task.test, again.test, strict=True))
    other = get_task("listops", size="tiny", seed=1)
    assert any(a[0].shape != b[0].shape or (a[0] != b[0]).any()
               for a, b in zip(task.test, other.test, strict=True))


def test_task_overrides():
    task = get_task("listops", size="tiny", min_length=30, max_length=80, n_train=5)
    assert len(task.train) == 5 and task.max_len == 79
    assert all(30 < len(x) < 80 for x, _ in task.train)
    assert task.config["min_length"] == 30
