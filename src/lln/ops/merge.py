"""Merging the causal LLN states of consecutive segments (the math of context parallelism).

The causal state (:class:`~lln.ops.state.LLNState`) of a sequence is a sum over its keys,
stored relative to a per-dimension offset ``k_max``::

    kv    = sum_j exp(beta_j k_j - k_max) v_j^T
    k_sum = sum_j exp(beta_j k_j - k_max)
    k_max = max_j beta_j k_j          (per feature dim; -inf before the first key)

so the state of ``A`` followed by ``B`` is, with ``m = max(k_max_A, k_max_B)``::

    kv    = kv_A    exp(k_max_A - m) + kv_B    exp(k_max_B - m)
    k_sum = k_sum_A exp(k_max_A - m) + k_sum_B exp(k_max_B - m)
    k_max = m

(the rescaling of online softmax; every factor is <= 1, nothing overflows). The one
subtlety is ``beta_j``: with moment matching it is a function of the statistics of every
token up to ``j`` (prefix moments), so the summary of ``B`` must be computed with the prefix
moments of ``A`` — :func:`without_sums` gives the state to start ``B`` from: ``A``'s
position, moments and unfinished diagonal block, with empty sums. The moment sums
themselves are plain sums and add (:func:`add_moments`).

Offsets carry no gradient (any offset gives the same output); gradients flow through
``kv`` and ``k_sum`` of both parts.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from .moment_matching import PrefixMoments
from .state import LLNState

#: Tokens per step of :func:`segment_sums` (keeps its temporaries cache-sized).
SUMS_STEP = 4096


def merge_sums(
    first: tuple[Tensor, Tensor, Tensor], second: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``(kv, k_sum, k_max)`` of a segment followed by another, from theirs.

    Shapes ``kv (B, H, D, Dv)``, ``k_sum (B, H, D)``, ``k_max (B, H, D)`` (leading dims may
    broadcast). A dimension where neither part has seen a key stays ``(0, -inf)``.
    """
    kv_a, ks_a, km_a = first
    kv_b, ks_b, km_b = second
    with torch.no_grad():
        m = torch.maximum(km_a, km_b)
        scale_a = torch.exp(km_a - m).nan_to_num(0.0)  # -inf - -inf: nothing seen -> 0
        scale_b = torch.exp(km_b - m).nan_to_num(0.0)
    kv = kv_a * scale_a.unsqueeze(-1) + kv_b * scale_b.unsqueeze(-1)
    k_sum = ks_a * scale_a + ks_b * scale_b
    return kv, k_sum, m


def add_moments(a: PrefixMoments | None, b: PrefixMoments | None) -> PrefixMoments | None:
    """The moment sums of two segments together (None counts as empty)."""
    if a is None or b is None:
        return b if a is None else a
    return PrefixMoments(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in fields(a)})


def without_sums(state: LLNState) -> LLNState:
    """``state`` with empty sums: where to start the summary of the segment that follows.

    Keeps the position, the moment sums (so moment matching continues the true prefix
    statistics) and the unfinished diagonal block; ``kv``, ``k_sum`` are zero and ``k_max``
    is -inf. Running a segment from it and merging (:func:`merge_states`) equals running
    the segment from ``state``.
    """
    return replace(
        state,
        kv=torch.zeros_like(state.kv),
        k_sum=torch.zeros_like(state.k_sum),
        k_max=torch.full_like(state.k_max, float("-inf")),
    )


def merge_states(first: LLNState, second: LLNState) -> LLNState:
    """The state after two consecutive segments.

    ``first``: the state after segment A. ``second``: the state after segment B computed
    from ``without_sums(first)`` (so its position, moments and unfinished block already
    count A). Returns the state one call over A then B would return: ``first``'s sums
    merged with ``second``'s (:func:`merge_sums`), everything else from ``second``.
    """
    if not isinstance(first, LLNState) or not isinstance(second, LLNState):
        raise TypeError(
            f"first and second must be lln.LLNState, got {type(first).__name__}, "
            f"{type(second).__name__}"
        )
    if first.shape != second.shape:
        raise ValueError(
            f"first and second must have one (batch, heads, dim, value_dim), got "
            f"{first.shape} and {second.shape}"
        )
    if second.position < first.position:
        raise ValueError(
            f"second must continue first (computed from without_sums(first)): its position "
            f"{second.position} is before first's {first.position}"
        )
    kv, k_sum, k_max = merge_sums(
        (first.kv, first.k_sum, first.k_max), (second.kv, second.k_sum, second.k_max)
    )
    return replace(second, kv=kv, k_sum=k_sum, k_max=k_max)


def segment_sums(
    k: Tensor, v: Tensor, beta: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(kv, k_sum, k_max)`` of one segment's keys alone, without computing any output.

    ``k (B, H, N, D)``, ``v (B, H, N, Dv)``; ``beta`` the per-token key scales in the compute
    dtype, broadcastable to ``(B, H, N, 1)`` (as returned by
    :func:`lln.ops.lln.feature_scales`; gradients flow into it when it requires them);
    ``mask (B, N)`` bool, True = real token, or None. Sums are in the dtype of ``beta``;
    equal, to rounding, to the sums of a causal call over the segment from an empty state.

    Costs ``O(N * D * Dv)`` in ``SUMS_STEP``-token steps; backward (hand-derived) recomputes
    the features step by step, so nothing of size N is saved beyond the inputs, and writes
    the gradients of k and v into one buffer each.
    """
    with torch.no_grad():
        k_max = torch.full(k.shape[:2] + k.shape[3:], float("-inf"), dtype=beta.dtype,
                           device=k.device)
        for _, k_s, beta_s, mask_s in _steps(k, beta, mask):
            k_max = torch.maximum(k_max, _masked(k_s.to(beta.dtype) * beta_s, mask_s).amax(-2))
        offset = torch.where(torch.isfinite(k_max), k_max, torch.zeros_like(k_max))
    kv, k_sum = _SegmentSums.apply(k, v, beta, mask, offset)
    return kv, k_sum, k_max


def _steps(k: Tensor, beta: Tensor, mask: Tensor | None):
    """``(start, k, beta, mask)`` of each ``SUMS_STEP``-token step (views)."""
    for s in range(0, k.shape[2], SUMS_STEP):
        yield (
            s,
            k[:, :, s : s + SUMS_STEP],
            beta if beta.shape[2] == 1 else beta[:, :, s : s + SUMS_STEP],
            None if mask is None else mask[:, s : s + SUMS_STEP],
        )


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x.masked_fill(~mask[:, None, :, None], float("-inf"))


def _features(k: Tensor, beta: Tensor, mask: Tensor | None, offset: Tensor) -> Tensor:
    """``exp(beta k - offset)`` in the compute dtype, exact 0 on padded keys."""
    return _masked(k.to(offset.dtype) * beta - offset.unsqueeze(-2), mask).exp_()


class _SegmentSums(torch.autograd.Function):
    """``kv = sum_j f_j v_j^T``, ``k_sum = sum_j f_j`` with ``f_j = exp(beta_j k_j - c)``.

    Backward, with ``G_kv``, ``G_ks`` the incoming gradients::

        dv_j = G_kv^T f_j
        df_j = G_kv v_j + G_ks,   dk_j = beta_j f_j * df_j,   dbeta_j = sum_d k_jd f_jd df_jd
    """

    @staticmethod
    def forward(ctx, k, v, beta, mask, offset):  # type: ignore[override]
        cdt = offset.dtype
        kv = k.new_zeros(*k.shape[:2], k.shape[3], v.shape[3], dtype=cdt)
        k_sum = k.new_zeros(*k.shape[:2], k.shape[3], dtype=cdt)
        for s, k_s, beta_s, mask_s in _steps(k, beta, mask):
            feat = _features(k_s, beta_s, mask_s, offset)
            kv.add_(feat.transpose(-1, -2) @ v[:, :, s : s + SUMS_STEP].to(cdt))
            k_sum.add_(feat.sum(-2))
        ctx.save_for_backward(k, v, beta, mask, offset)
        return kv, k_sum

    @staticmethod
    def backward(ctx, g_kv, g_ks):  # type: ignore[override]
        k, v, beta, mask, offset = ctx.saved_tensors
        need_k, need_v, need_beta = ctx.needs_input_grad[:3]
        grad_k = torch.empty_like(k) if need_k else None
        grad_v = torch.empty_like(v) if need_v else None
        grad_beta = torch.zeros_like(beta) if need_beta else None
        for s, k_s, beta_s, mask_s in _steps(k, beta, mask):
            feat = _features(k_s, beta_s, mask_s, offset)
            v_s = v[:, :, s : s + SUMS_STEP].to(offset.dtype)
            if need_v:
                grad_v[:, :, s : s + SUMS_STEP] = feat @ g_kv
            if need_k or need_beta:
                d_exp = (v_s @ g_kv.transpose(-1, -2)).add_(g_ks.unsqueeze(-2))
                d_exp.mul_(feat)  # gradient of the exponent beta_j k_j
                if need_k:
                    grad_k[:, :, s : s + SUMS_STEP] = d_exp * beta_s
                if need_beta:
                    part = (d_exp * k_s.to(offset.dtype)).sum(-1, keepdim=True)
                    if beta.shape[2] == 1:
                        grad_beta += part.sum_to_size(beta.shape)
                    else:
                        grad_beta[:, :, s : s + SUMS_STEP] += part.sum_to_size(beta_s.shape)
        return grad_k, grad_v, grad_beta, None, None
