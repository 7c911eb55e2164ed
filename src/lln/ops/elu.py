"""Kernelised linear attention (Katharopoulos et al. 2020) and its ELU+1 feature map.

With non-negative feature maps ``phi``, attention becomes::

    out_i = phi(q_i)^T S_i / phi(q_i)^T z_i,   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

over the visible keys j (all real keys, or the real keys j <= i when causal). That is
``P @ v`` with ``P_ij = phi(q_i).phi(k_j) / sum_l phi(q_i).phi(k_l)``, at cost linear in N.
"Transformers are RNNs" uses ``phi(x) = elu(x) + 1`` (no 1/sqrt(D) scale).

:func:`linear_attention` is the shared engine for every feature-map method here (ELU+1,
Performer, cosFormer): it takes the features, optionally with a per-key log-scale
(``phi(k_j) = k_feat_j * exp(k_log_scale_j)``, for exponential features that would overflow
if materialised), and handles causal masking, padding and precision:

* **Causal, chunked.** Inside a chunk of ``C`` tokens the ``C x C`` block is computed
  directly; the sums ``S, z`` of the earlier chunks are carried from chunk to chunk.
  ``split``/``unbind`` (never slicing) keeps backward memory linear in N.
* **Log-scales that never look ahead.** Key j's weight is ``exp(r_j - m_i)`` with
  ``m_i = max_{l <= i} r_l`` a running max, and the carried sums are kept relative to the
  running max at the chunk start (rescaled when it grows), so every exponent is <= 0 and
  nothing after i enters query i. Non-causal uses one offset per (batch, head).
* **Padding** multiplies padded keys' features by an exact 0.
* **Precision.** Features and sums in float32 (float64 stays float64); output in the dtype
  of ``v``. Rows that see no key (or whose features are all 0) give 0, not NaN.

Package decision: no well-kept package exposes functional ELU+1 attention with padding and
a strictly causal chunked path, so it is implemented here from the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    check_is_causal,
    check_key_padding_mask,
    check_nonnegative_float,
    check_positive_int,
    check_qkv,
    compute_dtype,
)
from .naive import visible_keys

NEG_INF = float("-inf")


def normalize_rows(weights: Tensor, visible: Tensor) -> Tensor:
    """Non-negative ``weights (..., L, S)`` restricted to ``visible`` and divided by their row
    sums; rows whose visible weights sum to 0 are all 0."""
    weights = weights.masked_fill(~visible, 0.0)
    den = weights.sum(-1, keepdim=True)
    return weights / torch.where(den > 0, den, torch.ones_like(den))


def _safe_divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    den = den + eps
    return num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _noncausal(
    qf: Tensor, kf: Tensor, v_one: Tensor, log_r: Tensor | None, eps: float
) -> Tensor:
    if log_r is not None:
        with torch.no_grad():
            top = _finite_or_zero(log_r.amax(-1, keepdim=True))  # one offset per (B, H)
        kf = kf * torch.exp(log_r - top).unsqueeze(-1)  # exp(-inf) = 0 on padded keys
    both = qf @ (kf.transpose(-1, -2) @ v_one)
    return _safe_divide(both[..., :-1], both[..., -1], eps)


def _causal(
    qf: Tensor, kf: Tensor, v_one: Tensor, log_r: Tensor, chunk_size: int, eps: float
) -> Tensor:
    b, h, n, m = qf.shape
    dv1 = v_one.shape[-1]
    c = min(chunk_size, n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    if pad:
        qf, kf, v_one = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v_one))
        log_r = F.pad(log_r, (0, pad), value=NEG_INF)
    qc = qf.view(b, h, n_chunks, c, m)
    kc = kf.view(b, h, n_chunks, c, m)
    vc = v_one.view(b, h, n_chunks, c, dv1)
    rc = log_r.view(b, h, n_chunks, c)

    with torch.no_grad():  # offsets cancel in the ratio: no gradient needed
        chunk_max = rc.amax(-1)  # (B, H, nC)
        after = chunk_max.cummax(-1).values  # running max at each chunk's end
        before = torch.cat([after.new_full((b, h, 1), NEG_INF), after[..., :-1]], -1)
        # m_i: running max up to token i (earlier chunks included)
        run = torch.maximum(rc.cummax(-1).values, before.unsqueeze(-1))  # (B, H, nC, C)
        causal = torch.ones(c, c, dtype=torch.bool, device=qf.device).tril()
        log_e = rc.unsqueeze(-2) - _finite_or_zero(run).unsqueeze(-1)  # r_j - m_i
        e = torch.exp(log_e.masked_fill(~causal, NEG_INF))  # <= 1; 0 for j > i or padded
        w_inter = torch.exp(before.unsqueeze(-1) - _finite_or_zero(run))  # (B, H, nC, C)
        k_scale = torch.exp(rc - _finite_or_zero(chunk_max).unsqueeze(-1))  # per key, <= 1
        decay = torch.exp(before - after).nan_to_num(0.0)  # both -inf: empty state
        inject = torch.exp(chunk_max - after).nan_to_num(0.0)

    # keys after i removed with masked_fill, not by their zero weight: a NaN/Inf future key
    # would make 0 * NaN = NaN in earlier rows
    intra = ((qc @ kc.transpose(-1, -2)) * e).masked_fill(~causal, 0.0) @ vc
    kv_loc = (kc * k_scale.unsqueeze(-1)).transpose(-1, -2) @ vc  # (B, H, nC, M, Dv + 1)
    state = kv_loc.new_zeros(b, h, m, dv1)
    states = []
    for kv_n, decay_n, inject_n in zip(
        kv_loc.unbind(2), decay.unbind(-1), inject.unbind(-1), strict=True
    ):
        states.append(state)
        state = state * decay_n[..., None, None] + kv_n * inject_n[..., None, None]
    inter = (qc @ torch.stack(states, 2)) * w_inter.unsqueeze(-1)
    both = (intra + inter).reshape(b, h, n_chunks * c, dv1)[:, :, :n]
    return _safe_divide(both[..., :-1], both[..., -1], eps)


def linear_attention(
    q_features: Tensor,
    k_features: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    k_log_scale: Tensor | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
) -> Tensor:
    """Attention with non-negative feature maps, ``P_ij ∝ phi(q_i) . phi(k_j)``, linear in N.

    Args:
        q_features: ``(B, H, L, M)`` non-negative query features (a positive factor per query
            row cancels, so they may be stabilised per row).
        k_features: ``(B, H, S, M)`` non-negative key features (``S == L`` when causal).
        v: ``(B, H, S, Dv)`` values.
        is_causal: query i sees keys j <= i only (strictly).
        key_padding_mask: ``(B, S)`` bool, True = real token; padded keys get weight 0.
        k_log_scale: optional ``(B, H, S)``: the true key feature is
            ``k_features * exp(k_log_scale)`` (finite values; lets exponential features stay
            <= 1 without a look-ahead max). Treated as a constant offset: no gradient flows
            into it, so put any learnable part into ``k_features``.
        eps: added to the (offset-normalised) denominator; 0 = exact, rows without weight -> 0.
        chunk_size: tokens per chunk of the causal path (speed knob only).

    Returns:
        ``(B, H, L, Dv)`` in the dtype of ``v`` (computed in float32, float64 for float64).
    """
    check_qkv(q_features, k_features, v, same_length=is_causal)
    check_is_causal(is_causal)
    mask = check_key_padding_mask(key_padding_mask, k_features)
    check_nonnegative_float(eps, "eps")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    b, h, s = k_features.shape[:3]
    if k_log_scale is not None:
        if not isinstance(k_log_scale, Tensor) or tuple(k_log_scale.shape) != (b, h, s):
            got = tuple(k_log_scale.shape) if isinstance(k_log_scale, Tensor) else k_log_scale
            raise ValueError(f"k_log_scale must be a tensor of shape {(b, h, s)}, got {got}")
    cdt = compute_dtype(v.dtype)
    qf, kf, v_c = q_features.to(cdt), k_features.to(cdt), v.to(cdt)
    v_one = torch.cat([v_c, v_c.new_ones(*v_c.shape[:-1], 1)], -1)  # numerator + denominator
    log_r = kf.new_zeros(b, h, s) if k_log_scale is None else k_log_scale.detach().to(cdt)
    if mask is not None:
        log_r = log_r.masked_fill(~mask[:, None, :], NEG_INF)
        kf = kf.masked_fill(~mask[:, None, :, None], 0.0)
    if is_causal:
        out = _causal(qf, kf, v_one, log_r, chunk_size, eps)
    else:
        out = _noncausal(qf, kf, v_one, None if k_log_scale is None and mask is None else log_r,
                         eps)
    return out.to(v.dtype)


def elu_features(x: Tensor) -> Tensor:
    """``elu(x) + 1``: the positive feature map of "Transformers are RNNs" (same shape)."""
    return F.elu(x) + 1.0


def elu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
) -> Tensor:
    """ELU+1 linear attention (Katharopoulos et al. 2020).

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)`` (``S == L`` when causal); v: ``(B, H, S, Dv)``.
        is_causal: query i sees keys j <= i only.
        key_padding_mask: ``(B, S)`` bool, True = real token.
        eps: added to the denominator (the paper's code uses 1e-6; default 0 = exact).
        chunk_size: tokens per chunk of the causal path.

    Returns:
        ``(B, H, L, Dv)`` in the dtype of ``v``; equals ``elu_attention_matrix(q, k) @ v``.
    """
    check_qkv(q, k, v, same_length=is_causal)
    cdt = compute_dtype(q.dtype)
    out = linear_attention(
        elu_features(q.to(cdt)), elu_features(k.to(cdt)), v.to(cdt), is_causal=is_causal,
        key_padding_mask=key_padding_mask, eps=eps, chunk_size=chunk_size,
    )
    return out.to(v.dtype)


def elu_attention_matrix(
    q: Tensor, k: Tensor, *, is_causal: bool = False, key_padding_mask: Tensor | None = None
) -> Tensor:
    """The explicit ``(B, H, L, S)`` ELU+1 attention matrix (compute dtype), O(L S D)."""
    check_qkv(q, k, k, same_length=is_causal)
    check_is_causal(is_causal)
    mask = check_key_padding_mask(key_padding_mask, k)
    cdt = compute_dtype(q.dtype)
    weights = elu_features(q.to(cdt)) @ elu_features(k.to(cdt)).transpose(-1, -2)
    visible = visible_keys(
        q.shape[2], k.shape[2], is_causal=is_causal, key_padding_mask=mask, device=q.device
    )
    return normalize_rows(weights, visible)
