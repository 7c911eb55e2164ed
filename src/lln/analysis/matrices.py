"""The explicit attention matrix of every attention in the library, for the instruments.

Each method goes through :mod:`lln.ops.registry` (``spec.matrix``), so the matrix is built
with exactly the feature maps, statistics and masks of the fast path. Besides the registry
names this module adds LLN variants that the paper's analysis compares:

``lln_fixed``      LLN without moment matching, ``alpha = beta = 1``.
``lln_performer``  the reference code's "Performer" variant, ``alpha = beta = D^(-1/4)``
                   (the softmax scale ``1/sqrt(D)`` split between queries and keys).
``lln_dim``        moment-matched LLN with the constants ``(a, b)`` calibrated for the actual
                   head dim (``constants="head_dim"``,
                   :func:`lln.ops.moment_matching.moment_constants`) instead of the paper's
                   D = 64 values.
``lln_entropy``    entropy-matched LLN (:mod:`lln.ops.entropy_matching`, default closed
                   form, N-aware), with moment matching's statistics (prefix statistics when
                   causal).
``lln_entropy_linear``  the same with the N-free closed form ``c0 + c1 log2 D + c2 s``.
``lln_entropy_noncausal_fit``  ``lln_entropy`` with the coefficients fitted on non-causal
                   matrices even when causal (does one fit serve both?).

    >>> p = attention_matrix("softmax", q, k, is_causal=True)     # doctest: +SKIP
    >>> mean_entropy(p, normalize=True, is_causal=True)           # doctest: +SKIP
"""

from __future__ import annotations

from torch import Tensor

from ..ops.entropy_matching import DEFAULT_FORM
from ..ops.naive import lln_attention_matrix
from ..ops.registry import ATTENTIONS, get_attention

#: Extra LLN variants (name -> description) on top of the registry's methods.
LLN_VARIANTS: dict[str, str] = {
    "lln_fixed": "LLN without moment matching, alpha = beta = 1",
    "lln_performer": "LLN with alpha = beta = D^(-1/4) (the reference code's 'Performer' variant)",
    "lln_dim": "moment-matched LLN with the head-dim constants (a, b)",
    "lln_entropy": "entropy-matched LLN (N-aware closed form)",
    "lln_entropy_linear": "entropy-matched LLN (N-free closed form c0 + c1 log2 D + c2 s)",
    "lln_entropy_noncausal_fit": "entropy-matched LLN with the non-causal coefficients",
}


def analysis_methods() -> dict[str, str]:
    """Every method :func:`attention_matrix` accepts, name -> one-line description."""
    methods = {name: spec.description for name, spec in ATTENTIONS.items() if spec.matrix}
    methods.update(LLN_VARIANTS)
    return methods


def attention_matrix(
    method: str,
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    **options,
) -> Tensor:
    """The row-stochastic attention matrix of ``method`` on ``q (B, H, L, D)``, ``k (B, H, S, D)``.

    Args:
        method: a name from :func:`analysis_methods` (registry names such as ``"softmax"``,
            ``"lln"``, ``"lln_diag"``, ``"elu"``, plus the LLN variants of this module).
        is_causal: query i sees keys j <= i only.
        key_padding_mask: ``(B, S)`` bool, True = real token.
        **options: passed on to the method (e.g. ``temperature`` for LLN, ``block_size`` for
            LLN+Diag).

    Returns:
        ``(B, H, L, S)`` weights in the compute dtype (float64 for float64 inputs) with
        ``matrix @ v`` equal to the method's output.

    Raises:
        ValueError: unknown method, or a method without an explicit matrix.
    """
    if method == "lln_dim":
        return lln_attention_matrix(q, k, is_causal=is_causal,
                                    key_padding_mask=key_padding_mask, constants="head_dim",
                                    **options)
    if method in ("lln_entropy", "lln_entropy_linear", "lln_entropy_noncausal_fit"):
        from ..ops.entropy_matching import entropy_match

        form = "linear" if method == "lln_entropy_linear" else options.pop("form", DEFAULT_FORM)
        alpha, beta = entropy_match(
            q, k, stats=options.pop("stats", "head"), is_causal=is_causal,
            key_padding_mask=key_padding_mask, temperature=options.pop("temperature", 1.0),
            form=form, fit="noncausal" if method == "lln_entropy_noncausal_fit" else None,
        )
        # causal scales are per token: fold them into q and k (exp(alpha q) = exp(1 * alpha q))
        return lln_attention_matrix(
            q * alpha.to(q.dtype), k * beta.to(k.dtype), is_causal=is_causal,
            key_padding_mask=key_padding_mask, alpha=1.0, beta=1.0, **options,
        )
    if method in LLN_VARIANTS:
        scale = 1.0 if method == "lln_fixed" else q.shape[-1] ** -0.25
        alpha, beta = scale, scale
        return lln_attention_matrix(
            q, k, is_causal=is_causal, key_padding_mask=key_padding_mask, alpha=alpha,
            beta=beta, **options,
        )
    if method not in ATTENTIONS:
        raise ValueError(
            f"unknown method {method!r}; valid names: {', '.join(analysis_methods())}"
        )
    spec = get_attention(method)
    if spec.matrix is None:
        raise ValueError(
            f"method {method!r} has no explicit attention matrix; valid names: "
            f"{', '.join(analysis_methods())}"
        )
    return spec.matrix(q, k, is_causal=is_causal, key_padding_mask=key_padding_mask, **options)
