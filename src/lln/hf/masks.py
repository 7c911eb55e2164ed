"""The mask function registered with transformers' ``AttentionMaskInterface``.

Transformers builds masks through a per-implementation mask function; for an implementation
it does not know it passes ``attention_mask=None``, so padding would be silently ignored.
LLN needs no (L, S) mask — causality is the ``is_causal`` flag of the attention module — only
which keys are real. :func:`padding_mask` therefore hands the attention the 2-D boolean
padding mask ``(B, kv_length)`` (True = real token), or None when nothing is padded.

Only the plain causal and bidirectional patterns are supported: packed sequences, sliding
windows and overlays (``or_mask_function`` / ``and_mask_function``) change which keys a query
sees in ways a linear-attention state cannot express, and raise ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _plain_mask_functions() -> tuple:
    from transformers import masking_utils

    return tuple(
        f for f in (getattr(masking_utils, "causal_mask_function", None),
                    getattr(masking_utils, "bidirectional_mask_function", None))
        if f is not None
    )


def padding_mask(
    batch_size: int | None = None,
    *args,
    kv_length: int | None = None,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """``AttentionMaskInterface`` function: the ``(B, kv_length)`` bool key padding mask.

    Accepts the keyword arguments of transformers 4.56 (``cache_position``) to 5.x
    (``q_length``, ``q_offset``). Returns None when ``attention_mask`` is None or marks every
    key as real, so the attention takes its unpadded fast path.
    """
    if mask_function is not None and mask_function not in _plain_mask_functions():
        raise ValueError(
            "LLN attention supports padding masks with plain causal or bidirectional attention "
            f"only; got the mask pattern {getattr(mask_function, '__name__', mask_function)!r} "
            "(packed sequences, sliding windows or mask overlays are not expressible as a "
            "linear-attention state)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if kv_length is not None:
        end = kv_offset + kv_length
        if mask.shape[-1] < end:  # as transformers does: positions beyond the mask are padding
            mask = torch.nn.functional.pad(mask, (0, end - mask.shape[-1]), value=False)
        mask = mask[:, kv_offset:end]
    if bool(mask.all()):
        return None
    return mask


def key_padding_mask_from_hf(
    attention_mask: Tensor | None, batch: int, kv_len: int
) -> Tensor | None:
    """The ``(B, kv_len)`` bool key padding mask from what reaches the attention function.

    ``attention_mask`` is normally the output of :func:`padding_mask` (2-D bool, or None);
    a 2-D 0/1 integer or float mask is accepted too. 4-D masks (a model that built its own
    (L, S) mask) raise ``ValueError``: LLN cannot apply an arbitrary (L, S) pattern.
    Only the last ``kv_len`` columns are used (with an LLN cache the keys passed to the
    attention are the new tokens only, the mask covers past + new).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "LLN attention needs a 2-D (batch, kv_length) padding mask; got attention_mask of "
            f"shape {tuple(attention_mask.shape)}. Register the mask function with "
            "lln.hf.register() and pass a 2-D attention_mask (1 = real token) to the model."
        )
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < kv_len:
        raise ValueError(
            f"attention_mask must have shape (batch, >= kv_length) = ({batch}, >= {kv_len}), "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, attention_mask.shape[1] - kv_len:]
    if mask.dtype != torch.bool:
        mask = mask != 0
    # (no "all real -> None" here: that host read would synchronise once per layer and
    # token; :func:`padding_mask` already returns None for an unpadded batch, once a forward)
    return mask
