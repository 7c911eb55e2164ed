"""Moment matching: choose the LLN feature scales alpha, beta from the statistics of q and k.

Softmax attention with scores ``q.k / sqrt(D)`` has ``Var(log P) ~ sigma_q^2 sigma_k^2``; LLN
attention with ``exp(alpha q)``, ``exp(beta k)`` has ``Var(log P) ~ a (alpha^2 sigma_q^2 +
beta^2 sigma_k^2) + b``. Equating the two and splitting symmetrically
(``alpha sigma_q = beta sigma_k = sigma_tilde``) gives (SPEC section 3)::

    sigma_tilde = sqrt((sigma_q^2 sigma_k^2 - b) / (2 a)) / temperature
    alpha = sigma_tilde / sigma_q,   beta = sigma_tilde / sigma_k

Which entries enter sigma_q, sigma_k is the ``stats`` mode:

``"tensor"``   every entry of the whole ``(B, H, N, D)`` tensor, as the authors' code does
               (mixes sequences of a batch; non-causal only).
``"sequence"`` the entries of one sequence, all heads together: shape ``(B, 1, ., 1)``.
``"head"``     the entries of one sequence and one head: shape ``(B, H, ., 1)`` (default).

Variances are unbiased (Bessel's correction, like ``torch.std``) and padded tokens are left
out (from the query statistics too when q and k have the same length, i.e. in
self-attention). In causal mode the statistics of token ``t`` use tokens ``<= t`` only (prefix
statistics), so alpha and beta are per token: shape ``(B, ., N, 1)``. The prefix sums live
in :class:`PrefixMoments` so that a sequence processed in pieces gets the same scales.

The statistics are computed without gradient, as in the reference implementation: alpha and
beta are normalisation constants, not functions to differentiate through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import (
    check_key_padding_mask,
    check_positive_float,
    check_qkv,
    compute_dtype,
)

#: Slope of Var(log P_lln) against alpha^2 sigma_q^2 + beta^2 sigma_k^2 (fitted for D = 64).
MOMENT_A: float = 0.14855178144710912
#: Intercept of the same fit.
MOMENT_B: float = -0.35487039130661086

#: Calibrated ``(a, b)`` per head dim D, from ``lln calibrate`` (docs/analysis.md): symmetric
#: split, N = 512, sigma_lln^2 in [1.3, 18] on a grid uniform in sigma_lln. The paper's
#: constants (:data:`MOMENT_A`, :data:`MOMENT_B`) stay the default everywhere; use these with
#: ``constants="head_dim"`` (``moment_match``, ``lln_attention``, ``lln_diag_attention``, their
#: matrices, ``LLNAttention``) or through :func:`moment_constants`.
MOMENT_CONSTANTS: dict[int, tuple[float, float]] = {
    16: (0.2135, -0.3613),
    32: (0.1774, -0.3706),
    64: (0.1495, -0.3628),
    128: (0.1254, -0.3425),
}

#: Where the ops take (a, b) from (keyword ``constants``): ``"paper"`` (:data:`MOMENT_A`,
#: :data:`MOMENT_B`, or the ``a``, ``b`` of :func:`moment_match`) or ``"head_dim"``
#: (:func:`moment_constants` of the head dim of q).
CONSTANTS_MODES = ("paper", "head_dim")

STATS_MODES = ("tensor", "sequence", "head")
CAUSAL_STATS_MODES = ("sequence", "head")

#: Variances are floored here so that a constant q or k gives a large but finite scale.
MIN_VARIANCE = 1e-12


@dataclass
class PrefixMoments:
    """Running sums of the entries of q and k seen so far, per ``(batch, stats group)``.

    All tensors have shape ``(B, G)`` in float64, with ``G = H`` for ``stats="head"`` and
    ``G = 1`` for ``stats="sequence"``. ``count`` is the number of entries (tokens x dims,
    times heads in ``"sequence"`` mode) that entered the sums.
    """

    count: Tensor
    q_sum: Tensor
    q_sq_sum: Tensor
    k_sum: Tensor
    k_sq_sum: Tensor

    @classmethod
    def zeros(cls, batch: int, groups: int, device: torch.device) -> PrefixMoments:
        def z() -> Tensor:
            return torch.zeros(batch, groups, dtype=torch.float64, device=device)

        return cls(z(), z(), z(), z(), z())


def moment_constants(head_dim: int) -> tuple[float, float]:
    """Moment-matching constants ``(a, b)`` calibrated for ``head_dim`` (:data:`MOMENT_CONSTANTS`).

    Between two calibrated dims the constants are interpolated linearly in ``log2(D)``;
    outside the table the nearest calibrated dim is used (the fit has only been checked for
    16 <= D <= 128).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    dims = sorted(MOMENT_CONSTANTS)
    if head_dim <= dims[0]:
        return MOMENT_CONSTANTS[dims[0]]
    if head_dim >= dims[-1]:
        return MOMENT_CONSTANTS[dims[-1]]
    upper = next(d for d in dims if d >= head_dim)
    lower = dims[dims.index(upper) - 1] if upper != head_dim else upper
    if lower == upper:
        return MOMENT_CONSTANTS[upper]
    t = (math.log2(head_dim) - math.log2(lower)) / (math.log2(upper) - math.log2(lower))
    (a0, b0), (a1, b1) = MOMENT_CONSTANTS[lower], MOMENT_CONSTANTS[upper]
    return a0 + t * (a1 - a0), b0 + t * (b1 - b0)


def check_constants_mode(constants: object) -> str:
    """``constants`` if it is one of :data:`CONSTANTS_MODES`, else ValueError."""
    if constants not in CONSTANTS_MODES:
        raise ValueError(f"constants must be one of {CONSTANTS_MODES}, got {constants!r}")
    return constants


def resolve_constants(
    constants: str, head_dim: int, *, a: float = MOMENT_A, b: float = MOMENT_B
) -> tuple[float, float]:
    """The moment-matching ``(a, b)`` that the ``constants`` mode selects.

    ``"paper"``: ``(a, b)`` as given (default: the paper's D = 64 fit). ``"head_dim"``:
    :func:`moment_constants` of ``head_dim``; ``a``, ``b`` must then be left at their
    defaults (ValueError otherwise). The one place every op and layer turns the mode into
    constants.
    """
    if check_constants_mode(constants) == "paper":
        return a, b
    if (a, b) != (MOMENT_A, MOMENT_B):
        raise ValueError("pass either constants='head_dim' or explicit a, b, not both")
    return moment_constants(head_dim)


def check_stats_mode(stats: object, *, is_causal: bool) -> str:
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
    if is_causal and stats not in CAUSAL_STATS_MODES:
        raise ValueError(
            f"stats={stats!r} uses every token of the batch, so it cannot be causal; with "
            f"is_causal=True use one of {CAUSAL_STATS_MODES} (prefix statistics) or pass "
            "alpha and beta"
        )
    return stats


def scales_from_variances(
    var_q: Tensor,
    var_k: Tensor,
    *,
    temperature: float = 1.0,
    a: float = MOMENT_A,
    b: float = MOMENT_B,
) -> tuple[Tensor, Tensor]:
    """``(alpha, beta)`` from the variances of q and k entries (any broadcastable shapes)."""
    var_q = var_q.clamp_min(MIN_VARIANCE)
    var_k = var_k.clamp_min(MIN_VARIANCE)
    sigma_tilde = torch.sqrt(((var_q * var_k - b) / (2 * a)).clamp_min(MIN_VARIANCE))
    sigma_tilde = sigma_tilde / temperature
    return sigma_tilde / var_q.sqrt(), sigma_tilde / var_k.sqrt()


def _whole_variance(x: Tensor, mask: Tensor | None, stats: str) -> Tensor:
    """Unbiased variance over the entries selected by ``stats``; shape ``(B|1, H|1, 1, 1)``."""
    dims = {"tensor": (0, 1, 2, 3), "sequence": (1, 2, 3), "head": (2, 3)}[stats]
    x = x.to(compute_dtype(x.dtype))
    if mask is None:
        count = math.prod([x.shape[d] for d in dims])  # (a list: compiles)
        # one entry has no spread: variance 0 (floored later), not NaN
        return x.var(dim=dims, keepdim=True, correction=1 if count > 1 else 0)
    w = mask[:, None, :, None].to(x.dtype)  # (B, 1, N, 1)
    count = w.expand(x.shape[0], x.shape[1], -1, -1).sum(dims, keepdim=True) * x.shape[3]
    xm = torch.where(mask[:, None, :, None], x, 0.0)
    mean = xm.sum(dims, keepdim=True) / count.clamp_min(1)
    centred = torch.where(mask[:, None, :, None], x - mean, 0.0)
    var = centred.square().sum(dims, keepdim=True) / (count - 1).clamp_min(1)
    return torch.where(count > 0, var, torch.ones_like(var))


@torch.no_grad()
def head_variances(x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Unbiased variance of the entries of each head over the whole batch: shape ``(H,)``.

    ``x (B, H, N, D)``; padded tokens (``key_padding_mask`` False) are left out. Used for
    running statistics (``LLNAttention(stats="running")``) and calibration.
    """
    b, h, n, d = x.shape
    per_head = x.transpose(0, 1).reshape(1, h, b * n, d)
    mask = None if key_padding_mask is None else key_padding_mask.reshape(1, b * n)
    return _whole_variance(per_head, mask, "head").view(h)


def _prefix_variance(
    x: Tensor, mask: Tensor | None, stats: str, total: Tensor, sq_total: Tensor, count0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token unbiased variance of the entries at positions ``<= t``.

    Returns ``(var (B, G, N, 1), sum, sq_sum, count)`` with the sums ``(B, G)`` after the
    last token, continuing from ``total``, ``sq_total``, ``count0``.
    """
    b, h, n, d = x.shape
    # per-token sums in the compute dtype (one pass each, no full-size float64 copy); the
    # running sums over tokens, where cancellation happens, are float64
    xc = x.to(compute_dtype(x.dtype))
    s1 = xc.sum(-1).double()  # (B, H, N)
    s2 = torch.linalg.vector_norm(xc, dim=-1).double().square()
    cnt = torch.full((b, 1, n), float(d), dtype=torch.float64, device=x.device)
    if mask is not None:
        m = mask[:, None, :]
        s1, s2 = torch.where(m, s1, 0.0), torch.where(m, s2, 0.0)
        cnt = torch.where(m, cnt, 0.0)
    if stats == "sequence":
        s1, s2, cnt = s1.sum(1, keepdim=True), s2.sum(1, keepdim=True), cnt * h
    c1 = total[..., None] + s1.cumsum(-1)
    c2 = sq_total[..., None] + s2.cumsum(-1)
    cn = count0[..., None] + cnt.cumsum(-1)
    var = (c2 - c1.square() / cn.clamp_min(1)) / (cn - 1).clamp_min(1)
    var = torch.where(cn > 0, var, torch.ones_like(var))
    return var[..., None], c1[..., -1], c2[..., -1], cn[..., -1]


@torch.no_grad()
def moment_match_with_moments(
    q: Tensor,
    k: Tensor,
    *,
    stats: str,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    temperature: float,
    moments: PrefixMoments | None = None,
    a: float = MOMENT_A,
    b: float = MOMENT_B,
) -> tuple[Tensor, Tensor, PrefixMoments | None]:
    """Moment-matched scales, continuing causal prefix statistics from ``moments``.

    Returns ``(alpha, beta, moments_after)``; ``moments_after`` is None when not causal.
    Inputs are assumed validated.
    """
    cdt = compute_dtype(q.dtype)
    if not is_causal:
        # In self-attention a padded token is padding as a query too; in cross-attention
        # (L != S) the mask describes the keys only.
        q_mask = key_padding_mask if q.shape[2] == k.shape[2] else None
        var_q = _whole_variance(q, q_mask, stats)
        var_k = _whole_variance(k, key_padding_mask, stats)
        alpha, beta = scales_from_variances(var_q, var_k, temperature=temperature, a=a, b=b)
        return alpha.to(cdt), beta.to(cdt), None
    groups = q.shape[1] if stats == "head" else 1
    if moments is None:
        moments = PrefixMoments.zeros(q.shape[0], groups, q.device)
    var_q, q_sum, q_sq, count = _prefix_variance(
        q, key_padding_mask, stats, moments.q_sum, moments.q_sq_sum, moments.count
    )
    var_k, k_sum, k_sq, _ = _prefix_variance(
        k, key_padding_mask, stats, moments.k_sum, moments.k_sq_sum, moments.count
    )
    alpha, beta = scales_from_variances(var_q, var_k, temperature=temperature, a=a, b=b)
    return alpha.to(cdt), beta.to(cdt), PrefixMoments(count, q_sum, q_sq, k_sum, k_sq)


def moment_match(
    q: Tensor,
    k: Tensor,
    *,
    stats: str = "head",
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    temperature: float = 1.0,
    a: float = MOMENT_A,
    b: float = MOMENT_B,
    constants: str = "paper",
) -> tuple[Tensor, Tensor]:
    """Moment-matched LLN feature scales ``(alpha, beta)`` for ``q, k (B, H, N, D)``.

    Args:
        stats: ``"head"`` (per sequence and head, default), ``"sequence"`` or ``"tensor"``
            (whole batch, non-causal only) — see the module docstring.
        is_causal: use prefix statistics, one scale per token.
        key_padding_mask: ``(B, N)`` bool, True = real token; padded tokens are ignored.
        temperature: divides sigma_tilde (higher = flatter attention); 1 = plain matching.
        a, b: the fit ``Var(log P_lln) = a * sigma_lln^2 + b`` (defaults: the D = 64 values).
        constants: ``"paper"`` (use ``a``, ``b``; default) or ``"head_dim"`` (use
            :func:`moment_constants` for the head dim of q; ``a``, ``b`` must be left at
            their defaults).

    Returns:
        ``alpha, beta`` of shape ``(B|1, H|1, N|1, 1)`` in float32 (float64 for float64
        inputs), without gradient.
    """
    check_qkv(q, k, k, same_length=is_causal)
    mask = check_key_padding_mask(key_padding_mask, k)
    check_stats_mode(stats, is_causal=is_causal)
    temperature = check_positive_float(temperature, "temperature")
    a, b = resolve_constants(constants, q.shape[-1], a=a, b=b)
    check_positive_float(a, "a")
    if not math.isfinite(b):
        raise ValueError(f"b must be a finite float, got {b!r}")
    alpha, beta, _ = moment_match_with_moments(
        q, k, stats=stats, is_causal=is_causal, key_padding_mask=mask,
        temperature=temperature, a=a, b=b,
    )
    return alpha, beta
