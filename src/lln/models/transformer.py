"""The transformer trunk shared by the encoder classifier and the decoder LM.

Token embedding + **learned absolute position embedding**, then ``depth`` pre-norm blocks
(``x + attn(LN(x))``, ``x + MLP(LN(x))`` with a GELU MLP), then a final LayerNorm. The
attention inside each block is :class:`~lln.models.attention.SelfAttention`, so only the
attention op differs between methods: every other parameter is identical in shape. For
cosFormer the re-weighting horizon M is set to ``max_len`` (not the batch's length), so a
sequence's outputs do not depend on how much padding its batch has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..ops._validation import check_positive_int
from .attention import SelfAttention


class ShortConv(nn.Module):
    """Causal depthwise convolution over the sequence: ``out_t = sum_s w_s * x_{t-s}``,
    ``s < kernel_size``, one weight per channel (``kernel_size * E`` parameters).

    Padded positions (``key_padding_mask`` False) are zeroed first, so they never leak into
    real ones whichever side the padding is on.
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = check_positive_int(kernel_size, "short_conv")
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, padding=kernel_size - 1,
                              bias=False)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if key_padding_mask is not None:
            x = x * key_padding_mask.unsqueeze(-1).to(x.dtype)
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class Block(nn.Module):
    """One pre-norm transformer block over ``(B, N, E)``: ``h = LN(x)`` (``+ conv(h)`` with a
    short convolution), ``x + attn(h)``, then ``x + MLP(LN(x))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, short_conv: int = 0,
        **attention_kw: Any,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv = ShortConv(dim, short_conv) if short_conv else None
        self.attn = SelfAttention(dim, num_heads, **attention_kw)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        h = self.norm1(x)
        if self.conv is not None:
            h = h + self.conv(h, key_padding_mask)
        x = x + self.dropout(self.attn(h, key_padding_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Trunk(nn.Module):
    """Embeddings, ``depth`` blocks and a final LayerNorm: ids ``(B, N)`` -> ``(B, N, E)``.

    Args:
        vocab_size: number of token ids.
        max_len: longest sequence (size of the learned position table).
        dim, depth, num_heads, mlp_ratio, dropout: the usual transformer sizes.
        short_conv: kernel size of a causal depthwise convolution applied to the attention
            input of every block (0 = none). It hands each token its predecessors, the
            "previous token" half of an induction head, so that recall tasks test the
            attention's content matching rather than how fast positions are learned.
        attention, is_causal, options, redraw_every, seed: passed to every
            :class:`SelfAttention` (each gets its own ``layer`` index).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        *,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        short_conv: int = 0,
        attention: str = "softmax",
        is_causal: bool = False,
        options: Mapping[str, Any] | None = None,
        redraw_every: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.max_len = check_positive_int(max_len, "max_len")
        depth = check_positive_int(depth, "depth")
        mlp_ratio = check_positive_int(mlp_ratio, "mlp_ratio")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size = vocab_size
        options = dict(options or {})
        if attention == "cosformer":
            # cosFormer's horizon M defaults to the input length, so padding would change the
            # outputs; the model's max_len makes every sequence use the same re-weighting.
            options.setdefault("max_len", self.max_len)
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(self.max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(
                dim, num_heads, mlp_ratio, dropout, short_conv, attention=attention,
                is_causal=is_causal,
                options=options, redraw_every=redraw_every, seed=seed, layer=i,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        #: context parallelism: this process holds the ``context_rank``-th of equal slices of
        #: every sequence, so its positions start at ``context_rank * N`` (N its slice length)
        self.context_rank = 0
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, input_ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``input_ids (B, N)`` long, ``key_padding_mask (B, N)`` bool (True = real token).

        Returns the final hidden states ``(B, N, E)``.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a (batch, seq) long tensor, got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        n = input_ids.shape[1]
        start = self.context_rank * n
        if start + n > self.max_len:
            raise ValueError(f"sequence length {start + n} exceeds max_len={self.max_len}")
        if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or key_padding_mask.shape != input_ids.shape
        ):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape {tuple(input_ids.shape)} "
                f"(True = real token), got {key_padding_mask.dtype} "
                f"{tuple(key_padding_mask.shape)}"
            )
        positions = torch.arange(start, start + n, device=input_ids.device)
        x = self.dropout(self.tokens(input_ids) + self.positions(positions))
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return self.norm(x)

    def attention_modules(self) -> list[SelfAttention]:
        return [block.attn for block in self.blocks]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"total", "attention_extra"}``: learnable parameters, and those that belong to the
    attention method itself (zero for every method but lln_diag with ``combine="scale"``)."""
    extra = sum(m.extra_parameter_count() for m in model.modules() if isinstance(m, SelfAttention))
    return {"total": sum(p.numel() for p in model.parameters()), "attention_extra": extra}
