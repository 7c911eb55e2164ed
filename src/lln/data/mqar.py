"""MQAR: multi-query associative recall, as in the Zoology benchmark.

One sample of length ``seq_len`` with ``num_pairs`` key-value pairs and vocabulary ``V``:

- keys are distinct ids from ``[1, V/2)``, values distinct ids from ``[V/2, V)``;
- positions ``0 .. 2*num_pairs - 1`` hold the context ``k1 v1 k2 v2 ...``;
- the rest is the query region. Each key is asked once, at position
  ``2*num_pairs + 2*gap`` with distinct gaps ``gap in [0, (seq_len - 2*num_pairs) // 2)``
  drawn without replacement with probability proportional to ``(gap + 1) ** (power_a - 1)``
  (a power law: most queries come soon after the context, a few much later);
- every other query-region position holds a random id from ``[1, V)`` (noise);
- the target is the key's value at each query position and ``-100`` everywhere else.

A causal model sees the key at the query position and must output its value, so
accuracy is counted over the labelled positions only. Id 0 is padding and never occurs.
Two references: a uniform guess over the value range scores ``1 / (V - V/2)``
(``TaskData.chance``); answering any one of the sample's ``num_pairs`` context values,
without matching keys, scores ``1 / num_pairs`` (``TaskData.baselines``). Only accuracy
clearly above the second shows actual recall.
Standard points (``seq_len``, ``num_pairs``): :data:`MQAR_POINTS`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .tasks import IGNORE_INDEX, PAD_ID, SequenceDataset, TaskData, resolve_config

#: (seq_len, num_pairs) points of the Zoology benchmark kept by this library.
MQAR_POINTS = ((64, 4), (128, 8), (256, 16))

DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=16, num_pairs=2, vocab_size=32, power_a=0.01,
                 n_train=64, n_val=32, n_test=32),
    "small": dict(seq_len=128, num_pairs=8, vocab_size=256, power_a=0.01,
                  n_train=20000, n_val=500, n_test=1000),
    "full": dict(seq_len=256, num_pairs=16, vocab_size=8192, power_a=0.01,
                 n_train=100000, n_val=3000, n_test=3000),
}

_SPLITS = ("train", "val", "test")


def _check_options(seq_len: int, num_pairs: int, vocab_size: int, power_a: float) -> None:
    for name, value in (("seq_len", seq_len), ("num_pairs", num_pairs),
                        ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if vocab_size // 2 - 1 < num_pairs:
        raise ValueError(
            f"vocab_size must leave at least num_pairs ({num_pairs}) keys in [1, vocab_size/2), "
            f"i.e. vocab_size >= {2 * num_pairs + 2}; got {vocab_size}"
        )
    if (seq_len - 2 * num_pairs) // 2 < num_pairs:
        raise ValueError(
            f"seq_len must fit the context and one query slot per key, i.e. seq_len >= "
            f"{4 * num_pairs}; got seq_len={seq_len} for num_pairs={num_pairs}"
        )
    if not 0.0 < power_a <= 1.0:
        raise ValueError(f"power_a must be in (0, 1], got {power_a!r}")


def generate_mqar(
    n: int,
    *,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` MQAR samples (see the module doc).

    Args:
        n: number of samples.
        seq_len: sequence length ``L``.
        num_pairs: key-value pairs per sample.
        vocab_size: ``V``; keys from ``[1, V/2)``, values from ``[V/2, V)``.
        power_a: exponent ``a`` of the gap distribution ``p(gap) ~ (gap + 1) ** (a - 1)``.
        generator: torch random generator (seeded by the caller for reproducibility).

    Returns:
        ``(inputs, targets)``, both ``LongTensor (n, L)``; targets are ``-100`` except at
        the ``num_pairs`` query positions of each row.
    """
    _check_options(seq_len, num_pairs, vocab_size, power_a)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    half = vocab_size // 2
    context = 2 * num_pairs
    slots = (seq_len - context) // 2
    rows = torch.arange(n).unsqueeze(1)

    # distinct keys and values per row: the first num_pairs entries of a random permutation
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :num_pairs] + 1
    values = (
        torch.rand(n, vocab_size - half, generator=generator).argsort(dim=1)[:, :num_pairs] + half
    )

    inputs = torch.randint(1, vocab_size, (n, seq_len), generator=generator)  # noise
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values

    gap_weights = (torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1.0))
    gaps = torch.multinomial(gap_weights.expand(n, slots), num_pairs, replacement=False,
                             generator=generator) if n > 0 else torch.zeros(0, num_pairs).long()
    query_pos = context + 2 * gaps
    inputs[rows, query_pos] = keys
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[rows, query_pos] = values
    return inputs, targets


def _split(n: int, config: dict[str, Any], seed: int, index: int) -> SequenceDataset:
    # one independent stream per (seed, split): the test set does not depend on n_train
    generator = torch.Generator().manual_seed(1_000_003 * seed + index)
    inputs, targets = generate_mqar(
        n, seq_len=config["seq_len"], num_pairs=config["num_pairs"],
        vocab_size=config["vocab_size"], power_a=config["power_a"], generator=generator,
    )
    return SequenceDataset(list(inputs), list(targets))


def build(*, size: str, seed: int, overrides: dict[str, Any]) -> TaskData:
    """The ``mqar`` task (see :func:`lln.data.tasks.get_task`)."""
    config = resolve_config("mqar", DEFAULTS, size, overrides)
    _check_options(config["seq_len"], config["num_pairs"], config["vocab_size"],
                   config["power_a"])
    train, val, test = (
        _split(config[f"n_{name}"], config, seed, i) for i, name in enumerate(_SPLITS)
    )
    values_per_key = config["vocab_size"] - config["vocab_size"] // 2
    return TaskData(
        name="mqar", kind="recall", vocab_size=config["vocab_size"],
        num_classes=config["vocab_size"], max_len=config["seq_len"], pad_id=PAD_ID,
        train=train, val=val, test=test, metric="accuracy", chance=1 / values_per_key,
        causal=True, baselines={"context_value_guess": 1 / config["num_pairs"]},
        config={**config, "seed": seed},
    )
