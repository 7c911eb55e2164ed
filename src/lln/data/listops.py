"""ListOps (Long Range Arena): nested MIN / MAX / MED / SM expressions over digits.

An expression is a tree. A leaf is a digit ``0-9``; an inner node is an operator applied to
2-10 arguments, written ``[OP arg1 arg2 ... ]``:

- ``MIN``, ``MAX``: smallest / largest argument;
- ``MED``: median, truncated to an int (``[MED 1 2 ]`` = int(1.5) = 1);
- ``SM``: sum modulo 10.

The label is the value of the whole expression, so there are 10 classes.

Generation follows LRA's generator: a node at depth ``max_depth`` (the root has depth 1) is a
leaf; above that it becomes an operator with probability ``1 - leaf_prob`` and a leaf
otherwise. LRA's code draws ``r ~ U(0, 1)`` and makes a leaf when ``r > 0.25``, so
``leaf_prob = 0.75``; with leaf probability 0.25 the trees almost surely explode and no
sample under 2000 tokens would survive. Expressions are kept when
``min_length < tokens < max_length`` (exclusive bounds, as in LRA), duplicates are dropped in
generation order, and the unique expressions are cut into train / val / test in that order,
so the splits are disjoint.

Trees are plain Python values: a leaf is an ``int``, a node is ``(op, (arg, ...))`` with
``op`` in :data:`OPERATORS`.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .tasks import PAD_ID, SequenceDataset, TaskData, majority_accuracy, resolve_config

OPERATORS = ("MIN", "MAX", "MED", "SM")
CLOSE = "]"
#: Vocabulary: 0 = pad, then the digits, the four operators and the closing bracket.
VOCAB: tuple[str, ...] = ("<pad>", *(str(d) for d in range(10)), *(f"[{op}" for op in OPERATORS),
                          CLOSE)
TOKEN_TO_ID = {token: i for i, token in enumerate(VOCAB)}
NUM_CLASSES = 10

Tree = int | tuple[str, tuple["Tree", ...]]

DEFAULTS: dict[str, dict[str, Any]] = {
    # a few dozen short expressions: for tests
    "tiny": dict(min_length=10, max_length=40, max_depth=10, max_args=10, leaf_prob=0.75,
                 n_train=64, n_val=32, n_test=32),
    # the results grid: LRA's generator, shorter sequences (see docs/tasks.md)
    "small": dict(min_length=100, max_length=400, max_depth=10, max_args=10, leaf_prob=0.75,
                  n_train=8000, n_val=500, n_test=1000),
    # LRA: 500 < length < 2000, 96k / 2k / 2k
    "full": dict(min_length=500, max_length=2000, max_depth=10, max_args=10, leaf_prob=0.75,
                 n_train=96000, n_val=2000, n_test=2000),
}


def apply_operator(op: str, values: Sequence[int]) -> int:
    """Value of ``[op values... ]`` for digit arguments (see the module doc)."""
    if len(values) == 0:
        raise ValueError(f"operator {op} needs at least one argument")
    if op == "MIN":
        return min(values)
    if op == "MAX":
        return max(values)
    if op == "MED":
        return int(statistics.median(values))
    if op == "SM":
        return sum(values) % 10
    raise ValueError(f"op must be one of {OPERATORS}, got {op!r}")


def evaluate(tree: Tree) -> int:
    """Value of an expression tree (an int in 0-9)."""
    if isinstance(tree, int):
        if not 0 <= tree <= 9:
            raise ValueError(f"leaves must be digits 0-9, got {tree}")
        return tree
    op, args = tree
    return apply_operator(op, [evaluate(arg) for arg in args])


def evaluate_tokens(tokens: Iterable[str]) -> int:
    """Value of a token sequence, computed with a stack (independent of :func:`evaluate`).

    Raises:
        ValueError: the tokens are not one well-formed expression.
    """
    stack: list[list[Any]] = []  # open operators: [op, argument values...]
    result: int | None = None
    for token in tokens:
        if result is not None:
            raise ValueError(f"tokens continue after a complete expression: {token!r}")
        if token.startswith("[") and token[1:] in OPERATORS:
            stack.append([token[1:]])
            continue
        if token == CLOSE:
            if not stack or len(stack[-1]) == 1:
                raise ValueError("']' without an open operator that has arguments")
            op, *values = stack.pop()
            value = apply_operator(op, values)
        elif token.isdigit() and len(token) == 1:
            value = int(token)
        else:
            raise ValueError(f"unknown ListOps token {token!r}")
        if stack:
            stack[-1].append(value)
        else:
            result = value
    if result is None:
        raise ValueError("incomplete expression (unclosed operator or no tokens)")
    return result


def to_tokens(tree: Tree) -> list[str]:
    """The token sequence of a tree, e.g. ``["[MAX", "2", "9", "]"]``."""
    if isinstance(tree, int):
        return [str(tree)]
    op, args = tree
    tokens = [f"[{op}"]
    for arg in args:
        tokens.extend(to_tokens(arg))
    tokens.append(CLOSE)
    return tokens


def parse(text: str | Sequence[str]) -> Tree:
    """Parse ``"[MAX 2 9 [MIN 4 7 ] 0 ]"`` (or its token list) into a tree."""
    tokens = text.split() if isinstance(text, str) else list(text)
    stack: list[tuple[str, list[Tree]]] = []
    root: Tree | None = None
    for token in tokens:
        if root is not None:
            raise ValueError(f"tokens continue after a complete expression: {token!r}")
        if token.startswith("[") and token[1:] in OPERATORS:
            stack.append((token[1:], []))
            continue
        if token == CLOSE:
            if not stack or not stack[-1][1]:
                raise ValueError("']' without an open operator that has arguments")
            op, args = stack.pop()
            node: Tree = (op, tuple(args))
        elif token.isdigit() and len(token) == 1:
            node = int(token)
        else:
            raise ValueError(f"unknown ListOps token {token!r}")
        if stack:
            stack[-1][1].append(node)
        else:
            root = node
    if root is None:
        raise ValueError("incomplete expression (unclosed operator or no tokens)")
    return root


def encode(tokens: Sequence[str]) -> Tensor:
    """Token strings -> ids ``LongTensor (L,)`` (see :data:`VOCAB`)."""
    try:
        return torch.tensor([TOKEN_TO_ID[t] for t in tokens], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"unknown ListOps token {err.args[0]!r}") from None


def decode(ids: Iterable[int] | Tensor) -> list[str]:
    """Ids -> token strings, dropping padding."""
    return [VOCAB[int(i)] for i in ids if int(i) != PAD_ID]


def _sample_tree(
    rng: random.Random, *, budget: int, max_depth: int, max_args: int, leaf_prob: float
) -> tuple[Tree, int] | None:
    """One tree and its token count, or None as soon as it reaches ``budget`` tokens.

    Stopping early changes nothing about the trees that are kept: a tree is abandoned exactly
    when its full length would be >= budget.
    """
    draw = rng.random  # uniform in [0, 1); int(draw() * k) is uniform over range(k)
    n_ops, arity_span = len(OPERATORS), max_args - 1

    def node(depth: int, budget: int) -> tuple[Tree, int] | None:
        if depth >= max_depth or draw() < leaf_prob:
            return int(draw() * 10), 1
        op = OPERATORS[int(draw() * n_ops)]
        length = 2  # "[OP" and "]"
        args: list[Tree] = []
        for _ in range(2 + int(draw() * arity_span)):  # 2 .. max_args arguments
            sub = node(depth + 1, budget - length)
            if sub is None:
                return None
            args.append(sub[0])
            length += sub[1]
            if length >= budget:
                return None
        return (op, tuple(args)), length

    return node(1, budget)


def generate_trees(
    n: int,
    *,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    leaf_prob: float = 0.75,
) -> list[Tree]:
    """``n`` distinct random expressions with ``min_length < tokens < max_length``.

    Args:
        n: number of expressions.
        seed: seed of the generator (``random.Random``); same arguments, same list.
        min_length, max_length: exclusive bounds on the token count.
        max_depth: depth at which every node is a leaf (the root has depth 1).
        max_args: largest operator arity (the smallest is 2).
        leaf_prob: probability that a node above ``max_depth`` is a leaf.

    Returns:
        The expressions in generation order (duplicates dropped).

    Raises:
        ValueError: an option out of range.
        RuntimeError: the bounds are so tight that samples cannot be found.
    """
    for name, value, low in (("n", n, 0), ("min_length", min_length, 0),
                             ("max_depth", max_depth, 1), ("max_args", max_args, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(max_length, int) or max_length <= min_length + 1:
        raise ValueError(
            f"max_length must be an int > min_length + 1 ({min_length + 1}), got {max_length!r}"
        )
    if not 0.0 < leaf_prob <= 1.0:
        raise ValueError(f"leaf_prob must be in (0, 1], got {leaf_prob!r}")
    rng = random.Random(seed)
    seen: set[Tree] = set()  # a tree and its token sequence determine each other
    trees: list[Tree] = []
    attempts, max_attempts = 0, 10_000 + 2_000 * n
    while len(trees) < n:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(
                f"found only {len(trees)} of {n} distinct expressions with {min_length} < "
                f"length < {max_length} in {max_attempts} attempts; widen the length bounds"
            )
        sample = _sample_tree(rng, budget=max_length, max_depth=max_depth, max_args=max_args,
                              leaf_prob=leaf_prob)
        if sample is None or sample[1] <= min_length or sample[0] in seen:
            continue
        seen.add(sample[0])
        trees.append(sample[0])
    return trees


def _dataset(trees: Sequence[Tree]) -> SequenceDataset:
    inputs = [encode(to_tokens(t)) for t in trees]
    targets = [torch.tensor(evaluate(t), dtype=torch.long) for t in trees]
    return SequenceDataset(inputs, targets)


def _labels(dataset: SequenceDataset) -> list[int]:
    return [int(t) for t in dataset.targets]


def build(*, size: str, seed: int, overrides: dict[str, Any]) -> TaskData:
    """The ``listops`` task (see :func:`lln.data.tasks.get_task`)."""
    config = resolve_config("listops", DEFAULTS, size, overrides)
    counts = [config["n_train"], config["n_val"], config["n_test"]]
    trees = generate_trees(
        sum(counts), seed=seed, min_length=config["min_length"],
        max_length=config["max_length"], max_depth=config["max_depth"],
        max_args=config["max_args"], leaf_prob=config["leaf_prob"],
    )
    train = trees[: counts[0]]
    val = trees[counts[0] : counts[0] + counts[1]]
    test = trees[counts[0] + counts[1] :]
    train_set, val_set, test_set = _dataset(train), _dataset(val), _dataset(test)
    majority = majority_accuracy(_labels(train_set), _labels(test_set))
    return TaskData(
        name="listops", kind="classify", vocab_size=len(VOCAB), num_classes=NUM_CLASSES,
        max_len=config["max_length"] - 1, pad_id=PAD_ID, train=train_set,
        val=val_set, test=test_set, metric="accuracy", chance=1 / NUM_CLASSES,
        causal=False, baselines={"majority_class": majority}, config={**config, "seed": seed},
    )
