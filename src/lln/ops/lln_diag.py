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
from .lln import _reference, check_lln_args, lln_forward, segment_runner, warn_lost_rows
from .recurrent import lln_diag_step, takes_step_path
from .state import LLNState

#: Tokens per piece of the causal path (see ``lln_diag_attention``).
PIECE_TOKENS = 1024


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
    """LLN attention combined with softmax attention inside diagonal blocks.

    Args:
        q, k: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``.
        is_causal, key_padding_mask, alpha, beta, stats, temperature, constants, eps,
        chunk_size, initial_state, output_final_state: as in :func:`lln.lln_attention`.
        block_size: tokens per diagonal block (default D); blocks are aligned to the start
            of the sequence, also across chained calls.
        scale: softmax score scale inside blocks (default ``1 / sqrt(D)``).
        lln_weight, diag_weight: floats or tensors broadcastable to ``(B, H, 1, Dv)``.
        checkpoint: accepted for compatibility; no longer needed and no effect (see
            :func:`lln.lln_attention`): the causal LLN part keeps only its inputs and
            per-segment states for backward, and the diagonal part runs as fused SDPA,
            which keeps its inputs, output and log-sum-exp.

    Returns:
        ``out`` ``(B, H, N, Dv)`` in the dtype of ``v``, or ``(out, state)``.
    """
    check_qkv(q, k, v, same_length=True)
    block_size, scale = check_block_args(block_size, scale, q.shape[-1])
    mask = check_lln_args(
        q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, alpha=alpha,
        beta=beta, stats=stats, temperature=temperature, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state,
        block_size=block_size, constants=constants, checkpoint=checkpoint,
    )
    if takes_step_path(q.shape[2], is_causal, initial_state):  # decoding: the recurrent path
        out, state = lln_diag_step(
            q, k, v, mask, initial_state, alpha=alpha, beta=beta, stats=stats,
            temperature=temperature, constants=constants, eps=eps, block_size=block_size,
            scale=scale, lln_weight=lln_weight, diag_weight=diag_weight,
        )
        out = out if out.dtype == v.dtype else out.to(v.dtype)
        return (out, state) if output_final_state else out
    b, h, n, _ = q.shape
    cdt = compute_dtype(q.dtype)
    weight_shape = (b, h, 1, v.shape[-1])
    lln_w = broadcast_param(
        lln_weight, "lln_weight", weight_shape, dtype=cdt, device=q.device, positive=False
    )
    diag_w = broadcast_param(
        diag_weight, "diag_weight", weight_shape, dtype=cdt, device=q.device, positive=False
    )
    parts = dict(
        is_causal=is_causal, alpha=alpha, beta=beta, stats=stats, temperature=temperature,
        constants=constants, eps=eps, chunk_size=chunk_size, block_size=block_size,
        scale=scale, lln_weight=lln_w, diag_weight=diag_w,
    )
    if not is_causal and not _reference.active:
        # one NonCausalLLN call: both parts, the mixing and the hand-derived backward
        from .lln_function import DiagPart

        out, _, _ = lln_forward(
            q, k, v, is_causal=False, mask=mask, alpha=alpha, beta=beta, stats=stats,
            temperature=temperature, eps=eps, chunk_size=chunk_size, state=None,
            constants=constants,
            diag=(lln_w, diag_w, DiagPart(block_size=block_size, scale=scale, is_causal=False)),
        )
        return out.to(v.dtype)
    if not is_causal:
        return _lln_diag_piece(q, k, v, mask, None, **parts)[0].to(v.dtype)  # (lost = 0)
    if not _reference.active:
        # Causal: the LLN part is one autograd Function that works segment by segment (see
        # lln.ops.lln_function), the diagonal part one fused SDPA call over whole blocks (or
        # segments of blocks when padded), so one call covers the whole input.
        out, state, lost = _lln_diag_causal(q, k, v, mask, initial_state, **parts)
        warn_lost_rows(lost)
        out = out.to(v.dtype)
        return (out, state) if output_final_state else out
    # Reference (autograd through the ops, inside lln.ops.lln.reference_kernel()):
    # cache-sized pieces chained through the state, which is exact (chaining equals one
    # call); ``checkpoint`` runs each piece under activation checkpointing.
    state = initial_state
    carried = () if state is None else (state.kv, state.k_sum, state.block_k, state.block_v)
    run = segment_runner(
        _lln_diag_piece, checkpoint, q, k, v, lln_w, diag_w, *carried,
        *(t for t in (alpha, beta) if isinstance(t, Tensor)),
    )
    outs, lost = [], 0
    masks = [None] * -(-n // PIECE_TOKENS) if mask is None else mask.split(PIECE_TOKENS, 1)
    pieces = zip(
        q.split(PIECE_TOKENS, 2), k.split(PIECE_TOKENS, 2), v.split(PIECE_TOKENS, 2), masks,
        strict=True,
    )
    for q_piece, k_piece, v_piece, mask_piece in [(q, k, v, mask)] if n <= PIECE_TOKENS else pieces:
        out, state, lost_piece = run(q_piece, k_piece, v_piece, mask_piece, state, **parts)
        outs.append(out)
        lost = lost + lost_piece
    warn_lost_rows(lost)
    out = (torch.cat(outs, 2) if len(outs) > 1 else outs[0]).to(v.dtype)
    return (out, state) if output_final_state else out


def _lln_diag_causal(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: LLNState | None, *,
    alpha: float | Tensor | None, beta: float | Tensor | None, stats: str, temperature: float,
    constants: str, eps: float, chunk_size: int, block_size: int, scale: float,
    lln_weight: Tensor, diag_weight: Tensor, is_causal: bool = True,
) -> tuple[Tensor, LLNState, Tensor | int]:
    """Causal LLN+Diag in one :class:`lln.ops.lln_function.CausalLLN` call (both parts,
    the mixing and their hand-derived / recomputed backward). Returns the output in the
    compute dtype, the state after the input and the number of underflowed LLN rows."""
    from .lln_function import DiagPart

    b, _, n, _ = q.shape
    carried = 0 if state is None else state.position % block_size
    part = DiagPart(
        block_size=block_size, scale=scale, carried=carried,
        block_mask=None if not carried else state.block_mask,
    )
    block_k, block_v = (state.block_k, state.block_v) if carried else (None, None)
    out, new_state, lost = lln_forward(
        q, k, v, is_causal=True, mask=mask, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, eps=eps, chunk_size=chunk_size, state=state,
        block_size=block_size, constants=constants,
        diag=(lln_weight, diag_weight, block_k, block_v, part),
    )
    # the unfinished block after the input, as copies (a state owns its memory)
    start = (carried + n) // block_size * block_size - carried  # may be < 0: carried tokens
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    if start >= 0:
        tail = (k[:, :, start:], v[:, :, start:], real[:, start:])
    else:
        tail = (
            torch.cat([block_k[:, :, start:].to(k.dtype), k], 2),
            torch.cat([block_v[:, :, start:].to(v.dtype), v], 2),
            torch.cat([state.block_mask[:, start:], real], 1),
        )
    new_state.block_k, new_state.block_v, new_state.block_mask = (t.clone() for t in tail)
    return out, new_state, lost


def _lln_diag_piece(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    state: LLNState | None,
    *,
    is_causal: bool,
    alpha: float | Tensor | None,
    beta: float | Tensor | None,
    stats: str,
    temperature: float,
    constants: str,
    eps: float,
    chunk_size: int,
    block_size: int,
    scale: float,
    lln_weight: Tensor,
    diag_weight: Tensor,
) -> tuple[Tensor, LLNState | None, Tensor | int]:
    """LLN+Diag of one piece on validated inputs, continuing ``state`` when causal.

    Returns the output in the compute dtype, (causal) the state after the piece and the
    number of underflowed LLN rows (the caller warns, so a checkpointed piece recomputed
    in backward does not warn again).
    """
    b, h, n, d = q.shape
    lln_out, new_state, lost = lln_forward(
        q, k, v, is_causal=is_causal, mask=mask, alpha=alpha, beta=beta, stats=stats,
        temperature=temperature, eps=eps, chunk_size=chunk_size, state=state,
        block_size=block_size, constants=constants,
    )
    # The diagonal part of a continued sequence: prepend the unfinished block so that the
    # input starts on a block boundary, then drop the outputs of the prepended tokens.
    carried = 0 if state is None else state.position % block_size
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    if carried:
        q = torch.cat([q.new_zeros(b, h, carried, d), q], 2)
        k = torch.cat([state.block_k.to(k.dtype), k], 2)
        v = torch.cat([state.block_v.to(v.dtype), v], 2)
        real = torch.cat([state.block_mask, real], 1)
        mask = real  # (whether any is padded is data: no host read to pick the fused path)
    diag_out = block_diag_forward(
        q, k, v, mask, block_size=block_size, is_causal=is_causal, scale=scale
    )[:, :, carried:]
    out = torch.addcmul(lln_weight * lln_out, diag_weight, diag_out)
    if new_state is not None:
        start = (carried + n) // block_size * block_size  # first token of the unfinished block
        # copies: a state owns its memory (a caller may refill its k / v buffers)
        new_state.block_k = k[:, :, start:].clone()
        new_state.block_v = v[:, :, start:].clone()
        new_state.block_mask = real[:, start:].clone()
    return out, new_state, lost
