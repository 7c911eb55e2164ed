"""``EncoderClassifier``: a bidirectional transformer with a sequence classification head.

Pre-norm trunk (:class:`~lln.models.transformer.Trunk`, learned positions), mean pooling
over the *real* tokens (padding excluded), then one linear layer to the class logits.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..ops._validation import check_positive_int
from .transformer import Trunk


class EncoderClassifier(nn.Module):
    """ids ``(B, N)`` (+ mask) -> class logits ``(B, num_classes)``.

    Args:
        vocab_size, max_len: token ids and longest sequence.
        num_classes: size of the output.
        **trunk_kw: sizes and attention of the :class:`Trunk` (``dim``, ``depth``,
            ``num_heads``, ``attention``, ``options``...); ``is_causal`` is always False.
    """

    def __init__(self, vocab_size: int, max_len: int, num_classes: int, **trunk_kw: Any) -> None:
        super().__init__()
        if trunk_kw.pop("is_causal", False):
            raise ValueError("EncoderClassifier is bidirectional: is_causal must be False")
        self.trunk = Trunk(vocab_size, max_len, is_causal=False, **trunk_kw)
        self.head = nn.Linear(self.trunk.norm.normalized_shape[0],
                              check_positive_int(num_classes, "num_classes"))

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``input_ids (B, N)``, ``key_padding_mask (B, N)`` bool True = real -> ``(B, C)``."""
        h = self.trunk(input_ids, key_padding_mask)
        if key_padding_mask is None:
            pooled = h.mean(1)
        else:
            weights = key_padding_mask.to(h.dtype).unsqueeze(-1)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.head(pooled)
