"""Block-diagonal softmax with blocks aligned to each sequence's own first real token.

``lln.block_diag_attention`` aligns blocks to token 0 of the tensor. In a padded batch that
would make a left-padded sample's blocks depend on how much padding it got, so the padded
batch would differ from the sample run alone. Here every sequence is first *compacted*
(its real tokens moved to the front, order kept), the blocks are laid from there, and the
outputs are scattered back. Decoding continues a sequence through a :class:`DiagWindow`:
the keys and values of its current, unfinished block (at most ``block_size`` tokens, a
different count per sample), so every step costs O(block_size) whatever the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.block_diag import block_diag_attention


@dataclass
class DiagWindow:
    """The unfinished diagonal block of each sequence of a batch.

    ``k (B, H, W, D)``, ``v (B, H, W, Dv)`` with ``W = block_size``; entries
    ``[0, count[b])`` of sample ``b`` are its real tokens since its last block boundary.
    """

    k: Tensor
    v: Tensor
    count: Tensor  # (B,) int64

    def map(self, fn) -> DiagWindow:
        """Apply ``fn`` to every tensor (all have the batch first), e.g. for beam search."""
        return DiagWindow(fn(self.k), fn(self.v), fn(self.count))


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, H, T, E)`` reordered along T by ``index (B, T)``."""
    b, h, _, e = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], e))


def aligned_block_diag(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    *,
    block_size: int,
    scale: float,
    is_causal: bool,
    window: DiagWindow | None = None,
    output_window: bool = False,
) -> tuple[Tensor, DiagWindow | None]:
    """Block-diagonal softmax of ``q, k (B, H, L, D)``, ``v (B, H, L, Dv)`` per sequence.

    Args:
        key_padding_mask: ``(B, L)`` bool, True = real token (None = all real). Blocks start
            at each sequence's first real token (after ``window``); padded positions get 0.
        window: the unfinished block carried from earlier tokens (causal decoding).
        output_window: also return the unfinished block after these tokens.

    Returns:
        ``(out (B, H, L, Dv) in the dtype of v, window or None)``.
    """
    b, h, n, d = q.shape
    if window is not None and n == 1:  # decoding: the window plus one token, no compaction
        return _window_step(q, k, v, key_padding_mask, window, block_size=block_size,
                            scale=scale, output_window=output_window)
    if key_padding_mask is None and window is None and not output_window:
        out = block_diag_attention(q, k, v, block_size=block_size, is_causal=is_causal, scale=scale)
        return out, None
    real = (
        torch.ones(b, n, dtype=torch.bool, device=q.device)
        if key_padding_mask is None else key_padding_mask
    )
    carried = 0
    if window is not None:
        carried = window.k.shape[2]
        q = torch.cat([q.new_zeros(b, h, carried, d), q], 2)
        k = torch.cat([window.k.to(k.dtype), k], 2)
        v = torch.cat([window.v.to(v.dtype), v], 2)
        slots = torch.arange(carried, device=q.device)
        real = torch.cat([slots[None, :] < window.count[:, None], real], 1)
    total = real.shape[1]
    # real tokens first, in their order (a stable sort of "is padding")
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
    n_real = real.sum(1)
    real_c = torch.arange(total, device=q.device)[None, :] < n_real[:, None]
    q_c, k_c, v_c = (_gather_tokens(t, order) for t in (q, k, v))
    out_c = block_diag_attention(
        q_c, k_c, v_c, block_size=block_size, is_causal=is_causal, key_padding_mask=real_c,
        scale=scale,
    )
    out_c = out_c * real_c[:, None, :, None].to(out_c.dtype)  # padded queries: 0
    out = torch.empty_like(out_c).scatter_(
        2, order[:, None, :, None].expand_as(out_c), out_c
    )[:, :, carried:]
    new_window = None
    if output_window:
        keep = n_real % block_size
        slots = torch.arange(block_size, device=q.device)
        index = ((n_real - keep)[:, None] + slots[None, :]).clamp_max(total - 1)
        new_window = DiagWindow(_gather_tokens(k_c, index), _gather_tokens(v_c, index), keep)
    return out, new_window


def _window_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    window: DiagWindow,
    *,
    block_size: int,
    scale: float,
    output_window: bool,
) -> tuple[Tensor, DiagWindow | None]:
    """:func:`aligned_block_diag` of one token ``(B, H, 1, D)`` continuing ``window``.

    The token's key and value are written at slot ``count[b]`` of the window first (in
    place when autograd is off: the window is the cache's own buffer, so a step copies
    nothing), then its query attends to slots ``< count[b] + real[b]`` with one ``(1, W)``
    score row. Only tensor ops (no host read of ``count``), a fixed number whatever the
    context."""
    b, h, _, d = q.shape
    real = (torch.ones(b, dtype=torch.bool, device=q.device) if key_padding_mask is None
            else key_padding_mask[:, -1])
    index = window.count[:, None, None, None]
    keys, values = window.k, window.v
    new_k, new_v = k.to(keys.dtype), v.to(values.dtype)
    if torch.is_grad_enabled() and (keys.requires_grad or new_k.requires_grad
                                    or values.requires_grad or new_v.requires_grad):
        keys = keys.scatter(2, index.expand_as(new_k), new_k)
        values = values.scatter(2, index.expand_as(new_v), new_v)
    else:
        keys.scatter_(2, index.expand_as(new_k), new_k)
        values.scatter_(2, index.expand_as(new_v), new_v)
    count = window.count + real.to(window.count.dtype)
    visible = torch.arange(keys.shape[2], device=q.device) < count[:, None]
    visible = visible[:, None, None, :]  # (B, 1, 1, W)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q.to(cdt) @ keys.to(cdt).transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    probs = torch.where(visible, probs, 0.0)  # a row that sees nothing is 0, not NaN
    out = (probs @ values.to(cdt)) * real[:, None, None, None].to(cdt)  # padded query: 0
    new_window = None
    if output_window:  # a finished block starts anew
        new_window = DiagWindow(keys, values, torch.where(count == block_size, 0, count))
    return out.to(v.dtype), new_window
