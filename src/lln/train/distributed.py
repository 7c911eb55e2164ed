"""Data-parallel training on CPU with ``torch.distributed`` (gloo), launched by ``torchrun``.

The contract that makes N processes train exactly like one:

* Every process builds the same model from the same seed and sees the same *global* batch
  order (:class:`~lln.train.sampler.BatchOrder`); :func:`shard` hands each rank one
  contiguous slice of every global batch, so the union over ranks is the single-process batch.
* Each rank's loss is a *sum* over its examples (or labelled tokens) divided by the global
  count (:func:`all_reduce_sum` of the counts), and the model is wrapped (:func:`wrap`) in
  ``torch.nn.parallel.DistributedDataParallel`` with a communication hook that *sums* the
  gradients (DDP's default averages): the result is the gradient of the single-process
  mean loss, up to the order of floating-point additions. DDP overlaps the bucketed
  all-reduces with the rest of backward.
* Anything random inside the model is a pure function of the seed (random-feature
  projections) and identical on every rank; dropout (off by default) draws the same masks
  on every rank, which is fine for training but not equal to one process.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is a no-op, so the
trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    """This process's place in the group: ``rank`` in ``[0, world_size)``."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> Context:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), with the gloo backend; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size())


def teardown(ctx: Context) -> None:
    """Leave the process group. All ranks meet at a barrier first: a rank that destroys its
    gloo group while a peer is still sending makes the peer's gloo thread abort the process
    ("terminate called without an active exception"), seen under CPU load."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: list[int], ctx: Context) -> list[int]:
    """This rank's contiguous slice of a global batch (its size must divide evenly)."""
    if len(indices) % ctx.world_size:
        raise ValueError(
            f"the global batch size ({len(indices)}) must be divisible by the number of "
            f"processes ({ctx.world_size})"
        )
    per_rank = len(indices) // ctx.world_size
    return indices[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]


def all_reduce_sum(tensor: Tensor, ctx: Context) -> Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _sum_hook(group, bucket):  # (no annotations: DDP checks them, and they are strings here)
    """DDP communication hook: all-reduce a gradient bucket with SUM (no division)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` whose backward *sums* the gradients over the
    ranks; ``model`` itself in a single process. Checkpoints and evaluation use ``model``
    (the wrapper shares its parameters)."""
    if not ctx.distributed:
        return model
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
