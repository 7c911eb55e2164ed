"""LLN+Diag: LLN attention plus block-diagonal softmax attention (SPEC section 4).

``out = lln_weight * LLN(q, k, v) + diag_weight * BlockDiag(q, k, v)``, each part normalised
on its own. The default weights (0.5, 0.5) are the paper's average; tensors give the
learnable "scale" (``r * LLN + p * Diag``) and "ratio" (``r * LLN + (1 - r) * Diag``) forms.
Causal calls chain through :class:`LLNState`, which then also carries the keys and values of
the unfinished diagonal block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import broadcast_param, check_qkv, compute_dtype
from .block_diag import block_diag_forward, check_block_args
from .lln import check_lln_args, lln_forward
from .state import LLNState


def lln_diag_attention(
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
    eps: float = 0.0,
    chunk_size: int = 64,
    block_size: int | None = None,
    scale: float | None = None,
    lln_weight: float | Tensor = 0.5,
    diag_weight: float | Tensor = 0.5,
    initial_state: LLNState | None = None,
    output_final_state: bool = False,
) -> Tensor | tuple[Tensor, LLNState]:
    """LLN attention combined with softmax attention inside diagonal blocks.

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``.
        is_causal, key_padding_mask, alpha, beta, stats, temperature, eps, chunk_size,
        initial_state, output_final_state: as in :func:`lln.lln_attention`.
        block_size: tokens per diagonal block (default D); blocks are aligned to the start
            of the sequence, also across chained calls.
        scale: softmax score scale inside blocks (default ``1 / sqrt(D)``).
        lln_weight, diag_weight: floats or tensors broadcastable to ``(B, H, 1, Dv)``.

    Returns:
        ``out`` ``(B, H, N, Dv)`` in the dtype of ``v``, or ``(out, state)``.
    """
    check_qkv(q, k, v, same_length=True)
    block_size, scale = check_block_args(block_size, scale, q.shape[-1])
    mask = check_lln_args(
        q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, alpha=alpha,
        beta=beta, stats=stats, temperature=temperature, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state,
        block_size=block_size,
    )
    b, h, n, _ = q.shape
    cdt = compute_dtype(q.dtype)
    weight_shape = (b, h, 1, v.shape[-1])
    lln_w = broadcast_param(
        lln_weight, "lln_weight", weight_shape, dtype=cdt, device=q.device, positive=False
    )
    diag_w = broadcast_param(
        diag_weight, "diag_weight", weight_shape, dtype=cdt, device=q.device, positive=False
    )
    lln_out, state = lln_forward(
        q, k, v, is_causal=is_causal, mask=mask, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, eps=eps, chunk_size=chunk_size, state=initial_state,
        block_size=block_size,
    )

    # The diagonal part of a continued sequence: prepend the unfinished block so that the
    # input starts on a block boundary, then drop the outputs of the prepended tokens.
    carried = 0 if initial_state is None else initial_state.position % block_size
    qd, kd, vd, maskd = q, k, v, mask
    if carried:
        real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
        qd = torch.cat([q.new_zeros(b, h, carried, q.shape[-1]), q], 2)
        kd = torch.cat([initial_state.block_k.to(k.dtype), k], 2)
        vd = torch.cat([initial_state.block_v.to(v.dtype), v], 2)
        maskd = torch.cat([initial_state.block_mask, real], 1)
    diag_out = block_diag_forward(
        qd, kd, vd, maskd, block_size=block_size, is_causal=is_causal, scale=scale
    )[:, :, carried:]

    out = (lln_w * lln_out + diag_w * diag_out).to(v.dtype)
    if not output_final_state:
        return out
    total = carried + n
    tail = total % block_size
    start = total - tail
    real = torch.ones(b, total, dtype=torch.bool, device=q.device) if maskd is None else maskd
    state.block_size = block_size
    state.block_k = kd[:, :, start:]
    state.block_v = vd[:, :, start:]
    state.block_mask = real[:, start:]
    return out, state
