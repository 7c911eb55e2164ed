"""Context parallelism: one long causal sequence split over the processes of a group.

Rank ``r`` of a ``torch.distributed`` process group holds a contiguous slice of the tokens
(rank 0 the first, shards may have different lengths) and calls
:func:`lln_attention` / :func:`lln_diag_attention` with its slice; every rank gets the
outputs of its own tokens, equal to the single-process op's (to rounding), and backward
gives every rank the gradients of its own q, k, v. What crosses process boundaries are the
causal state summaries (``O(H * D * Dv)`` numbers per sequence and rank), never tokens
(except, for LLN+Diag, the fewer than ``block_size`` tokens of a diagonal block cut by a
rank boundary).

One call, on every rank (see docs/distributed.md for the math):

1. Local moment sums of q and k (moment matching), all-gathered with the shard lengths
   (no gradient: the scales are statistics, as in the single-process op).
2. The exclusive prefix of the earlier ranks' moment sums gives this shard's true prefix
   statistics, hence its per-token ``beta``; with it the shard's key summary
   ``(kv, k_sum, k_max)`` (:func:`lln.ops.merge.segment_sums`, ``O(N * D * Dv)``).
3. The summaries (and, for LLN+Diag, the last ``block_size - 1`` keys and values) are
   all-gathered with an autograd-aware collective, whose backward (an all-reduce) gives
   each rank the sum of the gradients that later ranks computed for its summary.
4. The earlier ranks' summaries are merged (:func:`lln.ops.merge.merge_sums`) into the state
   before this shard, and the public single-process op runs the shard from that state.

Backward is collective like the forward: every rank of the group must run it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from .ops._validation import check_qkv
from .ops.block_diag import check_block_args
from .ops.lln import check_lln_args, feature_scales
from .ops.lln import lln_attention as _lln_attention
from .ops.lln_diag import lln_diag_attention as _lln_diag_attention
from .ops.merge import add_moments, merge_sums, segment_sums
from .ops.moment_matching import PrefixMoments
from .ops.state import LLNState

__all__ = ["CommunicationCounter", "communication", "lln_attention", "lln_diag_attention"]


@dataclass
class CommunicationCounter:
    """Bytes this process received through the collectives of the context-parallel ops.

    ``forward`` counts the all-gathers of the forward passes (shard lengths and moment
    sums, state summaries, LLN+Diag halos); ``backward`` the reverse exchange of the
    summary gradients (an all-reduce of the gathered ``(P, payload)`` gradient: a ring
    receives ``2 (P - 1) / P`` of it), counted when the forward records a graph. Reset
    with :meth:`reset`.
    """

    forward: int = 0
    backward: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.forward = self.backward = self.calls = 0


#: The counter of this process (see :class:`CommunicationCounter`).
communication = CommunicationCounter()

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def lln_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = True,
    key_padding_mask: Tensor | None = None,
    alpha: float | Tensor | None = None,
    beta: float | Tensor | None = None,
    stats: str = "head",
    temperature: float = 1.0,
    constants: str = "paper",
    eps: float = 0.0,
    chunk_size: int = 64,
    initial_state: LLNState | None = None,
    output_final_state: bool = False,
    checkpoint: bool = False,
) -> Tensor | tuple[Tensor, LLNState]:
    """Context-parallel causal :func:`lln.lln_attention` over the ranks of ``group``.

    Args:
        q, k: ``(B, H, N_r, D)``, v: ``(B, H, N_r, Dv)``: this rank's tokens, the ``r``-th
            contiguous slice of the sequence in rank order (``N_r >= 1``, may differ per
            rank). B, H, D, Dv and the dtype must agree over the group.
        group: the process group (None: the default group). Any backend (gloo, NCCL).
        is_causal: must be True (context parallelism splits a causal sequence).
        key_padding_mask: this rank's ``(B, N_r)`` slice of the mask (True = real token).
        initial_state: the state before rank 0's first token (the same on every rank), e.g.
            the last rank's final state of a previous context-parallel call.
        output_final_state: also return the state after this rank's last token (the last
            rank's is the state of the whole sequence, to continue decoding).
        alpha, beta, stats, temperature, constants, eps, chunk_size, checkpoint: as in
            :func:`lln.lln_attention`. Tensor alpha/beta get this rank's share of their
            gradient (sum over the group for the full one, as DDP does).

    Returns:
        ``out (B, H, N_r, Dv)`` in the dtype of v, or ``(out, state)``.
    """
    _check_causal(is_causal)
    mask = check_lln_args(
        q, k, v, is_causal=True, key_padding_mask=key_padding_mask, alpha=alpha, beta=beta,
        stats=stats, temperature=temperature, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state, block_size=None,
        constants=constants, checkpoint=checkpoint,
    )
    state = _prefix_state(
        q, k, v, mask, group=group, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, constants=constants, initial_state=initial_state,
        block_size=None,
    )
    return _lln_attention(
        q, k, v, is_causal=True, key_padding_mask=key_padding_mask, alpha=alpha, beta=beta,
        stats=stats, temperature=temperature, constants=constants, eps=eps,
        chunk_size=chunk_size, initial_state=state, output_final_state=output_final_state,
        checkpoint=checkpoint,
    )


def lln_diag_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = True,
    key_padding_mask: Tensor | None = None,
    alpha: float | Tensor | None = None,
    beta: float | Tensor | None = None,
    stats: str = "head",
    temperature: float = 1.0,
    constants: str = "paper",
    eps: float = 0.0,
    chunk_size: int = 64,
    block_size: int | None = None,
    scale: float | None = None,
    lln_weight: float | Tensor = 0.5,
    diag_weight: float | Tensor = 0.5,
    initial_state: LLNState | None = None,
    output_final_state: bool = False,
    checkpoint: bool = False,
) -> Tensor | tuple[Tensor, LLNState]:
    """Context-parallel causal :func:`lln.lln_diag_attention` over the ranks of ``group``.

    Arguments as in :func:`lln_attention` (this module) plus ``block_size``, ``scale``,
    ``lln_weight``, ``diag_weight`` of :func:`lln.lln_diag_attention`. Diagonal blocks stay
    aligned to the start of the whole sequence: a block cut by a rank boundary gets the
    keys and values of its first part from the earlier rank(s) (a halo of fewer than
    ``block_size`` tokens), so shard lengths need not be multiples of the block size.
    """
    _check_causal(is_causal)
    check_qkv(q, k, v, same_length=True)
    block_size, _ = check_block_args(block_size, scale, q.shape[-1])
    mask = check_lln_args(
        q, k, v, is_causal=True, key_padding_mask=key_padding_mask, alpha=alpha, beta=beta,
        stats=stats, temperature=temperature, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state,
        block_size=block_size, constants=constants, checkpoint=checkpoint,
    )
    state = _prefix_state(
        q, k, v, mask, group=group, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, constants=constants, initial_state=initial_state,
        block_size=block_size,
    )
    return _lln_diag_attention(
        q, k, v, is_causal=True, key_padding_mask=key_padding_mask, alpha=alpha, beta=beta,
        stats=stats, temperature=temperature, constants=constants, eps=eps,
        chunk_size=chunk_size, block_size=block_size, scale=scale, lln_weight=lln_weight,
        diag_weight=diag_weight, initial_state=state, output_final_state=output_final_state,
        checkpoint=checkpoint,
    )


def _check_causal(is_causal: object) -> None:
    if is_causal is not True:
        raise ValueError(
            f"is_causal must be True for context parallelism (a non-causal output depends on "
            f"every token of every rank), got {is_causal!r}"
        )


def _gather(tensor: Tensor, group, world: int) -> list[Tensor]:
    """All-gather without gradient; counts the bytes received."""
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    communication.forward += (world - 1) * tensor.numel() * tensor.element_size()
    return out


class _AllGather(torch.autograd.Function):
    """All-gather ``(M,) -> (P, M)`` whose backward hands each rank the sum over all ranks of
    the gradients of its own slice (an all-reduce of the ``(P, M)`` gradient: available on
    every backend, unlike reduce-scatter on gloo)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        out = tensor.new_empty((dist.get_world_size(group), tensor.numel()))
        dist.all_gather(list(out.unbind(0)), tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def _prefix_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    group,
    alpha,
    beta,
    stats: str,
    temperature: float,
    constants: str,
    initial_state: LLNState | None,
    block_size: int | None,
) -> LLNState:
    """The state before this rank's first token (sums of every earlier rank, true prefix
    moments, position, and for LLN+Diag the unfinished block), on every rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "lln.distributed needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    device = q.device
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    moment_matched = alpha is None
    groups = (h if stats == "head" else 1) if moment_matched else 0
    tail = 0 if block_size is None else block_size - 1

    # 1. shapes, shard lengths, local moment sums and the padding of the tail (no gradient)
    header = torch.tensor(
        [n, b, h, d, dv, _DTYPES.index(q.dtype), groups, tail], dtype=torch.float64,
        device=device,
    )
    headers = torch.stack(_gather(header, group, world)).tolist()
    if any(row[1:] != headers[0][1:] for row in headers):
        raise ValueError(
            "q, k, v must have one (batch, heads, dim, value_dim), dtype and mode on every "
            "rank; got (tokens, B, H, D, Dv, dtype, moment groups, halo) per rank: "
            f"{[[int(x) for x in row] for row in headers]}"
        )
    lengths = [int(row[0]) for row in headers]
    base = initial_state
    position = (0 if base is None else base.position) + sum(lengths[:rank])
    # this shard's own moment sums (from an empty prefix; the scales are not used)
    local_parts: list[Tensor] = [torch.zeros(0, dtype=torch.float64, device=device)]
    if moment_matched:
        _, _, local = feature_scales(
            q, k, is_causal=True, key_padding_mask=mask, alpha=None, beta=None, stats=stats,
            temperature=temperature, constants=constants,
        )
        local_parts += [getattr(local, f.name).reshape(-1) for f in fields(local)]
    if tail:
        real = torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask
        local_parts.append(_tail(real.to(torch.float64), tail, dim=1).reshape(-1))
    local_parts = torch.cat(local_parts)
    gathered = _gather(local_parts, group, world) if local_parts.numel() else [local_parts] * world
    moments = None if base is None else base.moments
    if moment_matched:
        size = b * groups
        for part in gathered[:rank]:
            sums = part[: 5 * size].view(5, b, groups)
            moments = add_moments(moments, PrefixMoments(*sums.unbind(0)))
        if moments is None:
            moments = PrefixMoments.zeros(b, groups, device)

    state = LLNState(
        kv=torch.zeros(b, h, d, dv, dtype=cdt, device=device),
        k_sum=torch.zeros(b, h, d, dtype=cdt, device=device),
        k_max=torch.full((b, h, d), float("-inf"), dtype=cdt, device=device),
        position=position, stats=stats if moment_matched else None, moments=moments,
        block_size=block_size,
    )

    # 2. this shard's key summary, with the per-token beta of the true prefix statistics
    _, beta_t, _ = feature_scales(
        q, k, is_causal=True, key_padding_mask=mask, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, state=state, constants=constants,
    )
    kv, k_sum, k_max = segment_sums(k, v, beta_t, mask)

    # 3. one autograd-aware all-gather of the summaries (and the halo keys / values)
    parts = [kv.reshape(-1), k_sum.reshape(-1), k_max.detach().reshape(-1)]
    if tail:
        parts += [_tail(x, tail, dim=2).to(cdt).reshape(-1) for x in (k, v)]
    payload = torch.cat(parts)
    summaries = _AllGather.apply(payload, group).unbind(0)
    size = payload.numel() * payload.element_size()
    communication.forward += (world - 1) * size
    # backward: a ring all-reduce of the (P, payload) gradients receives 2 (P-1)/P of it
    communication.backward += 2 * (world - 1) * size if payload.requires_grad else 0
    communication.calls += 1

    # 4. merge the earlier ranks' sums into the state before this shard
    sizes = [b * h * d * dv, b * h * d, b * h * d]
    if tail:
        sizes += [b * h * tail * d, b * h * tail * dv]
    sums = (state.kv, state.k_sum, state.k_max) if base is None else (
        base.kv, base.k_sum, base.k_max
    )
    for part in summaries[:rank]:
        kv_s, ks_s, km_s = part[: sum(sizes[:3])].split(sizes[:3])
        sums = merge_sums(
            sums, (kv_s.view(b, h, d, dv), ks_s.view(b, h, d), km_s.detach().view(b, h, d))
        )
    # Every rank's graph must reach the all-gather, so that every rank joins its backward
    # (a collective): add an exact zero that depends on this rank's own gathered part.
    own = summaries[rank][: b * h * d * dv].view(b, h, d, dv)
    kv_prefix = sums[0] + torch.where(torch.zeros_like(own, dtype=torch.bool), own, 0.0)
    state.kv, state.k_sum, state.k_max = kv_prefix, sums[1], sums[2]

    if tail:
        state.block_k, state.block_v, state.block_mask = _halo(
            base, gathered, summaries, lengths, rank, sizes, tail, (b, h, d, dv),
            k.dtype, block_size, position,
        )
    return state


def _tail(x: Tensor, length: int, dim: int) -> Tensor:
    """The last ``length`` entries of ``x`` along ``dim``, zero-padded at the front."""
    n = x.shape[dim]
    last = x.narrow(dim, max(n - length, 0), min(n, length))
    if n >= length:
        return last
    pad_shape = list(x.shape)
    pad_shape[dim] = length - n
    return torch.cat([x.new_zeros(pad_shape), last], dim)


def _halo(
    base: LLNState | None,
    gathered: list[Tensor],
    summaries: list[Tensor],
    lengths: list[int],
    rank: int,
    sizes: list[int],
    tail: int,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    block_size: int,
    position: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, values and mask of the unfinished diagonal block before this rank's tokens:
    the last ``position % block_size`` tokens of the base state's block and the earlier
    ranks' tails."""
    b, h, d, dv = shape
    keys, values, masks = [], [], []
    if base is not None and base.block_k is not None:
        keys.append(base.block_k)
        values.append(base.block_v)
        masks.append(base.block_mask)
    for s in range(rank):
        real = min(tail, lengths[s])
        k_s, v_s = summaries[s][sum(sizes[:3]) :].split(sizes[3:])
        keys.append(k_s.view(b, h, tail, d)[:, :, tail - real :].to(dtype))
        values.append(v_s.view(b, h, tail, dv)[:, :, tail - real :].to(dtype))
        m_s = gathered[s][-b * tail :].view(b, tail)[:, tail - real :]
        masks.append(m_s > 0.5)
    carried = position % block_size
    device = summaries[0].device
    if not keys:
        return (
            torch.zeros(b, h, 0, d, dtype=dtype, device=device),
            torch.zeros(b, h, 0, dv, dtype=dtype, device=device),
            torch.zeros(b, 0, dtype=torch.bool, device=device),
        )
    block_k = torch.cat(keys, 2)
    block_v = torch.cat(values, 2)
    block_mask = torch.cat(masks, 1)
    start = block_k.shape[2] - carried
    return block_k[:, :, start:], block_v[:, :, start:], block_mask[:, start:]
