"""Block-diagonal softmax attention: ordinary scaled softmax inside consecutive blocks.

The diagonal half of LLN+Diag (SPEC section 4). Tokens ``[m * block, (m + 1) * block)`` form
block ``m``; the last block may be partial; with ``is_causal`` the causal mask applies
inside each block. Cost O(N * block * D) time and O(N * block) memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    check_key_padding_mask,
    check_positive_float,
    check_positive_int,
    check_qkv,
    compute_dtype,
)

#: Tokens per segment of the block-diagonal path (rounded to whole blocks).
SEGMENT_TOKENS = 1024


def masked_softmax(logits: Tensor, visible: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``visible``; rows with nothing visible are 0."""
    logits = logits.masked_fill(~visible, float("-inf"))
    top = logits.detach().amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(logits - top)
    den = w.sum(-1, keepdim=True)
    return w / torch.where(den > 0, den, torch.ones_like(den))


def block_diag_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    *,
    block_size: int,
    is_causal: bool,
    scale: float,
) -> Tensor:
    """Block-diagonal attention on validated inputs, blocks aligned to token 0.

    Runs over segments of whole blocks (about ``SEGMENT_TOKENS`` tokens) so that temporaries
    stay cache-sized. Returns ``(B, H, N, Dv)`` in the compute dtype.
    """
    if mask is None:
        return _block_diag_sdpa(q, k, v, block_size, is_causal, scale)
    segment = block_size * max(1, SEGMENT_TOKENS // block_size)
    if q.shape[2] <= segment:
        return _block_diag_segment(q, k, v, mask, block_size, is_causal, scale)
    masks = [None] * -(-q.shape[2] // segment) if mask is None else mask.split(segment, 1)
    return torch.cat(
        [
            _block_diag_segment(*parts, block_size, is_causal, scale)
            for parts in zip(
                q.split(segment, 2), k.split(segment, 2), v.split(segment, 2), masks, strict=True
            )
        ],
        2,
    )


def _block_diag_sdpa(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, is_causal: bool, scale: float
) -> Tensor:
    """Without padding: the whole blocks as the batch of one fused SDPA call (flash kernel,
    no (N, block) score tensor kept for backward), the last partial block as another."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    whole = n // block_size * block_size
    sizes = [size for size in (whole, n - whole) if size]
    parts = zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), strict=True)
    outs = []
    for qp, kp, vp in [(q, k, v)] if len(sizes) == 1 else parts:  # (no copy in backward)
        size = min(block_size, qp.shape[2])
        blocks = (b * h, qp.shape[2] // size, size)
        out = F.scaled_dot_product_attention(
            qp.reshape(*blocks, d), kp.reshape(*blocks, d), vp.reshape(*blocks, dv),
            is_causal=is_causal, scale=scale,
        )
        outs.append(out.reshape(b, h, qp.shape[2], dv))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _block_diag_segment(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, block_size: int, is_causal: bool,
    scale: float,
) -> Tensor:
    b, h, n, d = q.shape
    dv = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    size = min(block_size, n)  # one partial block when the input is shorter than a block
    n_blocks = -(-n // size)
    pad = n_blocks * size - n
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        real = torch.nn.functional.pad(real, (0, pad), value=False)
    qb = q.view(b, h, n_blocks, size, d)
    kb = k.view(b, h, n_blocks, size, d)
    vb = v.view(b, h, n_blocks, size, dv)
    visible = real.view(b, 1, n_blocks, 1, size)
    if is_causal:
        visible = visible & torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    probs = masked_softmax((qb @ kb.transpose(-1, -2)) * scale, visible)
    return (probs @ vb).reshape(b, h, n_blocks * size, dv)[:, :, :n]


def check_block_args(block_size: int | None, scale: float | None, d: int) -> tuple[int, float]:
    """Validated ``(block_size, scale)`` with their defaults (head dim, ``1/sqrt(D)``)."""
    block_size = d if block_size is None else check_positive_int(block_size, "block_size")
    scale = 1.0 / math.sqrt(d) if scale is None else check_positive_float(scale, "scale")
    return block_size, scale


def block_diag_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int | None = None,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention inside consecutive diagonal blocks of ``block_size`` tokens.

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``.
        block_size: tokens per block (default: the head dim D, as in the reference code).
        is_causal: causal mask inside each block.
        key_padding_mask: ``(B, N)`` bool, True = real token. Rows that see no real key give 0.
        scale: score scale (default ``1 / sqrt(D)``, as in SDPA).

    Returns:
        ``(B, H, N, Dv)`` in the dtype of ``v`` (computed in float32, or float64).
    """
    check_qkv(q, k, v, same_length=True)
    mask = check_key_padding_mask(key_padding_mask, k)
    block_size, scale = check_block_args(block_size, scale, q.shape[-1])
    out = block_diag_forward(
        q, k, v, mask, block_size=block_size, is_causal=is_causal, scale=scale
    )
    return out.to(v.dtype)
