"""``SelfAttention``: multi-head self-attention with any attention from the registry inside.

The module owns what every attention shares — the fused q/k/v projection and the output
projection — and calls ``lln.ops.registry.get_attention(name).fn`` on ``(B, H, N, Dh)``
tensors, so every method trains with the same parameters and the same code around it.
What is specific to one method lives here too, and nowhere else:

* **Random features** (``spec.random_features``, e.g. Performer): the projection is a
  *buffer* (saved in checkpoints, not trained), drawn from a generator seeded by
  ``(seed, layer, draw number)`` and redrawn every ``redraw_every`` training forwards
  (``None`` = never). The count of training forwards is a buffer as well, so a resumed run
  redraws exactly where an uninterrupted one would, and every data-parallel rank holds the
  same projection without communicating.
* **LLN / LLN+Diag** moment-match their feature scales per sequence and head inside the op
  (``stats`` option, default ``"head"``). For ``lln_diag``, ``combine="scale"`` adds the
  paper's learnable mixing weights ``r, p`` of shape ``(1, H, 1, Dh)`` (init 0.5): the only
  attention-specific parameters; :meth:`SelfAttention.extra_parameter_count` reports them.
* Every other option (``block_size``, ``num_features``, ``num_landmarks``...) is passed to
  the op unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..ops._validation import check_positive_int

#: lln_diag mixing modes handled by the module (the op takes the weights as arguments).
COMBINE_MODES = ("average", "scale")


def _registry():
    """The attention registry, imported lazily (it imports every baseline)."""
    from ..ops import registry

    return registry


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``x (B, N, E)`` with a pluggable attention op.

    Args:
        dim: model width E (split into ``num_heads`` heads of ``E // num_heads``).
        num_heads: number of heads H.
        attention: a registry name (``lln.ops.registry.attention_names()``).
        is_causal: causal self-attention (the attention must support it).
        options: keyword options for the attention op (see its docstring). Handled here
            rather than passed on: ``combine`` (lln_diag: ``"average"`` or ``"scale"``) and,
            for random-feature methods, ``num_features`` (default
            ``lln.ops.performer.default_num_features(head_dim)``).
        redraw_every: random-feature methods only: redraw the projection every this many
            training forwards (None = keep the first draw).
        seed: seeds the random-feature draws (with ``layer``).
        layer: index of this layer in its model (decorrelates the draws of the layers).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attention: str = "softmax",
        is_causal: bool = False,
        options: Mapping[str, Any] | None = None,
        redraw_every: int | None = None,
        seed: int = 0,
        layer: int = 0,
    ) -> None:
        super().__init__()
        dim, num_heads = check_positive_int(dim, "dim"), check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        spec = _registry().get_attention(attention)
        if is_causal and not spec.supports_causal:
            raise ValueError(
                f"attention {attention!r} does not support is_causal=True (use it for "
                "non-causal tasks only)"
            )
        if redraw_every is not None:
            redraw_every = check_positive_int(redraw_every, "redraw_every")
        self.spec, self.attention, self.is_causal = spec, attention, is_causal
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.redraw_every, self.seed, self.layer = redraw_every, seed, layer
        self.options = dict(options or {})
        self.combine = self.options.pop("combine", "average")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.combine != "average" and attention != "lln_diag":
            raise ValueError(
                f"combine={self.combine!r} applies to lln_diag only, not {attention!r}"
            )

        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        #: process group of a context-parallel run (``lln.train.distributed.context_parallel``):
        #: then x holds this rank's slice of the sequence and ``lln.distributed`` runs the op
        self.context_group = None
        if self.combine == "scale":
            shape = (1, num_heads, 1, self.head_dim)
            self.lln_weight = nn.Parameter(torch.full(shape, 0.5))
            self.diag_weight = nn.Parameter(torch.full(shape, 0.5))
        if spec.random_features:
            from ..ops.performer import default_num_features

            self.num_features = check_positive_int(
                self.options.pop("num_features", default_num_features(self.head_dim)),
                "num_features",
            )
            self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long))
            self.register_buffer("projection", self._draw(0))

    def extra_repr(self) -> str:
        extra = f", combine={self.combine!r}" if self.combine != "average" else ""
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, attention={self.attention!r}, "
            f"is_causal={self.is_causal}{extra}, options={self.options}"
        )

    def extra_parameter_count(self) -> int:
        """Learnable parameters beyond the q/k/v/out projections (e.g. lln_diag's mixing)."""
        shared = {id(p) for p in (*self.qkv.parameters(), *self.out.parameters())}
        return sum(p.numel() for p in self.parameters() if id(p) not in shared)

    def _draw(self, draw: int) -> Tensor:
        """Projection number ``draw``: a pure function of (seed, layer, draw)."""
        from ..ops.performer import draw_orthogonal_projection

        generator = torch.Generator().manual_seed((self.seed * 1009 + self.layer) * 100_003 + draw)
        return draw_orthogonal_projection(self.num_features, self.head_dim, generator=generator)

    def _maybe_redraw(self) -> None:
        if not self.training:
            return
        count = int(self.training_forwards)
        if self.redraw_every is not None and count > 0 and count % self.redraw_every == 0:
            self.projection.copy_(self._draw(count // self.redraw_every))
        self.training_forwards += 1

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x (B, N, E)``, ``key_padding_mask (B, N)`` bool True = real token (or None).

        Returns ``(B, N, E)``. Outputs at padded positions are defined but meaningless.
        """
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None  # every op is fastest (and some only work) without a mask
        if key_padding_mask is not None and not self.spec.supports_padding:
            raise ValueError(
                f"attention {self.attention!r} does not support padding; this batch has "
                "padded tokens"
            )
        options = dict(self.options)
        if self.combine == "scale":
            options.update(lln_weight=self.lln_weight, diag_weight=self.diag_weight)
        if self.spec.random_features:
            with torch.no_grad():
                self._maybe_redraw()
            options["projection"] = self.projection
        if self.context_group is not None:
            from .. import distributed as context

            fn = context.lln_attention if self.attention == "lln" else context.lln_diag_attention
            out = fn(q, k, v, group=self.context_group, key_padding_mask=key_padding_mask,
                     **options)
        else:
            out = self.spec.fn(
                q, k, v, is_causal=self.is_causal, key_padding_mask=key_padding_mask, **options
            )
        return self.out(out.transpose(1, 2).reshape(b, n, self.dim))
