"""Softmax attention: :func:`torch.nn.functional.scaled_dot_product_attention` under the
library's signature, and its explicit matrix.

``softmax_attention`` adds to SDPA what the other ops here have: a ``(B, S)`` key padding
mask (True = real token), causal masking combined with it, and a zero output (not NaN) for a
query that sees no real key. It runs in the input dtype, exactly as SDPA does (this is the
baseline every other method is compared with, so it is not upcast).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from ._validation import check_key_padding_mask, check_positive_float, check_qkv, compute_dtype
from .block_diag import masked_softmax
from .elu import check_is_causal
from .naive import visible_keys


def _check_scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else check_positive_float(scale, "scale")


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product softmax attention.

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)`` (``S == L`` when causal); v: ``(B, H, S, Dv)``.
        is_causal: query i sees keys j <= i only.
        key_padding_mask: ``(B, S)`` bool, True = real token. A query that sees no real key
            gets a zero output.
        scale: logit scale (default ``1 / sqrt(D)``).

    Returns:
        ``(B, H, L, Dv)`` in the input dtype.
    """
    check_qkv(q, k, v, same_length=is_causal)
    check_is_causal(is_causal)
    mask = check_key_padding_mask(key_padding_mask, k)
    scale = _check_scale(scale, q.shape[-1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    visible = visible_keys(
        q.shape[2], k.shape[2], is_causal=is_causal, key_padding_mask=mask, device=q.device
    )  # (B, 1, L, S)
    seen = visible.any(-1, keepdim=True)  # (B, 1, L, 1)
    # rows that see nothing attend everywhere (finite, no NaN in forward or backward), then 0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~seen, scale=scale)
    return out * seen.to(out.dtype)


def softmax_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The explicit ``(B, H, L, S)`` softmax attention matrix (compute dtype: float32, or
    float64 for float64 inputs); rows that see no real key are 0."""
    check_qkv(q, k, k, same_length=is_causal)
    check_is_causal(is_causal)
    mask = check_key_padding_mask(key_padding_mask, k)
    scale = _check_scale(scale, q.shape[-1])
    cdt = compute_dtype(q.dtype)
    logits = (q.to(cdt) @ k.to(cdt).transpose(-1, -2)) * scale
    visible = visible_keys(
        q.shape[2], k.shape[2], is_causal=is_causal, key_padding_mask=mask, device=q.device
    )
    return masked_softmax(logits, visible)
