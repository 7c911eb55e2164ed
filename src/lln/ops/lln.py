"""Linear Log-Normal attention: ``exp(alpha q)`` / ``exp(beta k)`` feature maps, linear in N.

``lln_attention`` computes, for every query i (SPEC section 3)::

    out_i = sum_j w_ij v_j / sum_j w_ij,   w_ij = exp(alpha_i q_i) . exp(beta_j k_j)

over the visible keys j (all real keys, or the real keys j <= i when causal), exactly —
without eps swamping small denominators and without overflow, in every dtype.

How it stays exact and stable:

* **Per-dimension key offsets.** Key features are stored as ``exp(beta k - c)`` with ``c``
  the per-dimension max of the scaled keys, and the query feature absorbs ``c``:
  ``exp(alpha q + c - mu)``, ``mu`` its max. The key reaching ``c_d`` in the dimension
  ``d`` that reaches ``mu`` contributes exactly 1 to the denominator, so the normalised
  denominator is >= 1 and never underflows (non-causal, and the carried causal state).
* **Causal, chunked.** Inside a chunk of ``C`` tokens the C x C block uses per-row offsets
  (``exp(alpha q_i - max)``, ``exp(beta k_j - r_j)`` and ``exp(r_j - m_i)`` with
  ``m_i = max_{j <= i} r_j``), so nothing after i enters query i, not even through an
  offset. Between chunks the state ``(kv, k_sum, k_max)`` is carried and rescaled when the
  running max grows. The two parts are joined with their log-scales like online softmax.
  Masked entries are exact zeros (``exp(-inf)``), so a huge future value can neither
  change the past nor leak NaN.
* **Precision.** Features and sums are float32 (float64 for float64 inputs); the output is
  cast back to the dtype of ``v``. Offsets carry no gradient (the output does not depend
  on them), so backward stores only O(N * (C + D) + (N / C) * D * Dv) per head.
* **Backward** is hand-derived (:mod:`lln.ops.lln_function`): forward keeps only the
  inputs, one log-denominator per row and the state entering each chunk; backward
  recomputes the chunk weights one segment at a time. The autograd-through-ops path
  below stays as the tested reference (:func:`reference_kernel`), where
  ``checkpoint=True`` runs each segment under activation checkpointing.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.utils.checkpoint
from torch import Tensor

from ._validation import (
    broadcast_param,
    check_bool,
    check_is_causal,
    check_key_padding_mask,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_qkv,
    compute_dtype,
    debug_enabled,
)
from .moment_matching import (
    PrefixMoments,
    check_constants_mode,
    check_stats_mode,
    moment_match_with_moments,
    resolve_constants,
)
from .recurrent import lln_step, takes_step_path
from .state import LLNState

NEG_INF = float("-inf")
#: Chunks per segment of the causal path (see ``_causal``).
SEGMENT_CHUNKS = 16


def segment_runner(fn: Callable, checkpoint: bool, *tensors: Tensor | None) -> Callable:
    """``fn`` itself, or ``fn`` under non-reentrant activation checkpointing when
    ``checkpoint`` is set and autograd records a graph through one of ``tensors``.

    Checkpointed, a call of ``fn`` keeps only its arguments for backward, which reruns it
    (without the RNG state: the kernels draw no random numbers). Without grad mode (or
    with nothing requiring grad) there is nothing to save, so ``fn`` runs as is.
    """
    if checkpoint and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    ):
        return partial(
            torch.utils.checkpoint.checkpoint, fn, use_reentrant=False, preserve_rng_state=False
        )
    return fn


def warn_lost_rows(lost: Tensor | int) -> None:
    """The RuntimeWarning for causal rows whose every term underflowed (see ``_causal``),
    pointing at the caller of the public op; nothing when ``lost`` is 0.

    Reading the count is a host access: it is done on CPU (no device to wait for) outside
    ``torch.compile``, and on other devices only in debug mode (:func:`lln.set_debug`), so
    the ops never synchronise with an accelerator by default.
    """
    if not isinstance(lost, Tensor):
        count = int(lost)
    elif debug_enabled() or (
        lost.device.type == "cpu" and not torch.compiler.is_compiling()
    ):
        count = int(lost)
    else:
        return
    if count:
        warnings.warn(
            f"causal LLN: {count} rows underflowed to a zero denominator and were set to "
            "0. Inside a chunk the offsets are per token, which covers exponents "
            "alpha*q + beta*k up to about +-80 apart in float32 (+-700 in float64); use "
            "smaller alpha/beta (a higher temperature) or float64.",
            RuntimeWarning,
            stacklevel=3,
        )


class _ReferenceFlag(threading.local):
    active = False


_reference = _ReferenceFlag()


@contextlib.contextmanager
def reference_kernel() -> Iterator[None]:
    """Run causal LLN through the autograd-through-ops kernel (the reference the
    hand-derived backward is tested against) inside the ``with`` block (this thread)."""
    before, _reference.active = _reference.active, True
    try:
        yield
    finally:
        _reference.active = before


def _finite_or_zero(x: Tensor) -> Tensor:
    """Replace -inf offsets (nothing seen yet) by 0 so that ``x - offset`` stays defined."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _safe_divide(
    num: Tensor, den: Tensor, eps: float, log_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """``num / den`` for sums stored relative to ``exp(log_scale)`` (the true denominator
    is ``den * exp(log_scale)``), with ``eps`` added to the TRUE denominator (so the result
    does not depend on the offsets, the chunking or the split), and rows whose denominator
    is 0 (no visible key, or every term underflowed) set to 0 instead of NaN.

    Returns ``(out, log_den)``: ``log_den = log(true den + eps)`` without gradient, +inf on
    rows set to 0 (their gradient is then exactly 0 in the hand-derived backward).
    """
    if eps:
        # eps * exp(-log_scale) overflows to inf only where the true den is negligible
        den = den + eps * torch.exp(-log_scale)
    with torch.no_grad():
        alive = den > 0
        log_den = torch.where(alive, den.log() + log_scale, float("inf"))
    out = num / torch.where(alive, den, torch.ones_like(den)).unsqueeze(-1)
    return out, log_den


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` over the shared leading dims as one ``torch.bmm``.

    A transposed operand stays a strided view (BLAS reads it transposed); ``matmul`` on 5-D
    tensors would copy it, costing a pass and, under autograd, a saved copy.
    """
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-2], *out.shape[-2:])


def feature_scales(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    alpha: float | Tensor | None,
    beta: float | Tensor | None,
    stats: str,
    temperature: float,
    state: LLNState | None = None,
    constants: str = "paper",
) -> tuple[Tensor, Tensor, PrefixMoments | None]:
    """``(alpha, beta, moments_after)`` in the compute dtype, shapes ``(B|1, H|1, N|1, 1)``.

    alpha/beta are moment-matched when None (continuing the prefix statistics of ``state``,
    with the ``constants`` mode's (a, b)), else broadcast from ``(B, H, 1, 1)``. Shared by the
    fast path and the quadratic oracle, so both see the very same feature maps.
    """
    cdt = compute_dtype(q.dtype)
    b, h = q.shape[:2]
    if alpha is None:
        fit_a, fit_b = resolve_constants(constants, q.shape[-1])
        alpha, beta, moments = moment_match_with_moments(
            q, k, stats=stats, is_causal=is_causal, key_padding_mask=key_padding_mask,
            temperature=temperature, moments=None if state is None else state.moments,
            a=fit_a, b=fit_b,
        )
    else:
        shape = (b, h, 1, 1)
        alpha = broadcast_param(alpha, "alpha", shape, dtype=cdt, device=q.device, positive=True)
        beta = broadcast_param(beta, "beta", shape, dtype=cdt, device=q.device, positive=True)
        moments = None
    return alpha, beta, moments


def check_lln_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    alpha: float | Tensor | None,
    beta: float | Tensor | None,
    stats: str,
    temperature: float,
    eps: float,
    chunk_size: int,
    initial_state: LLNState | None,
    output_final_state: bool,
    block_size: int | None,
    constants: str = "paper",
    checkpoint: bool = False,
) -> Tensor | None:
    """Validate the arguments shared by ``lln_attention`` and ``lln_diag_attention``.

    Returns the checked key padding mask.
    """
    check_qkv(q, k, v, same_length=is_causal or block_size is not None)
    mask = check_key_padding_mask(key_padding_mask, k)
    check_is_causal(is_causal)
    if (alpha is None) != (beta is None):
        raise ValueError("alpha and beta must be given together (or both None for moment matching)")
    check_stats_mode(stats, is_causal=is_causal and alpha is None)
    if check_constants_mode(constants) != "paper" and alpha is not None:
        raise ValueError(
            f"constants={constants!r} chooses the moment-matching constants, which explicit "
            "alpha, beta bypass; pass either alpha and beta or constants, not both"
        )
    check_positive_float(temperature, "temperature")
    check_nonnegative_float(eps, "eps")
    check_positive_int(chunk_size, "chunk_size")
    check_bool(checkpoint, "checkpoint")
    if (initial_state is not None or output_final_state) and not is_causal:
        raise ValueError(
            "initial_state / output_final_state need is_causal=True: a non-causal output "
            "depends on every key, so a sequence cannot be continued"
        )
    if initial_state is not None:
        _check_state(initial_state, q, v, stats=None if alpha is not None else stats,
                     block_size=block_size)
    return mask


def _check_state(
    state: object, q: Tensor, v: Tensor, *, stats: str | None, block_size: int | None
) -> None:
    if not isinstance(state, LLNState):
        raise TypeError(f"initial_state must be an lln.LLNState, got {type(state).__name__}")
    expected = (q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    if state.shape != expected:
        raise ValueError(
            f"initial_state was made for (batch, heads, dim, value_dim) = {state.shape}, "
            f"but q, v give {expected}"
        )
    if state.kv.dtype != compute_dtype(q.dtype):
        raise TypeError(
            f"initial_state holds {state.kv.dtype} sums, but inputs of dtype {q.dtype} "
            f"compute in {compute_dtype(q.dtype)}"
        )
    if state.kv.device != q.device:
        raise ValueError(f"initial_state is on {state.kv.device}, inputs on {q.device}")
    if state.position > 0 and state.stats != stats:
        raise ValueError(
            f"initial_state was built with stats={state.stats!r} (None = given alpha/beta), "
            f"this call uses {stats!r}"
        )
    if state.block_size != block_size and state.position > 0:
        where = "lln_attention" if state.block_size is None else "lln_diag_attention"
        raise ValueError(
            f"initial_state belongs to {where} with block_size={state.block_size}, "
            f"this call uses block_size={block_size}"
        )


def _noncausal(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, mask: Tensor | None, eps: float
) -> Tensor:
    """Non-causal LLN of ``q (B,H,L,D)``, ``k (B,H,S,D)``, ``v`` (compute dtype); one offset
    per feature dim."""
    qs, ks = q * alpha, k * beta
    with torch.no_grad():
        kmasked = ks if mask is None else ks.masked_fill(~mask[:, None, :, None], NEG_INF)
        c = _finite_or_zero(kmasked.amax(-2, keepdim=True))  # (B, H, 1, D)
    shifted = ks - c
    if mask is not None:
        shifted = shifted.masked_fill(~mask[:, None, :, None], NEG_INF)
    k_feat = torch.exp(shifted)  # <= 1, exact 0 on padded keys
    kv = k_feat.transpose(-1, -2) @ v  # (B, H, D, Dv)
    k_sum = k_feat.sum(-2)  # (B, H, D)
    q_plus = qs + c
    with torch.no_grad():
        mu = q_plus.amax(-1, keepdim=True)
    q_feat = torch.exp(q_plus - mu)
    num = q_feat @ kv
    den = (q_feat @ k_sum.unsqueeze(-1)).squeeze(-1)
    return _safe_divide(num, den, eps, mu.squeeze(-1))[0]


def _causal(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, mask: Tensor | None,
    state: LLNState, chunk_size: int, eps: float, checkpoint: bool = False,
    diag: tuple | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | int]:
    """Causal LLN over segments of ``SEGMENT_CHUNKS`` chunks, chained through the state.

    Working on segments keeps every temporary small enough for the CPU caches (and out of
    fresh ``mmap`` pages), which keeps time linear in N at long lengths. ``split`` (not
    slicing) keeps backward linear. ``q, k, v`` may be in the input dtype: each segment is
    cast to the compute dtype (that of the state) on its own.

    By default this runs :func:`lln.ops.lln_function.causal_lln`, an autograd Function
    with a hand-derived backward. Inside :func:`reference_kernel` it runs the original
    autograd-through-ops path instead (the tested reference), where ``checkpoint`` runs
    each segment under activation checkpointing (see ``segment_runner``).

    Returns ``(out (B,H,N,Dv), kv, k_sum, k_max, lost)`` with ``lost`` the number of rows
    whose every term underflowed (for :func:`warn_lost_rows`). Known limit: inside a chunk
    the offsets are scalars per token (they must not look ahead), so a query misaligned by
    more than the float range with every visible key's largest feature loses all its terms.
    In float32 that starts around sigma_tilde ~ 40, which moment matching reaches at input
    std ~ 4-5 (sigma = 3 gives 16 and is tested); it is reported with a RuntimeWarning rather
    than returned silently. The count is an output (the caller warns) so that recomputing a
    checkpointed segment in backward cannot warn a second time.
    """
    kv, k_sum, k_max = state.kv, state.k_sum, state.k_max
    if not _reference.active:
        from .lln_function import causal_lln  # (it builds on this module's kernel)

        return causal_lln(q, k, v, alpha, beta, mask, kv, k_sum, k_max, chunk_size, eps, diag)
    if diag is not None:
        raise ValueError("the reference kernel computes the diagonal part separately")
    segment = chunk_size * SEGMENT_CHUNKS
    n_segments = -(-q.shape[2] // segment)

    def pieces(t: Tensor | None, dim: int) -> list:
        """``t`` split into segments along ``dim``; repeated when it broadcasts there."""
        if t is None or t.shape[dim] == 1 or n_segments == 1:  # (no copy in backward)
            return [t] * n_segments
        return list(t.split(segment, dim))

    run = segment_runner(_scaled_segment, checkpoint, q, k, v, alpha, beta, kv, k_sum)
    outs, lost = [], 0
    for q_seg, k_seg, v_seg, a_seg, b_seg, mask_seg in zip(
        *(pieces(t, 2) for t in (q, k, v, alpha, beta)), pieces(mask, 1), strict=True
    ):
        out, kv, k_sum, k_max, lost_seg, *_ = run(
            q_seg, k_seg, v_seg, a_seg, b_seg, mask_seg, kv, k_sum, k_max, chunk_size, eps
        )
        outs.append(out)
        lost = lost + lost_seg
    return (outs[0] if n_segments == 1 else torch.cat(outs, 2)), kv, k_sum, k_max, lost


def _scaled_segment(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, mask: Tensor | None,
    kv: Tensor, k_sum: Tensor, k_max: Tensor, chunk_size: int, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One segment from the raw inputs: cast to the compute dtype, scale, run
    ``_causal_segment``. (Inside, so that a checkpoint keeps only views of the inputs.)"""
    cdt = kv.dtype
    return _causal_segment(
        q.to(cdt) * alpha, k.to(cdt) * beta, v.to(cdt), mask, kv, k_sum, k_max, chunk_size, eps
    )


def _chunk_layout(
    qs: Tensor, ks: Tensor, v: Tensor, mask: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, int]:
    """``qs, ks, v`` of one segment as ``(B, H, nC, C, .)`` chunks, zero-padded at the end,
    with the key mask ``(B, 1, nC, C, 1)`` (None when nothing is padded) and the pad."""
    b, h, n, d = qs.shape
    c = min(chunk_size, n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    real = mask
    if pad:
        qs, ks, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qs, ks, v))
        if real is None:
            real = torch.ones(b, n, dtype=torch.bool, device=qs.device)
        real = torch.nn.functional.pad(real, (0, pad), value=False)
    qc = qs.view(b, h, n_chunks, c, d)
    kc = ks.view(b, h, n_chunks, c, d)
    vc = v.contiguous().view(b, h, n_chunks, c, v.shape[-1])  # one copy, used by two matmuls
    # without padding nothing needs masking (saves several full passes, forward and backward)
    key_real = None if real is None else real.view(b, 1, n_chunks, c, 1)
    return qc, kc, vc, key_real, pad


def _chunk_offsets(
    kc: Tensor, key_real: Tensor | None, k_max: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The offsets of the chunked causal kernel (no gradient: any value gives the same
    output). Returns the scaled keys with padded ones at -inf, the per-key max ``r_j``
    ``(B, H, nC, C)``, its running max inside each chunk ``m_i``, the per-dim max of each
    chunk and the running per-dim max before / after each chunk ``(B, H, nC, D)``."""
    k_masked = kc if key_real is None else kc.masked_fill(~key_real, NEG_INF)
    row_max = k_masked.amax(-1)  # r_j: (B, H, nC, C), -inf on padded keys
    run_max = row_max.cummax(-1).values  # m_i = max_{j <= i in chunk} r_j
    chunk_max = k_masked.amax(-2)  # per-dim max of each chunk: (B, H, nC, D)
    # running per-dim max before / after each chunk, starting from the state's
    before_and_after = torch.cat([k_max.unsqueeze(2), chunk_max], 2).cummax(2).values
    return (
        k_masked, row_max, run_max, chunk_max, before_and_after[:, :, :-1],
        before_and_after[:, :, 1:],
    )


def _visible(row_max: Tensor, key_real: Tensor | None) -> Tensor:
    """``(.., C_i, C_j)`` bool: key j is real and j <= i inside the chunk."""
    c = row_max.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=row_max.device).tril()
    return causal if key_real is None else causal & torch.isfinite(row_max).unsqueeze(-2)


def _scan_states(xt: Tensor, level: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """Running sums of log-scaled states in one batched matmul (no per-chunk loop).

    ``xt (B, H, D, M, E)`` holds M states of ``(D, E)`` (stored per dim first: one matmul
    per dim), state m relative to ``exp(level_m)`` per dim (``level (B, H, M, D)``). Returns
    ``(R (B, H, D, M, E), top (B, H, M, D))`` with ``top_t = max_{m <= t} level_m`` and
    ``R_t = sum_{m <= t} exp(level_m - top_t) x_m`` (``m >= t`` when ``reverse``). Every
    weight is ``<= 1`` and is one ``exp`` of a difference (no product of decay factors, so
    nothing underflows that a sequential scan keeps). Locality: the weights of excluded
    states are exact zeros and non-finite entries of ``xt`` are kept out of the matmul
    (``xt`` is overwritten: they become 0) and added back as NaN (to their column ``e``,
    every dim ``d``) by a prefix sum along M, so a NaN/Inf in state m changes no ``R_t``
    before it (after it when ``reverse``), bit for bit."""
    m = xt.shape[-2]
    with torch.no_grad():
        flipped = level.flip(2) if reverse else level
        top = flipped.cummax(2).values
        top = top.flip(2) if reverse else top
        # w[t, m] = exp(level_m - top_t) per dim: (B, H, D, M_t, M_m); exp(-inf - -inf) -> 0
        w = (level.transpose(-1, -2).contiguous().unsqueeze(-2)
             - top.transpose(-1, -2).contiguous().unsqueeze(-1))
        w = w.exp_().nan_to_num_(0.0)
        keep = torch.ones(m, m, dtype=torch.bool, device=xt.device)
        keep = keep.triu() if reverse else keep.tril()
        w = w.masked_fill_(~keep, 0.0)
        # per state m and column e: 0 where the column is finite, NaN where not (min * 0 +
        # max * 0: no overflow, one pass), summed along M like the states. (Per column, so
        # that a NaN in one value dim reaches the same output dims as a sequential scan.)
        low, high = torch.aminmax(xt.detach(), dim=-3, keepdim=True)
        poison = low.mul_(0.0).add_(high.mul_(0.0))
        poison = poison.flip(-2).cumsum(-2).flip(-2) if reverse else poison.cumsum(-2)
    return torch.matmul(w, xt.nan_to_num_(0.0, 0.0, 0.0)).add_(poison), top


def _carry_states(
    k_loc: Tensor, vc: Tensor, chunk_max: Tensor, max_before: Tensor, max_after: Tensor,
    kv: Tensor, k_sum: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state carried into each chunk, from chunk summaries ``k_loc = exp(ks -
    chunk_max)`` (0 on padded keys): ``(kv_before (B,H,nC,D,Dv), ks_before (B,H,nC,D,1))``
    (views of one tensor) and the state after the last chunk ``(kv, k_sum)``. The prefix
    over the chunks is one batched matmul (:func:`_scan_states`)."""
    b, h, n_chunks, _, d = k_loc.shape
    dv = vc.shape[-1]
    xt = kv.new_empty(b, h, d, n_chunks + 1, dv + 1)  # the initial state, then the chunks
    xt[:, :, :, 0, :dv] = kv
    xt[:, :, :, 0, dv] = k_sum
    xt[:, :, :, 1:, :dv] = _bmm(k_loc.transpose(-1, -2), vc).transpose(2, 3)
    xt[:, :, :, 1:, dv] = k_loc.sum(-2).transpose(-1, -2)
    level = torch.cat([max_before[:, :, :1], chunk_max], 2)
    states = _scan_states(xt, level)[0]
    before = states[:, :, :, :-1].transpose(2, 3).contiguous()  # (B, H, nC, D, E)
    last = states[:, :, :, -1]
    return before[..., :dv], before[..., dv:], last[..., :dv].contiguous(), last[..., dv]


def _causal_segment(
    qs: Tensor, ks: Tensor, v: Tensor, mask: Tensor | None,
    kv: Tensor, k_sum: Tensor, k_max: Tensor, chunk_size: int, eps: float,
) -> tuple[Tensor, ...]:
    """Chunked causal LLN continuing from ``(kv, k_sum, k_max)``; returns the output, the
    state updated, the number of rows whose every term underflowed (see ``_causal``), the
    log of each row's true denominator ``(B, H, n)`` (+inf where the row is set to 0) and
    the state entering each chunk ``(B, H, nC, D, Dv)``, ``(B, H, nC, D, 1)`` (the last
    three for the backward of :class:`lln.ops.lln_function.CausalLLN`)."""
    b, h, n, _ = qs.shape
    dv = v.shape[-1]
    qc, kc, vc, key_real, _ = _chunk_layout(qs, ks, v, mask, chunk_size)
    n_chunks, c = qc.shape[2:4]

    def mask_keys(x: Tensor) -> Tensor:
        return x if key_real is None else x.masked_fill(~key_real, NEG_INF)

    with torch.no_grad():  # offsets: any value gives the same output, so no gradient
        _, row_max, run_max, chunk_max, max_before, max_after = _chunk_offsets(
            kc, key_real, k_max
        )
        q_max = qc.amax(-1)  # (B, H, nC, C)
        # One log-scale per query for both parts: the larger of the inter-chunk one
        # (max_d q_id + max_before_d) and the intra-chunk one (max_d q_id + m_i). Every
        # factor below is then <= 1, and the parts add without rescaling.
        q_plus = qc + max_before.unsqueeze(-2)  # -inf in dims with no key yet
        top = torch.maximum(q_plus.amax(-1), q_max + run_max)  # finite iff a key is visible
        seen = torch.isfinite(top)
        top = _finite_or_zero(top)
        inter_offset = max_before.unsqueeze(-2) - top.unsqueeze(-1)  # (B, H, nC, C, D)
        # intra-chunk weight of key j for query i: exp(r_j + max_d q_id - top_i), j <= i
        visible = _visible(row_max, key_real)
        e = row_max.unsqueeze(-2) + (q_max - top).unsqueeze(-1)  # (.., C_i, C_j)
        e = e.masked_fill_(~visible, NEG_INF).exp_()  # 0 where not visible

    # intra-chunk part, all chunks at once. Numerators and denominators are kept apart (a
    # column of ones appended to v would make the matmuls 65 wide, ~2.5x slower on CPU).
    # (exp_ in place on fresh temporaries: one allocation less per feature map). Keys after
    # i are removed with masked_fill, not by their zero weight: a NaN/Inf future key would
    # make 0 * NaN = NaN in earlier rows.
    q_hat = (qc - q_max.unsqueeze(-1)).exp_()
    k_hat = mask_keys(kc - _finite_or_zero(row_max).unsqueeze(-1)).exp_()
    weights = (_bmm(q_hat, k_hat.transpose(-1, -2)) * e).masked_fill(~visible, 0.0)
    intra_num, intra_den = _bmm(weights, vc), weights.sum(-1)

    # chunk summaries relative to each chunk's own per-dim max, then the carried state
    k_loc = mask_keys(kc - _finite_or_zero(chunk_max).unsqueeze(-2)).exp_()
    kv_before, ks_before, kv, k_sum = _carry_states(
        k_loc, vc, chunk_max, max_before, max_after, kv, k_sum
    )

    # inter-chunk part: queries against the state carried into their chunk
    q_feat = (qc + inter_offset).exp_()
    num = _bmm(q_feat, kv_before) + intra_num
    den = _bmm(q_feat, ks_before).squeeze(-1) + intra_den
    lost = ((den.detach() == 0) & seen).sum()
    out, log_den = _safe_divide(num, den, eps, top)
    out = out.reshape(b, h, n_chunks * c, dv)[:, :, :n]
    log_den = log_den.reshape(b, h, -1)[:, :, :n]
    return out, kv, k_sum, max_after[:, :, -1], lost, log_den, kv_before, ks_before


def lln_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool,
    mask: Tensor | None,
    alpha: float | Tensor | None,
    beta: float | Tensor | None,
    stats: str,
    temperature: float,
    eps: float,
    chunk_size: int,
    state: LLNState | None,
    block_size: int | None = None,
    constants: str = "paper",
    checkpoint: bool = False,
    diag: tuple | None = None,
) -> tuple[Tensor, LLNState | None, Tensor | int]:
    """LLN on validated inputs. Returns the output in the compute dtype, when causal the
    state after the input (``block_*`` fields are left for the caller), and the number of
    underflowed rows (for :func:`warn_lost_rows`; 0 when not causal). ``diag`` (causal
    only): the LLN+Diag combination computed in the same Function (see
    :func:`lln.ops.lln_function.causal_lln`)."""
    cdt = compute_dtype(q.dtype)
    alpha_t, beta_t, moments = feature_scales(
        q, k, is_causal=is_causal, key_padding_mask=mask, alpha=alpha, beta=beta,
        stats=stats, temperature=temperature, state=state, constants=constants,
    )
    if not is_causal:
        if not _reference.active:
            from .lln_function import noncausal_lln

            return noncausal_lln(q, k, v, alpha_t, beta_t, mask, eps, diag), None, 0
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        return _noncausal(q, k, v, alpha_t, beta_t, mask, eps), None, 0
    if state is None:
        b, h, _, d = q.shape
        state = LLNState.empty(b, h, d, v.shape[-1], dtype=cdt, device=q.device)
    out, kv, k_sum, k_max, lost = _causal(
        q, k, v, alpha_t, beta_t, mask, state, chunk_size, eps, checkpoint=checkpoint,
        diag=diag,
    )
    # fresh, contiguous state tensors (the kernel's are views): the layout the decode step
    # returns too, so a compiled step does not recompile on the first call after a prefill
    kv, k_sum, k_max = (t.clone(memory_format=torch.contiguous_format) for t in (kv, k_sum, k_max))
    new_state = LLNState(
        kv=kv, k_sum=k_sum, k_max=k_max, position=state.position + q.shape[2],
        stats=None if alpha is not None else stats, moments=moments, block_size=block_size,
    )
    return out, new_state, lost


def lln_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
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
    """Linear Log-Normal attention, a linear-cost stand-in for softmax attention.

    Args:
        q: ``(B, H, L, D)`` queries.
        k: ``(B, H, S, D)`` keys (``S == L`` when causal).
        v: ``(B, H, S, Dv)`` values.
        is_causal: query i sees keys j <= i only — strictly: changing any token after i
            leaves output i unchanged.
        key_padding_mask: ``(B, S)`` bool, True = real token (the SDPA / Hugging Face
            convention). Padded keys are removed from numerator, denominator and statistics.
            A query that sees no real key gets a zero output.
        alpha, beta: feature scales ``exp(alpha q)``, ``exp(beta k)``: floats or tensors
            broadcastable to ``(B, H, 1, 1)`` (gradients flow into tensors). None (both) =
            moment matching from the statistics of q and k, which carry no gradient (so
            ``gradcheck`` with the defaults fails; pass tensors to differentiate them).
        stats: which entries the moment-matching statistics use: ``"head"`` (per sequence
            and head, default), ``"sequence"`` (per sequence), ``"tensor"`` (the whole batch,
            like the reference code; non-causal only). Causal modes use prefix statistics.
        temperature: divides the moment-matched sigma_tilde (> 1 flattens the attention).
        constants: the moment-matching constants (a, b): ``"paper"`` (the paper's D = 64
            fit, :data:`lln.MOMENT_A`, :data:`lln.MOMENT_B`; default) or ``"head_dim"``
            (calibrated for the head dim D of q,
            :func:`lln.ops.moment_matching.moment_constants`). Moment matching only: with
            explicit alpha, beta only ``"paper"`` is accepted.
        eps: added to the true denominator, ``out_i = sum_j w_ij v_j / (eps + sum_j
            w_ij)`` (default 0: exact; rows without keys give 0). Defined on the true
            denominator, it does not depend on ``chunk_size`` or on how a causal sequence
            is split into calls.
        chunk_size: tokens per chunk of the causal path (a speed knob; results agree to
            rounding for every value).
        initial_state: an :class:`LLNState` returned by a previous causal call to continue.
        output_final_state: also return the state after the last token (causal only).
        checkpoint: accepted for compatibility; no longer needed and no effect. The
            causal kernel is an autograd Function with a hand-derived backward
            (:mod:`lln.ops.lln_function`) that keeps only q, k, v, alpha, beta, one
            log-denominator per row and the state entering each chunk, and recomputes the
            chunk weights one segment of ``16 * chunk_size`` tokens at a time in backward — what
            ``checkpoint=True`` used to buy, without its extra forward pass. (Inside
            :func:`lln.ops.lln.reference_kernel` it still checkpoints the reference
            path's segments.) Double backward is not supported and raises.

    Returns:
        ``out`` with the shape ``(B, H, L, Dv)`` and dtype of ``v``, or ``(out, state)``.
    """
    mask = check_lln_args(
        q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, alpha=alpha,
        beta=beta, stats=stats, temperature=temperature, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state, block_size=None,
        constants=constants, checkpoint=checkpoint,
    )
    if takes_step_path(q.shape[2], is_causal, initial_state):  # decoding: the recurrent path
        out, state = lln_step(
            q, k, v, mask, initial_state, alpha=alpha, beta=beta, stats=stats,
            temperature=temperature, constants=constants, eps=eps,
        )
        out = out if out.dtype == v.dtype else out.to(v.dtype)
        return (out, state) if output_final_state else out
    out, state, lost = lln_forward(
        q, k, v, is_causal=is_causal, mask=mask, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, eps=eps, chunk_size=chunk_size, state=initial_state,
        constants=constants, checkpoint=checkpoint,
    )
    warn_lost_rows(lost)
    out = out.to(v.dtype)
    return (out, state) if output_final_state else out
