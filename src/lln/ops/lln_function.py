"""Causal LLN as a ``torch.autograd.Function`` with a hand-derived backward.

Forward runs the chunked kernel of :mod:`lln.ops.lln` segment by segment without autograd
and keeps for backward only the inputs (``q, k, v`` as given, ``alpha, beta``, the mask),
the log of each row's true denominator ``(B, H, N)``, the state entering each chunk
(``(N / C) * D * (Dv + 1)`` per head) and, for plain LLN, its output (the returned tensor):
no ``N x C x C`` or ``N x D x Dv`` tensor and no feature map. Backward recomputes the chunk
weights one segment at a time (last first) and writes the gradients into preallocated
full-size tensors.

The math (``qs = alpha q``, ``ks = beta k``, ``L_i = log(den_i + eps)``, ``g_i = dL/do_i``,
``c_i = g_i . o_i`` and the dim-resolved probabilities ``P_ijd = exp(qs_id + ks_jd - L_i)``
over the visible pairs j <= i)::

    dv_j   = sum_i sum_d P_ijd g_i
    dqs_id = sum_j P_ijd (g_i . v_j - c_i)
    dks_jd = sum_i P_ijd (g_i . v_j - c_i)

* **Inter-chunk** (key in an earlier chunk): for queries, ``exp(qs_id + max_before_d - L_i)
  ((KV g_i)_d - c_i ksum_d)`` against the recomputed state entering the chunk. For keys
  and values, a REVERSE scan over chunks of ``G_d = sum_i exp(a_id - amax_d) g_i`` and
  ``Cs_d = sum_i exp(a_id - amax_d) c_i`` with ``a_id = qs_id - L_i`` and a per-dim running
  max ``amax`` (the mirror of the forward state). ``ks_jd + a_id <= 0`` for every visible
  pair, so ``exp(ks_jd + amax_d) <= 1`` never overflows. The scan starts from the gradient
  of the final state and ends in the gradient of the initial state.
* **Intra-chunk**: the C x C weights are recomputed from the inputs with the row
  normaliser split in two halves. For ``dqs`` (a sum over keys) per row,
  ``x_i = (max_d qs_id - m_i + L_i) / 2``: ``exp(qs_id - x_i)`` and ``exp(x_i + r_j - L_i)``
  are each at most ``exp(Delta / 2)``, ``Delta = max_d qs_id + max_d ks_jd - L_i`` the
  misalignment of a pair (< 104 for any row the float32 forward keeps). For ``dks`` (a sum
  over queries) per column, ``y_j = (r_j - max_{i >= j}(max_d qs_id - L_i)) / 2`` with the
  same bound. So nothing overflows even when the forward's normalised denominator is
  subnormal, and no ``1 / den`` is ever formed. Rows set to 0 (``L_i = +inf``) get exactly
  zero gradient.
* The output ``o_i`` needed for ``c_i`` is the saved output for plain LLN; for LLN+Diag
  (whose output is the mixture) the LLN part is recomputed (two more matmuls per chunk)
  instead of being kept as a second full-size tensor.

Double backward is not supported (``once_differentiable``: a clear error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._validation import compute_dtype
from .block_diag import SEGMENT_TOKENS, block_diag_forward
from .lln import (
    NEG_INF,
    SEGMENT_CHUNKS,
    _bmm,
    _chunk_layout,
    _chunk_offsets,
    _finite_or_zero,
    _safe_divide,
    _scaled_segment,
    _scan_states,
    _visible,
)


def _rows(t: Tensor | None, part: slice, dim: int = 2) -> Tensor | None:
    """``t`` restricted to the tokens ``part`` along ``dim`` (as is when it broadcasts)."""
    if t is None or t.shape[dim] == 1:
        return t
    return t[(slice(None),) * dim + (part,)]


class CausalLLN(torch.autograd.Function):
    """``(out, kv, k_sum, k_max, lost)`` of causal LLN continuing ``(kv, k_sum, k_max)``.

    Inputs: ``q, k (B, H, N, D)``, ``v (B, H, N, Dv)`` (any float dtype), ``alpha, beta``
    broadcastable ``(B|1, H|1, N|1, 1)`` in the compute dtype, the state tensors, the key
    mask ``(B, N)`` or None, ``chunk_size``, ``eps``. Gradients flow to q, k, v, alpha,
    beta (when they require it), ``kv`` and ``k_sum``; ``k_max`` is an offset (the output
    does not depend on it) and gets none, as in the autograd-through-ops path.
    """

    @staticmethod
    def forward(
        ctx, q, k, v, alpha, beta, kv, k_sum, k_max, lln_w, diag_w, block_k, block_v, mask,
        chunk_size, eps, diag,
    ):
        cdt = kv.dtype
        b, h, n, _ = q.shape
        segment = chunk_size * SEGMENT_CHUNKS
        out = torch.empty(b, h, n, v.shape[-1], dtype=cdt, device=q.device)
        log_den = torch.empty(b, h, n, dtype=cdt, device=q.device)
        kmax_starts, kv_chunks, ks_chunks = [], [], []
        lost = torch.zeros((), dtype=torch.int64, device=q.device)
        for start in range(0, n, segment):
            part = slice(start, start + segment)
            kmax_starts.append(k_max)
            out_seg, kv, k_sum, k_max, lost_seg, log_den_seg, kv_chunk, ks_chunk = _scaled_segment(
                q[:, :, part], k[:, :, part], v[:, :, part], _rows(alpha, part),
                _rows(beta, part), _rows(mask, part, 1), kv, k_sum, k_max, chunk_size, eps,
            )
            out[:, :, part] = out_seg if diag is None else out_seg * lln_w
            log_den[:, :, part] = log_den_seg
            kv_chunks.append(kv_chunk)
            ks_chunks.append(ks_chunk)
            lost += lost_seg
        if diag is not None:
            _add_diag(out, q, k, v, mask, diag_w, block_k, block_v, diag)
        # Plain LLN keeps its output (the caller's tensor: no copy; it saves two of the ten
        # matmuls of the backward); LLN+Diag's LLN part is recomputed instead.
        # (and the state entering each chunk: N / C * D * (Dv + 1) floats per head, which
        # spares the backward the recomputation of the carried state and its scan)
        ctx.save_for_backward(
            q, k, v, alpha, beta, mask, log_den, torch.stack(kmax_starts), k_max, lln_w,
            diag_w, block_k, block_v, out if diag is None else None, *kv_chunks, *ks_chunks,
        )
        ctx.chunk_size = chunk_size
        ctx.diag = diag
        ctx.mark_non_differentiable(k_max, lost)
        return out, kv, k_sum, k_max, lost

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_kv, g_ks, _g_kmax, _g_lost):
        (q, k, v, alpha, beta, mask, log_den, kmax_starts, k_max_end, lln_w, diag_w, block_k,
         block_v, out, *chunk_states) = ctx.saved_tensors
        kv_chunks = chunk_states[: len(chunk_states) // 2]
        ks_chunks = chunk_states[len(chunk_states) // 2 :]
        need_q, need_k, need_v, need_a, need_b, need_kv, need_ks = ctx.needs_input_grad[:7]
        need_lw, need_dw, need_bk, need_bv = ctx.needs_input_grad[8:12]
        diag = ctx.diag
        d_lw = torch.zeros_like(lln_w) if need_lw else None
        cdt = log_den.dtype
        n = q.shape[2]
        segment = ctx.chunk_size * SEGMENT_CHUNKS
        dq, dk, dv, da, db = _grad_buffers(q, k, v, alpha, beta, ctx.needs_input_grad, cdt)
        # reverse-scan state: gradient of the final state in the G / Cs / amax form
        finite = torch.isfinite(k_max_end)
        amax = torch.where(finite, -k_max_end, NEG_INF)
        big_g = torch.where(finite.unsqueeze(-1), g_kv.to(cdt), 0.0)
        big_c = torch.where(finite, -g_ks.to(cdt), 0.0)
        starts = list(range(0, n, segment))
        for index in reversed(range(len(starts))):
            part = slice(starts[index], starts[index] + segment)
            q_seg, k_seg = q[:, :, part].to(cdt), k[:, :, part].to(cdt)
            a_seg, b_seg = _rows(alpha, part), _rows(beta, part)
            g_seg = g_out[:, :, part] if diag is None else g_out[:, :, part] * lln_w
            dqs, dks, dv_seg, big_g, big_c, amax, out_seg = _segment_backward(
                q_seg * a_seg, k_seg * b_seg, v[:, :, part].to(cdt), g_seg,
                log_den[:, :, part], _rows(mask, part, 1), kv_chunks[index],
                ks_chunks[index], kmax_starts[index], big_g, big_c, amax, ctx.chunk_size,
                None if out is None else out[:, :, part],
            )
            if need_lw:
                d_lw += (g_out[:, :, part] * out_seg).sum_to_size(d_lw.shape)
            if need_q:
                torch.mul(dqs, a_seg, out=dq[:, :, part])
            if need_k:
                torch.mul(dks, b_seg, out=dk[:, :, part])
            if need_v:
                dv[:, :, part] = dv_seg
            if need_a:
                da[:, :, part] = (dqs * q_seg).sum(-1, keepdim=True).sum_to_size(
                    da[:, :, part].shape
                )
            if need_b:
                db[:, :, part] = (dks * k_seg).sum(-1, keepdim=True).sum_to_size(
                    db[:, :, part].shape
                )
        # gradient of the initial state: what reaches past the first token
        reach = torch.exp(kmax_starts[0] + amax)  # <= 1; 0 where either is -inf
        d_kv = reach.unsqueeze(-1) * big_g if need_kv else None
        d_ks = -(reach * big_c) if need_ks else None
        da = None if da is None else da.sum_to_size(alpha.shape)
        db = None if db is None else db.sum_to_size(beta.shape)
        d_dw = d_bk = d_bv = None
        if diag is not None:
            d_dw, d_bk, d_bv = _diag_backward(
                g_out, q, k, v, mask, diag_w, block_k, block_v, diag, dq, dk, dv,
                need_dw, need_bk, need_bv,
            )
        return (dq, dk, dv, da, db, d_kv, d_ks, None, d_lw, d_dw, d_bk, d_bv, None, None, None,
                None)


@dataclass(frozen=True)
class DiagPart:
    """The block-diagonal softmax part of LLN+Diag for :class:`CausalLLN` /
    :class:`NonCausalLLN`: blocks of ``block_size`` tokens aligned to the start of the
    sequence, of which ``carried`` tokens (``block_k``, ``block_v``, ``block_mask`` of the
    state) came before this call (causal only)."""

    block_size: int
    scale: float
    carried: int = 0
    block_mask: Tensor | None = None
    is_causal: bool = True


def _diag_parts(n: int, diag: DiagPart) -> list[tuple[slice, bool]]:
    """Token ranges of the input, each made of whole blocks (the first one completes the
    carried block), about ``SEGMENT_TOKENS`` long; ``True`` marks the first."""
    size = diag.block_size * max(1, SEGMENT_TOKENS // diag.block_size)
    starts = [0, *range(size - diag.carried, n, size)] if size - diag.carried < n else [0]
    ends = [*starts[1:], n]
    return [(slice(a, b), a == 0) for a, b in zip(starts, ends, strict=True)]


def _diag_part(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block_k: Tensor | None,
    block_v: Tensor | None, first: bool, diag: DiagPart,
) -> Tensor:
    """Block-diagonal softmax of one part of the input (compute dtype); the first part is
    preceded by the carried tokens of the state (their rows are dropped)."""
    carried = diag.carried if first else 0
    if carried:
        b, h, _, d = q.shape
        real = torch.ones(b, q.shape[2], dtype=torch.bool, device=q.device)
        mask = torch.cat([diag.block_mask, real if mask is None else mask], 1)
        q = torch.cat([q.new_zeros(b, h, carried, d), q], 2)
        k = torch.cat([block_k.to(k.dtype), k], 2)
        v = torch.cat([block_v.to(v.dtype), v], 2)
    out = block_diag_forward(
        q, k, v, mask, block_size=diag.block_size, is_causal=diag.is_causal, scale=diag.scale
    )
    return out[:, :, carried:]


def _add_diag(
    out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, diag_w: Tensor,
    block_k: Tensor | None, block_v: Tensor | None, diag: DiagPart,
) -> None:
    """``out += diag_w * BlockDiag(q, k, v)``, part by part (no full-size temporary)."""
    for part, first in _diag_parts(q.shape[2], diag):
        out[:, :, part].addcmul_(diag_w, _diag_part(
            q[:, :, part], k[:, :, part], v[:, :, part], _rows(mask, part, 1),
            block_k, block_v, first, diag,
        ))


def _diag_backward(
    g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, diag_w: Tensor,
    block_k: Tensor | None, block_v: Tensor | None, diag: DiagPart, dq: Tensor | None,
    dk: Tensor | None, dv: Tensor | None, need_dw: bool, need_bk: bool, need_bv: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of the diagonal part: each part recomputed under autograd (fused SDPA or
    the masked block softmax) and differentiated on its own; adds into ``dq, dk, dv`` and
    returns the gradients of ``diag_w``, ``block_k``, ``block_v``."""
    d_dw = torch.zeros_like(diag_w) if need_dw else None
    d_bk = torch.zeros_like(block_k) if need_bk else None
    d_bv = torch.zeros_like(block_v) if need_bv else None
    for part, first in _diag_parts(q.shape[2], diag):
        inputs = [q[:, :, part], k[:, :, part], v[:, :, part]]
        if first and diag.carried:
            inputs += [block_k, block_v]
        leaves = [t.detach().requires_grad_() for t in inputs]
        with torch.enable_grad():
            out_part = _diag_part(
                *leaves[:3], _rows(mask, part, 1), *(leaves[3:] or (None, None)), first, diag,
            )
        g_part = g_out[:, :, part]
        grads = torch.autograd.grad(out_part, leaves, g_part * diag_w, allow_unused=True)
        buffers = [_rows(t, part) for t in (dq, dk, dv)] + [d_bk, d_bv]
        for buffer, grad in zip(buffers, grads, strict=False):
            if buffer is not None and grad is not None:
                buffer += grad
        if need_dw:
            d_dw += (g_part * out_part.detach()).sum_to_size(d_dw.shape)
    return d_dw, d_bk, d_bv


def _grad_buffers(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, needs: tuple, cdt
) -> list[Tensor | None]:
    """Uninitialised gradient tensors for q, k, v (their dtypes) and per-token ones
    ``(B|1, H|1, N, 1)`` for alpha, beta (compute dtype; summed to their shapes at the
    end), None where no gradient is needed (``needs``: ``ctx.needs_input_grad``)."""
    bufs = [torch.empty_like(t) if need else None for t, need in zip((q, k, v), needs[:3],
                                                                      strict=True)]
    for x, scale, need in ((q, alpha, needs[3]), (k, beta, needs[4])):
        shape = (*scale.shape[:2], x.shape[2], 1)
        bufs.append(torch.empty(shape, dtype=cdt, device=q.device) if need else None)
    return bufs


def _segment_backward(
    qs: Tensor, ks: Tensor, v: Tensor, g: Tensor, log_den: Tensor, mask: Tensor | None,
    kv: Tensor, k_sum: Tensor, k_max: Tensor, big_g: Tensor, big_c: Tensor, amax: Tensor,
    chunk_size: int, out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of one segment wrt ``qs, ks, v`` given the state entering each of its
    chunks ``kv (B, H, nC, D, Dv)``, ``k_sum (B, H, nC, D, 1)`` and the offset ``k_max``
    entering the segment, and the reverse-scan state ``(G, Cs, amax)`` of everything after it;
    returns the three gradients, the reverse-scan state before the segment and the output
    of the segment (``out`` when given, else recomputed)."""
    b, h, n, d = qs.shape
    dv_dim = v.shape[-1]
    qc, kc, vc, key_real, pad = _chunk_layout(qs, ks, v, mask, chunk_size)
    n_chunks, c = qc.shape[2:4]
    if pad:
        g = torch.nn.functional.pad(g, (0, 0, 0, pad))
        log_den = torch.nn.functional.pad(log_den, (0, pad), value=float("inf"))
        out = None if out is None else torch.nn.functional.pad(out, (0, 0, 0, pad))
    recompute = out is None
    gc = g.contiguous().view(b, h, n_chunks, c, dv_dim)  # (one copy, not one per matmul)
    lc = log_den.view(b, h, n_chunks, c)
    k_masked, row_max, run_max, chunk_max, max_before, max_after = _chunk_offsets(
        kc, key_real, k_max
    )
    hidden = ~_visible(row_max, key_real)
    # a_id = qs_id - L_i (-inf on rows set to 0) relative to its per-chunk max amax_d:
    # a_loc = exp(a_id - amax_d) <= 1 serves the reverse scan (keys) and, times the factor
    # exp(max_before_d + amax_d) <= 1 (as ks_jd + a_id <= 0 for every visible pair; 0 where
    # amax = -inf), gives the inter-chunk probabilities exp(qs_id + max_before_d - L_i) of
    # the queries. The factor is folded into the carried state (D x Dv per chunk) instead
    # of into an N x D tensor.
    a_loc = qc - lc.unsqueeze(-1)
    chunk_amax = a_loc.amax(-2)  # (B, H, nC, D)
    a_loc = a_loc.sub_(_finite_or_zero(chunk_amax).unsqueeze(-2)).exp_()
    inter = torch.exp(max_before + chunk_amax).unsqueeze(-1)
    kv_before, ks_before = kv * inter, k_sum * inter
    out = _bmm(a_loc, kv_before) if recompute else out.reshape(gc.shape)
    # intra-chunk: the normaliser split between the factors (see the module docstring).
    # Rows (for dqs): x_i = (max_d qs_id - m_i + L_i) / 2, +inf on rows set to 0.
    q_max = qc.amax(-1)
    half = (q_max - run_max + lc) * 0.5
    q_plain = (qc - q_max.unsqueeze(-1)).exp_()  # exp(qs_id - max_d qs_id) <= 1
    # exp(qs_id - x_i) = q_plain * exp(max_d qs_id - x_i) (<= exp(Delta / 2)); 0 where x = inf
    q_hat = q_plain * torch.exp(q_max - half).nan_to_num_(posinf=0.0).unsqueeze(-1)
    row_off = _finite_or_zero(row_max)
    k_hat = (k_masked - row_off.unsqueeze(-1)).exp_()
    rest = (half - lc).nan_to_num(nan=NEG_INF, posinf=NEG_INF)
    # e is exactly 0 on hidden pairs, and every factor it meets is finite for finite
    # inputs, so the products need no second mask (the forward has one, for NaN locality)
    e = (row_max.unsqueeze(-2) + rest.unsqueeze(-1)).masked_fill_(hidden, NEG_INF).exp_()
    probs = _bmm(q_hat, k_hat.transpose(-1, -2)).mul_(e)
    if recompute:
        out += _bmm(probs, vc)
    dots = (gc * out).sum(-1)  # c_i = g_i . o_i
    d_probs = _bmm(gc, vc.transpose(-1, -2)).sub_(dots.unsqueeze(-1))  # g_i . v_j - c_i
    dqs = q_hat.mul_(_bmm(d_probs * e, k_hat))
    del e
    # Columns (for dks): y_j = (r_j - u_j) / 2 with u_j = max_{i >= j} (max_d qs_id - L_i),
    # so that exp(ks_jd - y_j) and exp(max_d qs_id - L_i + y_j) are both <= exp(Delta / 2).
    q_rel = q_max - lc  # -inf on rows set to 0
    u = q_rel.flip(-1).cummax(-1).values.flip(-1)
    col = _finite_or_zero(torch.where(torch.isfinite(u), (row_max - u) * 0.5, row_max))
    e = (q_rel.nan_to_num(nan=NEG_INF).unsqueeze(-1) + col.unsqueeze(-2))
    e = e.masked_fill_(hidden, NEG_INF).exp_()
    dks = _bmm(d_probs.mul_(e).transpose(-1, -2), q_plain)
    # exp(ks_jd - y_j) = k_hat * exp(r_j - y_j) (<= exp(Delta / 2))
    dks = dks.mul_(k_hat.mul_(torch.exp(row_off - col).unsqueeze(-1)))
    del q_plain, e, d_probs, k_hat
    dv = _bmm(probs.transpose(-1, -2), gc)
    del probs
    dqs.addcmul_(a_loc, _bmm(gc, kv_before.transpose(-1, -2)).addcmul_(
        dots.unsqueeze(-1), ks_before.transpose(-1, -2), value=-1.0))
    del kv_before, ks_before
    # inter-chunk, keys and values: reverse scan over the chunks
    g_loc = _bmm(a_loc.transpose(-1, -2), gc)  # (B, H, nC, D, Dv)
    c_loc = _bmm(a_loc.transpose(-1, -2), dots.unsqueeze(-1)).squeeze(-1)  # (B, H, nC, D)
    del a_loc
    # the reverse scan as one batched matmul: the chunks, then the state after the segment
    xt = big_g.new_empty(b, h, d, n_chunks + 1, dv_dim + 1)
    xt[:, :, :, :-1, :dv_dim] = g_loc.transpose(2, 3)
    xt[:, :, :, :-1, dv_dim] = c_loc.transpose(-1, -2)
    xt[:, :, :, -1, :dv_dim] = big_g
    xt[:, :, :, -1, dv_dim] = big_c
    del g_loc, c_loc
    states, top = _scan_states(xt, torch.cat([chunk_amax, amax.unsqueeze(2)], 2), reverse=True)
    after = states[:, :, :, 1:].transpose(2, 3).contiguous()  # after each chunk: (B, H, nC, D, E)
    g_after, c_after, amax_after = after[..., :dv_dim], after[..., dv_dim], top[:, :, 1:]
    big_g, big_c, amax = states[:, :, :, 0, :dv_dim], states[:, :, :, 0, dv_dim], top[:, :, 0]
    k_inter = (k_masked + amax_after.unsqueeze(-2)).exp_()  # <= 1; 0 on padded keys
    dv.view(-1, *dv.shape[-2:]).baddbmm_(
        k_inter.reshape(-1, *k_inter.shape[-2:]), g_after.reshape(-1, *g_after.shape[-2:]))
    dks.addcmul_(k_inter, _bmm(vc, g_after.transpose(-1, -2)).sub_(c_after.unsqueeze(-2)))

    def unchunk(t: Tensor) -> Tensor:
        return t.reshape(b, h, n_chunks * c, t.shape[-1])[:, :, :n]

    return unchunk(dqs), unchunk(dks), unchunk(dv), big_g, big_c, amax, unchunk(out)


def causal_lln(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, mask: Tensor | None,
    kv: Tensor, k_sum: Tensor, k_max: Tensor, chunk_size: int, eps: float,
    diag: tuple[Tensor, Tensor, Tensor | None, Tensor | None, DiagPart] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Causal LLN through :class:`CausalLLN`: ``(out, kv, k_sum, k_max, lost)`` (see
    :func:`lln.ops.lln._causal`). With ``diag = (lln_weight, diag_weight, block_k,
    block_v, DiagPart)`` the output is LLN+Diag's ``lln_weight * LLN + diag_weight *
    BlockDiag`` (weights ``(B|1, H|1, 1, Dv)``), computed and differentiated in the same
    Function."""
    lln_w, diag_w, block_k, block_v, part = (None,) * 5 if diag is None else diag
    return CausalLLN.apply(
        q, k, v, alpha, beta, kv, k_sum, k_max, lln_w, diag_w, block_k, block_v, mask,
        chunk_size, eps, part,
    )


#: Tokens per segment of the non-causal Function (queries and keys are processed in
#: segments so that every temporary stays small).
NONCAUSAL_SEGMENT = 512


def _segments(n: int) -> list[slice]:
    return [slice(start, start + NONCAUSAL_SEGMENT) for start in range(0, n, NONCAUSAL_SEGMENT)]


def _scaled_keys(k: Tensor, beta: Tensor, mask: Tensor | None, part: slice, cdt) -> Tensor:
    """``beta * k`` of the keys ``part`` in the compute dtype, -inf on padded keys."""
    ks = k[:, :, part].to(cdt) * _rows(beta, part)
    if mask is not None:
        ks = ks.masked_fill(~mask[:, None, part, None], NEG_INF)
    return ks


class NonCausalLLN(torch.autograd.Function):
    """Non-causal LLN ``(B, H, L, Dv)`` of ``q (B, H, L, D)``, ``k (B, H, S, D)``, ``v``
    with a hand-derived backward; keeps q, k, v, alpha, beta, the mask, ``log den (B, H,
    L)``, the per-dim key offset and the ``(D, Dv)`` / ``(D,)`` sums. Works on segments of
    ``NONCAUSAL_SEGMENT`` tokens (forward and backward), so no temporary is full size.

    Backward (``a_id = qs_id - L_i``, ``amax_d = max_i a_id``, ``c_i = g_i . o_i``)::

        dqs_id = exp(qs_id + c_d - L_i) ((KV g_i)_d - c_i ksum_d)      (KV, ksum relative to c)
        G = sum_i exp(a_i - amax) g_i^T,  Cs = sum_i exp(a_i - amax) c_i
        dks_jd = exp(ks_jd + amax_d) ((G v_j)_d - Cs_d),  dv_j = sum_d exp(ks_jd + amax_d) G_d

    with every exponential <= 1 (``ks_jd + a_id <= 0`` for every pair).
    """

    @staticmethod
    def forward(ctx, q, k, v, alpha, beta, lln_w, diag_w, mask, eps, diag):
        cdt = compute_dtype(q.dtype)
        b, h, n_q, d = q.shape
        n_k, dv = k.shape[2], v.shape[-1]
        key_parts = _segments(n_k)
        offset = torch.full((b, h, d), NEG_INF, dtype=cdt, device=q.device)
        for part in key_parts:
            offset = torch.maximum(offset, _scaled_keys(k, beta, mask, part, cdt).amax(-2))
        offset = _finite_or_zero(offset)
        kv = torch.zeros(b, h, d, dv, dtype=cdt, device=q.device)
        k_sum = torch.zeros(b, h, d, dtype=cdt, device=q.device)
        for part in key_parts:
            k_feat = (_scaled_keys(k, beta, mask, part, cdt) - offset.unsqueeze(-2)).exp_()
            kv += k_feat.transpose(-1, -2) @ v[:, :, part].to(cdt)
            k_sum += k_feat.sum(-2)
        out = torch.empty(b, h, n_q, dv, dtype=cdt, device=q.device)
        log_den = torch.empty(b, h, n_q, dtype=cdt, device=q.device)
        for part in _segments(n_q):
            q_plus = q[:, :, part].to(cdt) * _rows(alpha, part) + offset.unsqueeze(-2)
            mu = q_plus.amax(-1)
            q_feat = (q_plus - mu.unsqueeze(-1)).exp_()
            den = (q_feat @ k_sum.unsqueeze(-1)).squeeze(-1)
            out[:, :, part], log_den[:, :, part] = _safe_divide(q_feat @ kv, den, eps, mu)
        if diag is not None:
            out *= lln_w
            _add_diag(out, q, k, v, mask, diag_w, None, None, diag)
        ctx.save_for_backward(q, k, v, alpha, beta, mask, log_den, offset, kv, k_sum, lln_w,
                              diag_w)
        ctx.diag = diag
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        q, k, v, alpha, beta, mask, log_den, offset, kv, k_sum, lln_w, diag_w = (
            ctx.saved_tensors)
        need_q, need_k, need_v, need_a, need_b, need_lw, need_dw = ctx.needs_input_grad[:7]
        diag = ctx.diag
        d_lw = torch.zeros_like(lln_w) if need_lw else None
        cdt = kv.dtype
        b, h, _, d = q.shape
        dq, dk, dv, da, db = _grad_buffers(q, k, v, alpha, beta, ctx.needs_input_grad, cdt)
        big_g = torch.zeros_like(kv)
        big_c = torch.zeros_like(k_sum)
        amax = torch.full_like(k_sum, NEG_INF)
        for part in _segments(q.shape[2]):  # queries: dq, and the sums G, Cs for the keys
            q_seg = q[:, :, part].to(cdt)
            qs = q_seg * _rows(alpha, part)
            g = g_out[:, :, part] if diag is None else g_out[:, :, part] * lln_w
            rows = log_den[:, :, part].unsqueeze(-1)
            q_prob = (qs + offset.unsqueeze(-2) - rows).exp_()  # <= 1; 0 on rows set to 0
            out = q_prob @ kv
            if need_lw:
                d_lw += (g_out[:, :, part] * out).sum_to_size(d_lw.shape)
            dots = (g * out).sum(-1, keepdim=True)  # c_i = g_i . o_i
            dqs = q_prob.mul_(g @ kv.transpose(-1, -2) - dots * k_sum.unsqueeze(-2))
            if need_q:
                dq[:, :, part] = dqs * _rows(alpha, part)
            if need_a:
                da[:, :, part] = (dqs * q_seg).sum(-1, keepdim=True).sum_to_size(
                    da[:, :, part].shape)
            a = qs - rows  # -inf on rows set to 0
            top = torch.maximum(amax, a.amax(-2))
            a_prob = (a - _finite_or_zero(top).unsqueeze(-2)).exp_()
            rescale = torch.exp(amax - top).nan_to_num(0.0)
            big_g = torch.baddbmm(
                (big_g * rescale.unsqueeze(-1)).flatten(0, 1),
                a_prob.transpose(-1, -2).flatten(0, 1), g.flatten(0, 1),
            ).view_as(big_g)
            big_c = big_c * rescale + (a_prob * dots).sum(-2)
            amax = top
        for part in _segments(k.shape[2]):  # keys: dk, dv
            k_seg = k[:, :, part].to(cdt)
            ks = _scaled_keys(k, beta, mask, part, cdt)
            k_prob = (ks + amax.unsqueeze(-2)).exp_()  # <= 1; 0 on padded keys
            if need_v:
                dv[:, :, part] = k_prob @ big_g
            dks = k_prob.mul_(v[:, :, part].to(cdt) @ big_g.transpose(-1, -2)
                              - big_c.unsqueeze(-2))
            if need_k:
                dk[:, :, part] = dks * _rows(beta, part)
            if need_b:
                db[:, :, part] = (dks * k_seg).sum(-1, keepdim=True).sum_to_size(
                    db[:, :, part].shape)
        da = None if da is None else da.sum_to_size(alpha.shape)
        db = None if db is None else db.sum_to_size(beta.shape)
        d_dw = None
        if diag is not None:
            d_dw = _diag_backward(g_out, q, k, v, mask, diag_w, None, None, diag, dq, dk, dv,
                                  need_dw, False, False)[0]
        return dq, dk, dv, da, db, d_lw, d_dw, None, None, None


def noncausal_lln(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, mask: Tensor | None,
    eps: float, diag: tuple[Tensor, Tensor, DiagPart] | None = None,
) -> Tensor:
    """Non-causal LLN through :class:`NonCausalLLN` (output in the compute dtype); with
    ``diag = (lln_weight, diag_weight, DiagPart)`` LLN+Diag's mixture (``q``, ``k`` of
    the same length)."""
    lln_w, diag_w, part = (None,) * 3 if diag is None else diag
    return NonCausalLLN.apply(q, k, v, alpha, beta, lln_w, diag_w, mask, eps, part)
