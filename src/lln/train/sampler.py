"""``BatchOrder``: the deterministic, resumable order of training examples.

Epoch ``e`` visits the training set in the permutation drawn from a generator seeded with
``(seed, e)``; consecutive global batches are consecutive slices of it, and the last
incomplete slice of an epoch is dropped (every batch has the same size). The whole state
is ``(epoch, position)``: saving it in a checkpoint and loading it back continues with the
very same batches, in every process of a data-parallel group.
"""

from __future__ import annotations

import torch

from ..ops._validation import check_positive_int


class BatchOrder:
    """Global batches of ``batch_size`` indices into a dataset of ``num_examples``."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples = check_positive_int(num_examples, "num_examples")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        if self.batch_size > self.num_examples:
            raise ValueError(
                f"batch_size ({batch_size}) exceeds the number of training examples "
                f"({num_examples})"
            )
        self.seed = int(seed)
        self.epoch, self.position = 0, 0
        self._permutation = self._draw(0)

    def _draw(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        """The next global batch (a list of ``batch_size`` indices)."""
        if self.position + self.batch_size > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0
            self._permutation = self._draw(self.epoch)
        batch = self._permutation[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_examples", "batch_size"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume: the checkpoint's data order has {key}={state[key]}, this "
                    f"run has {key}={mine[key]}"
                )
        self.epoch, self.position = state["epoch"], state["position"]
        self._permutation = self._draw(self.epoch)
