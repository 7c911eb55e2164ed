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

Context parallelism (``context_parallel = P > 1``, causal tasks with ``lln`` / ``lln_diag``):
the ranks form groups of P consecutive ranks; every rank of a group takes the same examples
and its slice of every sequence (:func:`split_sequence`: the batch is right-padded to a
multiple of P tokens and cut into P equal slices), and the attention layers run
:mod:`lln.distributed` over the group. The ``world_size / P`` groups are data-parallel
replicas (2-D: data x context). Losses are sums over labelled tokens, so the same global
count and summed gradients give the single-process gradient here too.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is a no-op, so the
trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    """This process's place in the group: ``rank`` in ``[0, world_size)``; with context
    parallelism, ``context_parallel`` consecutive ranks share each sequence."""

    rank: int = 0
    world_size: int = 1
    context_parallel: int = 1
    context_group: Any = None

    @property
    def data_rank(self) -> int:
        """Index of this rank's data-parallel replica (its group of context ranks)."""
        return self.rank // self.context_parallel

    @property
    def data_size(self) -> int:
        """Number of data-parallel replicas."""
        return self.world_size // self.context_parallel

    @property
    def context_rank(self) -> int:
        """Which slice of each sequence this rank holds."""
        return self.rank % self.context_parallel

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(context_parallel: int = 1) -> Context:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), with the gloo backend; a single process otherwise.
    ``context_parallel > 1``: also form the groups of that many consecutive ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if context_parallel < 1 or world_size % context_parallel:
        raise ValueError(
            f"context_parallel must be a positive divisor of the number of processes "
            f"({world_size}; launch with torchrun --nproc-per-node), got {context_parallel}"
        )
    if world_size <= 1:
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = None
    if context_parallel > 1:
        for first in range(0, world_size, context_parallel):  # every rank creates every group
            ranks = list(range(first, first + context_parallel))
            created = dist.new_group(ranks)
            if rank in ranks:
                group = created
    return Context(rank=rank, world_size=world_size, context_parallel=context_parallel,
                   context_group=group)


def teardown(ctx: Context) -> None:
    """Leave the process group. All ranks meet at a barrier first: a rank that destroys its
    gloo group while a peer is still sending makes the peer's gloo thread abort the process
    ("terminate called without an active exception"), seen under CPU load."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: list[int], ctx: Context) -> list[int]:
    """This rank's contiguous slice of a global batch (its size must divide evenly); the
    ranks of one context-parallel group take the same slice."""
    if len(indices) % ctx.data_size:
        raise ValueError(
            f"the global batch size ({len(indices)}) must be divisible by the number of "
            f"data-parallel replicas ({ctx.data_size})"
        )
    per_rank = len(indices) // ctx.data_size
    return indices[ctx.data_rank * per_rank : (ctx.data_rank + 1) * per_rank]


def context_parallel(model: nn.Module, ctx: Context) -> None:
    """Make ``model`` (a causal :class:`~lln.models.DecoderLM`) run its attention over the
    context-parallel group of ``ctx``; no-op without context parallelism."""
    if ctx.context_parallel == 1:
        return
    from ..models.transformer import Block, Trunk

    for module in model.modules():
        if isinstance(module, Block):
            if module.conv is not None:
                raise ValueError(
                    "context parallelism does not support short_conv (its window would "
                    "need the previous rank's tokens); use --short-conv 0"
                )
            if module.attn.attention not in ("lln", "lln_diag") or not module.attn.is_causal:
                raise ValueError(
                    "context parallelism needs a causal task with attention 'lln' or "
                    f"'lln_diag', got {module.attn.attention!r}"
                )
            module.attn.context_group = ctx.context_group
        elif isinstance(module, Trunk):
            module.context_rank = ctx.context_rank


def split_sequence(batch: dict[str, Tensor], ctx: Context) -> dict[str, Tensor]:
    """This rank's slice of every sequence of a collated causal batch: ``input_ids``,
    ``key_padding_mask`` and per-token ``target`` right-padded to a multiple of
    ``context_parallel`` tokens and cut into equal slices. Unchanged without context
    parallelism."""
    p = ctx.context_parallel
    if p == 1:
        return batch
    width = batch["input_ids"].shape[1]
    padded = -(-width // p) * p
    per_rank = padded // p
    start = ctx.context_rank * per_rank
    out = dict(batch)
    # (the padded ids are masked out and unlabelled: their value does not matter)
    for key, value in (("input_ids", 0), ("key_padding_mask", False), ("target", -100)):
        t = batch[key]
        if padded != width:
            t = torch.cat([t, torch.full((t.shape[0], padded - width), value, dtype=t.dtype)], 1)
        out[key] = t[:, start : start + per_rank]
    return out


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
