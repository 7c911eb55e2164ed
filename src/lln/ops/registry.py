"""One table of every attention the library implements, under one functional signature.

Every entry's ``fn`` is called as ``fn(q, k, v, *, is_causal=False, key_padding_mask=None,
**options)`` on ``(batch, heads, seq, dim)`` tensors and returns ``(B, H, L, Dv)``;
``key_padding_mask`` is ``(B, S)`` bool with True = real token. Where a method cannot do
something (causal Nystromformer, padding in the reference LLN formula) ``fn`` raises a
``ValueError`` naming the argument, and the spec says so in ``supports_causal`` /
``supports_padding`` so that callers can skip it up front.

``matrix`` (when not None) returns the ``(B, H, L, S)`` attention weights the op implies,
``matrix(q, k, *, is_causal=False, key_padding_mask=None, **options)``, so that
``matrix(q, k) @ v`` is the op's output: the quadratic definition the op is tested against,
and the input of the concentration instruments (entropy, spectral gap).

    >>> import lln
    >>> spec = lln.get_attention("performer")
    >>> out = spec.fn(q, k, v, is_causal=True, num_features=128)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .block_diag import block_diag_attention
from .cosformer import cosformer_attention, cosformer_attention_matrix
from .elu import elu_attention, elu_attention_matrix
from .lln import lln_attention
from .lln_diag import lln_diag_attention
from .naive import block_diag_attention_matrix, lln_attention_matrix, lln_diag_attention_matrix
from .nystrom import nystrom_attention, nystrom_attention_matrix
from .performer import performer_attention, performer_attention_matrix
from .reference import lln_attention_reference
from .softmax import softmax_attention, softmax_attention_matrix


@dataclass(frozen=True)
class AttentionSpec:
    """What the registry knows about one attention method.

    Attributes:
        name: the registry key.
        fn: ``fn(q, k, v, *, is_causal=False, key_padding_mask=None, **options)`` ->
            ``(B, H, L, Dv)``.
        matrix: ``matrix(q, k, *, is_causal=False, key_padding_mask=None, **options)`` ->
            ``(B, H, L, S)`` weights with ``matrix(q, k) @ v == fn(q, k, v)``; None when the
            method has no explicit matrix here.
        supports_causal: whether ``is_causal=True`` is implemented.
        supports_padding: whether ``key_padding_mask`` is implemented.
        linear: whether time and memory grow linearly in the sequence length.
        random_features: whether the output depends on random draws (Performer).
        description: one line for tables and ``--help``.
    """

    name: str
    fn: Callable[..., Tensor]
    matrix: Callable[..., Tensor] | None
    supports_causal: bool
    supports_padding: bool
    linear: bool
    random_features: bool
    description: str


def lln_reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`lln.ops.reference.lln_attention_reference` under the registry signature.

    The reference formula has no padding support: a ``key_padding_mask`` raises ValueError.
    Its output is float32 whatever the input dtype (as in the authors' code).
    """
    if key_padding_mask is not None:
        raise ValueError(
            "lln_reference does not support key_padding_mask (the authors' formula has no "
            "padding); pass key_padding_mask=None or use 'lln'"
        )
    return lln_attention_reference(q, k, v, is_causal=is_causal, eps=eps)


ATTENTIONS: dict[str, AttentionSpec] = {
    spec.name: spec
    for spec in (
        AttentionSpec(
            name="softmax",
            fn=softmax_attention,
            matrix=softmax_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=False,
            random_features=False,
            description="softmax attention (torch scaled_dot_product_attention), O(N^2)",
        ),
        AttentionSpec(
            name="lln",
            fn=lln_attention,
            matrix=lln_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=True,
            random_features=False,
            description="Linear Log-Normal attention, exp(alpha q) / exp(beta k) features",
        ),
        AttentionSpec(
            name="lln_diag",
            fn=lln_diag_attention,
            matrix=lln_diag_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=True,
            random_features=False,
            description="LLN + block-diagonal softmax, averaged",
        ),
        AttentionSpec(
            name="block_diag",
            fn=block_diag_attention,
            matrix=block_diag_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=True,
            random_features=False,
            description="softmax attention inside consecutive diagonal blocks only",
        ),
        AttentionSpec(
            name="lln_reference",
            fn=lln_reference_attention,
            matrix=None,
            supports_causal=True,
            supports_padding=False,
            linear=False,  # linear when non-causal; its causal mode materialises N x N
            random_features=False,
            description="the authors' LLN formula (whole-tensor statistics; causal mode looks "
            "ahead and is O(N^2))",
        ),
        AttentionSpec(
            name="elu",
            fn=elu_attention,
            matrix=elu_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=True,
            random_features=False,
            description="ELU+1 linear attention (Katharopoulos et al. 2020)",
        ),
        AttentionSpec(
            name="performer",
            fn=performer_attention,
            matrix=performer_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=True,
            random_features=True,
            description="Performer FAVOR+, positive orthogonal random features "
            "(Choromanski et al. 2021)",
        ),
        AttentionSpec(
            name="cosformer",
            fn=cosformer_attention,
            matrix=cosformer_attention_matrix,
            supports_causal=True,
            supports_padding=True,
            linear=True,
            random_features=False,
            description="cosFormer, ReLU features with cos re-weighting (Qin et al. 2022)",
        ),
        AttentionSpec(
            name="nystrom",
            fn=nystrom_attention,
            matrix=nystrom_attention_matrix,
            supports_causal=False,
            supports_padding=True,
            linear=True,
            random_features=False,
            description="Nystromformer, segment-mean landmarks (Xiong et al. 2021), "
            "non-causal",
        ),
    )
}


def attention_names() -> list[str]:
    """The registry keys, in registry order (softmax first, then LLN variants, then others)."""
    return list(ATTENTIONS)


def get_attention(name: str) -> AttentionSpec:
    """The :class:`AttentionSpec` registered under ``name``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"attention name must be a str, got {type(name).__name__}")
    try:
        return ATTENTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention {name!r}; valid names: {', '.join(attention_names())}"
        ) from None
