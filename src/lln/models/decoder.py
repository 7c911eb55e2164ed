"""``DecoderLM``: a causal transformer with per-position output logits.

Used for next-byte language modelling and for MQAR (a label per query position): the
trunk is :class:`~lln.models.transformer.Trunk` with ``is_causal=True`` (learned positions),
followed by an untied linear head to ``num_outputs`` logits at every position.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..ops._validation import check_positive_int
from .transformer import Trunk


class DecoderLM(nn.Module):
    """ids ``(B, N)`` (+ mask) -> logits ``(B, N, num_outputs)``; position i sees ids <= i.

    Args:
        vocab_size, max_len: token ids and longest sequence.
        num_outputs: logits per position (default ``vocab_size``).
        **trunk_kw: sizes and attention of the :class:`Trunk`; ``is_causal`` is always True.
    """

    def __init__(
        self, vocab_size: int, max_len: int, num_outputs: int | None = None, **trunk_kw: Any
    ) -> None:
        super().__init__()
        if not trunk_kw.pop("is_causal", True):
            raise ValueError("DecoderLM is causal: is_causal must be True")
        self.trunk = Trunk(vocab_size, max_len, is_causal=True, **trunk_kw)
        outputs = check_positive_int(num_outputs or vocab_size, "num_outputs")
        self.head = nn.Linear(self.trunk.norm.normalized_shape[0], outputs)

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``input_ids (B, N)``, ``key_padding_mask (B, N)`` bool True = real -> ``(B, N, V)``."""
        return self.head(self.trunk(input_ids, key_padding_mask))
