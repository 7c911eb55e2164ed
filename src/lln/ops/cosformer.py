"""cosFormer (Qin et al., ICLR 2022): ReLU features with a cosine re-weighting by distance.

The attention weight of query i on key j is::

    w_ij = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)

normalised over the visible keys. Because ``cos(a - b) = cos a cos b + sin a sin b`` it is
a linear attention with ``2D`` features ``[relu(x) cos(theta_t), relu(x) sin(theta_t)]``,
``theta_t = pi/2 * t / M`` (t the token index, from 0), so it runs through
:func:`lln.ops.elu.linear_attention` (causal, padding, linear cost).

**Choice of M.** The weight stays >= 0 (cos of an angle in ``[0, pi/2)``) as long as every
distance ``|i - j| < M``. ``max_len=None`` uses ``M = max(L, S)``, the input length (the
paper's and the authors' code's choice). Pass a fixed ``max_len`` (>= the length) to make
the output independent of how long the input is: needed for streaming, or to compare a
padded batch with unpadded runs (with the default M, padding a sequence changes M).

**Range.** Query rows are divided by their largest ReLU entry (it cancels) and keys by
theirs, carried as an exact per-key log-scale, so the result does not depend on the scale
of the inputs (tested from 1e-30 to 1e20 in float32).

Package decision: no maintained PyPI package provides a functional cosFormer with causal and
padding support, so it is implemented from the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import (
    check_is_causal,
    check_key_padding_mask,
    check_positive_int,
    check_qkv,
    compute_dtype,
)
from .elu import linear_attention, normalize_rows
from .naive import visible_keys


def _check_max_len(max_len: int | None, n_q: int, n_k: int) -> int:
    length = max(n_q, n_k)
    if max_len is None:
        return length
    max_len = check_positive_int(max_len, "max_len")
    if max_len < length:
        raise ValueError(
            f"max_len must be >= the sequence length max(L, S) = {length} (else the cosine "
            f"weights turn negative), got {max_len}"
        )
    return max_len


def _angles(n: int, max_len: int, dtype: torch.dtype, device) -> Tensor:
    """``theta_t = pi/2 * t / M`` for t = 0..n-1, shape ``(n, 1)``."""
    return (torch.arange(n, dtype=dtype, device=device) * (math.pi / (2 * max_len)))[:, None]


def cosformer_features(x: Tensor, max_len: int) -> Tensor:
    """``[relu(x) cos(theta_t), relu(x) sin(theta_t)]``: ``(B, H, N, D)`` -> ``(B, H, N, 2D)``."""
    theta = _angles(x.shape[2], max_len, x.dtype, x.device)
    x = torch.relu(x)
    return torch.cat([x * torch.cos(theta), x * torch.sin(theta)], -1)


def cosformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    max_len: int | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
) -> Tensor:
    """cosFormer attention, linear in N.

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)`` (``S == L`` when causal); v: ``(B, H, S, Dv)``.
        is_causal: query i sees keys j <= i only.
        key_padding_mask: ``(B, S)`` bool, True = real token.
        max_len: the M of the re-weighting (default: ``max(L, S)``; see the module docstring).
        eps: added to the denominator (default 0 = exact; a query whose ReLU features meet
            no visible key's gets a zero output).
        chunk_size: tokens per chunk of the causal path.

    Returns:
        ``(B, H, L, Dv)`` in the dtype of ``v``; equals ``cosformer_attention_matrix(q, k) @ v``.
    """
    check_qkv(q, k, v, same_length=is_causal)
    max_len = _check_max_len(max_len, q.shape[2], k.shape[2])
    cdt = compute_dtype(q.dtype)
    q_c, k_c = q.to(cdt), k.to(cdt)
    with torch.no_grad():  # exact rescalings that cancel in the ratio: no gradient
        q_top = _row_scale(q_c)
        k_top = _row_scale(k_c)
    out = linear_attention(
        cosformer_features(q_c / q_top, max_len), cosformer_features(k_c / k_top, max_len),
        v.to(cdt), is_causal=is_causal, key_padding_mask=key_padding_mask,
        k_log_scale=torch.log(k_top[..., 0]), eps=eps, chunk_size=chunk_size,
    )
    return out.to(v.dtype)


def _row_scale(x: Tensor) -> Tensor:
    """``max_d relu(x)`` per token (1 where it is 0 or not finite), ``(B, H, N, 1)``.

    The weights ``relu(q_i).relu(k_j)`` are invariant to a positive factor per query row,
    and a per-key factor is carried exactly as the key's log-scale (no look-ahead): dividing
    by them keeps every feature in [0, 1], so inputs of any magnitude (1e-30 or 1e30 in
    float32) neither underflow nor overflow.
    """
    top = torch.relu(x).amax(-1, keepdim=True)
    return torch.where((top > 0) & torch.isfinite(top), top, torch.ones_like(top))


def cosformer_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """The explicit ``(B, H, L, S)`` cosFormer matrix (compute dtype), from the definition
    ``relu(q_i).relu(k_j) cos(pi/2 (i - j) / M)`` (not from the decomposed features)."""
    check_qkv(q, k, k, same_length=is_causal)
    check_is_causal(is_causal)
    mask = check_key_padding_mask(key_padding_mask, k)
    n_q, n_k = q.shape[2], k.shape[2]
    max_len = _check_max_len(max_len, n_q, n_k)
    cdt = compute_dtype(q.dtype)
    i = torch.arange(n_q, dtype=cdt, device=q.device)[:, None]
    j = torch.arange(n_k, dtype=cdt, device=q.device)[None, :]
    reweight = torch.cos((math.pi / 2) * (i - j) / max_len)
    weights = (torch.relu(q.to(cdt)) @ torch.relu(k.to(cdt)).transpose(-1, -2)) * reweight
    visible = visible_keys(n_q, n_k, is_causal=is_causal, key_padding_mask=mask, device=q.device)
    return normalize_rows(weights, visible)
