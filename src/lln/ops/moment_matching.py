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
statistics), so alpha and beta are per token: shape ``(B, ., N, 1)``. The prefix moments
live in :class:`PrefixMoments` so that a sequence processed in pieces gets the same scales.
A statistic with fewer than :data:`MIN_COUNT` entries (the first tokens of a causal sequence
when ``D < 16``) uses the mean square about zero instead of the variance (see there).

Numerics: per-token moments are sums and sums of squares about the token's first entry
(compute dtype), merged over tokens in float64 in Welford/Chan form: a mean offset costs no
precision; finite for ``|x| <= 1e18`` in float32/bf16/fp16 and ~1e150 in float64. (The
state between calls keeps plain float64 sums: see :class:`PrefixMoments`.)
Non-causal moments are one fused, chunked pass of shifted, power-of-two scaled sums (finite
for ``|x| <= 1e37`` in float32). See docs/numerics.md.

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

#: Early-statistics rule: a variance estimated from fewer entries than this is not trusted.
#: While a statistic holds fewer entries (the first tokens of a causal sequence with a small
#: head dim, or a whole non-causal input with ``N * D < 16``), sigma^2 is the mean square of
#: the entries about zero instead of their variance. That keeps ``|beta_t k_t|`` and
#: ``|alpha_t q_t|`` bounded by ``sigma_tilde * sqrt(count)`` for the first tokens, where a
#: variance of one or two entries would be ~0 (scale ~1e6) and let one key take every row.
MIN_COUNT = 16


@dataclass
class PrefixMoments:
    """Running sums of the entries of q and k seen so far, per ``(batch, stats group)``.

    All tensors have shape ``(B, G)`` in float64, with ``G = H`` for ``stats="head"`` and
    ``G = 1`` for ``stats="sequence"``. ``count`` is the number of entries (tokens x dims,
    times heads in ``"sequence"`` mode) that entered the sums. Plain sums, so the moments of
    two adjacent pieces add up. Inside one call the statistics are computed in shifted
    (Welford/Chan) form and only the totals are stored: the float64 cancellation
    ``sq_sum - sum^2 / count`` at a call boundary costs ``1e-16 * (mean / std)^2`` relative
    precision (1e-8 at a mean offset of 1e4 standard deviations).
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
    """``(alpha, beta)`` from the variances of q and k entries (any broadcastable shapes).

    ``sigma_tilde = sqrt(max(var_q var_k - b, 1e-12) / (2 a)) / temperature`` is formed as
    ``hypot``-style products of square roots, so it stays finite whenever both variances are
    (``var_q * var_k`` itself would overflow float64 above ~1e154 each).
    """
    sigma_q = var_q.clamp_min(MIN_VARIANCE).sqrt()
    sigma_k = var_k.clamp_min(MIN_VARIANCE).sqrt()
    prod = sigma_q * sigma_k
    if b <= 0:
        root = torch.hypot(prod, torch.tensor(math.sqrt(-b), dtype=prod.dtype, device=prod.device))
    else:
        root = (prod - math.sqrt(b)).clamp_min(0).sqrt() * (prod + math.sqrt(b)).sqrt()
    sigma_tilde = (root / math.sqrt(2 * a)).clamp_min(math.sqrt(MIN_VARIANCE)) / temperature
    return sigma_tilde / sigma_q, sigma_tilde / sigma_k


def _variance(count: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    """sigma^2 from ``(count, mean, M2)``: unbiased variance, with the :data:`MIN_COUNT` rule.

    No entry: 1. Fewer than :data:`MIN_COUNT` entries: mean square about zero.
    """
    var = m2 / (count - 1).clamp_min(1)
    early = m2 / count.clamp_min(1) + mean.square()
    var = torch.where(count >= MIN_COUNT, var, early)
    return torch.where(count > 0, var, torch.ones_like(var))


def variance_from_sums(count: Tensor, total: Tensor, sq_total: Tensor) -> Tensor:
    """sigma^2 from plain float64 sums (as in :class:`PrefixMoments`), with the same rule as
    every op: unbiased variance, mean square below :data:`MIN_COUNT` entries, 1 for none.

    For code that keeps its own running sums (e.g. a one-token decode step), so that it
    gives the chunked path's scales; feed the result to :func:`scales_from_variances`.
    """
    mean = total / count.clamp_min(1)
    return _variance(count, mean, (sq_total - total * mean).clamp_min(0))


#: Bytes of q or k the per-token statistics read per step (keeps the temporaries in cache).
_STATS_CHUNK_BYTES = 1 << 21


def _token_moments(
    x: Tensor, mask: Tensor | None, stats: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(count, mean, M2)`` in float64, each ``(B, G, N)``.

    One fused pass over ``x`` in the compute dtype, a few hundred tokens at a time into a
    reused buffer: each token's entries are shifted by its first entry, then summed and
    squared-summed (so a mean offset costs no precision). Finite for ``|x| <= 1e18`` in
    float32/bf16/fp16 (``D <= 256``) and ``~1e150`` in float64; beyond, the token's M2 (and
    the statistics of later tokens, never earlier ones) become infinite. Entries of token
    ``t`` of one head (``"sequence"``: of all heads) form one group; padded tokens get count
    0 (mean and M2 0). A non-finite entry makes its token's moments non-finite, and nothing
    else.
    """
    b, h, n, d = x.shape
    cdt = compute_dtype(x.dtype)
    step = max(1, _STATS_CHUNK_BYTES // (b * h * d * torch.finfo(cdt).bits // 8))
    parts = []
    buf = torch.empty(b * h * min(step, n) * d, dtype=cdt, device=x.device)
    for xc in x.split(step, dim=2):
        first = xc[..., :1].to(cdt)
        y = torch.sub(xc, first, out=buf[: xc.numel()].view(xc.shape))  # reused: no page faults
        parts.append(torch.cat([first, y.sum(-1, keepdim=True),
                                torch.linalg.vector_norm(y, dim=-1, keepdim=True)], -1))
    first, s1, norm = torch.cat(parts, dim=2).double().unbind(-1)
    mean = first + s1 / d
    m2 = (norm.square() - s1 * s1 / d).clamp_min(0)
    cnt = torch.full((b, 1, n), float(d), dtype=torch.float64, device=x.device)
    if stats != "head":
        head_mean = mean.mean(1, keepdim=True)
        m2 = m2.sum(1, keepdim=True) + d * (mean - head_mean).square().sum(1, keepdim=True)
        mean, cnt = head_mean, cnt * h
    if mask is not None:
        m = mask[:, None, :]
        cnt = torch.where(m, cnt, 0.0)
        mean, m2 = torch.where(m, mean, 0.0), torch.where(m, m2, 0.0)
    return cnt.expand_as(mean), mean, m2


_GROUP_DIMS = {"tensor": (0, 1, 2, 3), "sequence": (1, 2, 3), "head": (2, 3)}


def _exponent_range(dtype: torch.dtype) -> tuple[int, int, int]:
    """``(e_lo, e_hi, bytes per entry)``: the exponents ``e`` for which ``2^-e`` is normal."""
    info = torch.finfo(dtype)
    max_exp = math.frexp(info.max)[1]  # 128 for float32, 1024 for float64
    return 1 - max_exp, max_exp - 2, info.bits // 8


def _whole_moments(
    x: Tensor, mask: Tensor | None, stats: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, M2)`` in float64 over the entries selected by ``stats``.

    Shapes ``(B|1, H|1, 1, 1)``. One fused pass over ``x`` in the compute dtype, a few
    hundred tokens at a time (temporaries stay in cache): the entries minus a shift ``c``
    (the mean of the group's first real token, so a mean offset does not cancel the
    variance away), scaled by a power of two (exact) so that nothing overflows, summed and
    squared-summed; the pieces are merged in float64. Finite for ``|x| <= 1e38`` in
    float32/bf16/fp16 and ~1e150 in float64.
    """
    dims = _GROUP_DIMS[stats]
    cdt = compute_dtype(x.dtype)
    b, h, n, d = x.shape
    if mask is None:
        token = x[:, :, 0, :]
    else:
        token = x[torch.arange(b, device=x.device), :, mask.to(torch.uint8).argmax(-1), :]
    shift = token.to(cdt).mean(-1)[:, :, None, None]  # (B, H, 1, 1)
    if stats != "head":
        shift = shift.mean(1, keepdim=True)
    if stats == "tensor":
        shift = shift.mean(0, keepdim=True)
    e_lo, e_hi, size = _exponent_range(cdt)
    step = max(1, _STATS_CHUNK_BYTES // (b * h * d * size))
    chunks = x.split(step, dim=2)
    masks = [None] * len(chunks) if mask is None else mask[:, None, :, None].split(step, dim=2)
    s1 = s2 = torch.zeros_like(shift, dtype=torch.float64)
    buf = torch.empty(b * h * min(step, n) * d, dtype=cdt, device=x.device)
    for xc, mc in zip(chunks, masks, strict=True):
        y = torch.sub(xc, shift, out=buf[: xc.numel()].view(xc.shape))  # reused buffer
        if mc is not None:
            y.masked_fill_(~mc, 0.0)
        top = torch.maximum(y.amax(dims, keepdim=True), -y.amin(dims, keepdim=True))
        e = torch.frexp(top).exponent.clamp(e_lo, e_hi)
        y.mul_(torch.exp2(-e.to(cdt)))
        scale = torch.exp2(e.double())
        s1 = s1 + y.sum(dims, keepdim=True).double() * scale
        s2 = s2 + y.square_().sum(dims, keepdim=True).double() * scale.square()
    if mask is None:
        count = torch.full_like(s1, float(math.prod([x.shape[i] for i in dims])))
    else:
        count = (mask.sum(-1, dtype=torch.float64) * d).view(b, 1, 1, 1).expand(b, h, 1, 1)
        if stats != "head":
            count = count.sum(tuple(i for i in dims if i < 2), keepdim=True)
    mean = shift.double() + s1 / count.clamp_min(1)
    m2 = (s2 - s1 * s1 / count.clamp_min(1)).clamp_min(0)
    return count, mean, m2


def _whole_variance(x: Tensor, mask: Tensor | None, stats: str) -> Tensor:
    """sigma^2 (:func:`_variance`) over the entries selected by ``stats``; ``(B|1, H|1, 1, 1)``."""
    return _variance(*_whole_moments(x, mask, stats))


@torch.no_grad()
def head_variances(x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Unbiased variance of the entries of each head over the whole batch: shape ``(H,)``.

    ``x (B, H, N, D)``; padded tokens (``key_padding_mask`` False) are left out. Used for
    running statistics (``LLNAttention(stats="running")``) and calibration.
    """
    b, h, n, d = x.shape
    per_head = x.transpose(0, 1).reshape(1, h, b * n, d)
    mask = None if key_padding_mask is None else key_padding_mask.reshape(1, b * n)
    return _whole_variance(per_head, mask, "head").view(h).to(compute_dtype(x.dtype))


def _prefix_variance(
    x: Tensor, mask: Tensor | None, stats: str, count0: Tensor, sum0: Tensor, sq_sum0: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token sigma^2 (:func:`_variance`) of the entries at positions ``<= t``.

    Returns ``(var (B, G, N, 1), count, sum, sq_sum)`` with the sums ``(B, G)`` after the
    last token, continuing from ``count0``, ``sum0``, ``sq_sum0``. The running moments are
    float64 and shifted by the prefix mean of the state (or the mean of the first real
    token): token ``t`` only ever enters the statistics of tokens ``>= t``, so a huge or
    non-finite token cannot reach earlier ones.
    """
    cnt, mean, m2 = _token_moments(x, mask, stats)
    has = count0 > 0
    mean0 = torch.where(has, sum0 / count0.clamp_min(1), 0.0)
    m2_0 = torch.where(has, (sq_sum0 - sum0 * mean0).clamp_min(0), 0.0)
    first = (cnt > 0).to(torch.uint8).argmax(-1, keepdim=True)
    shift = torch.where(has[..., None], mean0[..., None], mean.gather(-1, first))
    dev = torch.where(cnt > 0, mean - shift, 0.0)
    a = (cnt * dev).cumsum(-1)
    cn = count0[..., None] + cnt.cumsum(-1)
    inv = 1 / cn.clamp_min(1)
    mean_t = shift + a * inv
    m2_t = m2_0[..., None] + m2.cumsum(-1) + ((cnt * dev.square()).cumsum(-1) - a * a * inv)
    m2_t = m2_t.clamp_min(0)
    var = _variance(cn, mean_t, m2_t)
    n, mu, m2_n = cn[..., -1], mean_t[..., -1], m2_t[..., -1]
    total = torch.where(n > 0, n * mu, 0.0)
    return var[..., None], n, total, torch.where(n > 0, m2_n + total * mu, 0.0)


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
    var_q, count, q_sum, q_sq = _prefix_variance(
        q, key_padding_mask, stats, moments.count, moments.q_sum, moments.q_sq_sum
    )
    var_k, _, k_sum, k_sq = _prefix_variance(
        k, key_padding_mask, stats, moments.count, moments.k_sum, moments.k_sq_sum
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
