"""The recurrent state of causal LLN / LLN+Diag attention.

One class for every code path: chunked prefill, resuming, and token-by-token decoding all
chain calls through it, and running a sequence in pieces equals one call over the whole.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .moment_matching import PrefixMoments


@dataclass
class LLNState:
    """Everything causal LLN(+Diag) attention needs to continue a sequence.

    Key features are stored relative to a per-dimension running maximum of the scaled
    keys ``k_max`` (log-offset form, as in online softmax), so nothing overflows::

        kv    (B, H, D, Dv)  sum_j exp(beta_j k_j - k_max) v_j^T      over past real keys
        k_sum (B, H, D)      sum_j exp(beta_j k_j - k_max)
        k_max (B, H, D)      running max of beta_j k_j per dim (-inf before the first key)

    Tensors are float32 (float64 for float64 inputs). ``moments`` holds the prefix sums of
    the moment-matching statistics (None when alpha and beta were given). ``position``
    counts the tokens consumed so far. For LLN+Diag, ``block_k (B, H, L, D)``,
    ``block_v (B, H, L, Dv)`` and ``block_mask (B, L)`` hold the ``L = position %
    block_size`` tokens of the current, unfinished diagonal block (in the input dtype).

    Decoding one token reads and rewrites ``O(D * Dv)`` numbers, whatever the context length.
    """

    kv: Tensor
    k_sum: Tensor
    k_max: Tensor
    position: int
    stats: str | None = None
    moments: PrefixMoments | None = None
    block_size: int | None = None
    block_k: Tensor | None = None
    block_v: Tensor | None = None
    block_mask: Tensor | None = None

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        dim: int,
        value_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> LLNState:
        """The state before any token: zero sums and an offset of -inf."""
        return cls(
            kv=torch.zeros(batch, heads, dim, value_dim, dtype=dtype, device=device),
            k_sum=torch.zeros(batch, heads, dim, dtype=dtype, device=device),
            k_max=torch.full((batch, heads, dim), float("-inf"), dtype=dtype, device=device),
            position=0,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, D, Dv)`` of the sequences this state belongs to."""
        return tuple(self.kv.shape)  # type: ignore[return-value]

    def detach(self) -> LLNState:
        """A copy cut from the autograd graph (for truncated backprop through time)."""
        return self.map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> LLNState:
        """The same state on another device (dtypes are kept)."""
        return self.map(lambda t: t.to(device))

    def map(self, fn) -> LLNState:
        """Apply ``fn`` to every tensor of the state, including the moment sums."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, PrefixMoments):
                changes[f.name] = PrefixMoments(
                    **{g.name: fn(getattr(value, g.name)) for g in fields(value)}
                )
        return replace(self, **changes)
