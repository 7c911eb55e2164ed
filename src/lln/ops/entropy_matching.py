"""Entropy matching: LLN feature scales that give LLN the row entropy of softmax.

Moment matching (:mod:`lln.ops.moment_matching`) equates ``Var(log P)`` of LLN and softmax
attention. LLN's ``log P`` is right-skewed where softmax's is not, so at equal variance LLN is
more concentrated: at D = 64, N = 256 its normalised row entropy is 0.2 below softmax's at
``sigma_q^2 sigma_k^2 = 4`` (docs/analysis.md). Entropy matching instead chooses
``sigma_tilde`` so that LLN's mean normalised row entropy equals softmax's, on Gaussian q, k.
``lln calibrate --target entropy`` measures that sigma_tilde by bisection on a grid of
``(D, N, sigma_q sigma_k)``; this module holds closed forms fitted to the measurements::

    sigma_tilde = sum_i c_i * f_i(sigma_q sigma_k, log2 D, log2 N)
    alpha = sigma_tilde / sigma_q,   beta = sigma_tilde / sigma_k

with the features ``f_i`` of a form in :data:`ENTROPY_FORMS` and the coefficients ``c_i`` in
:data:`ENTROPY_COEFFICIENTS` (separately fitted for causal matrices, whose rows are
normalised by their own visible count). ``N`` is the number of keys of the sequence (the
size of the N x N matrix, causal or not).

This is an analysis result, not yet an option of ``lln_attention``: pass the scales as
``alpha``, ``beta`` (or scale q, k by them) to evaluate LLN with entropy matching.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._validation import check_bool, check_positive_float

#: Closed forms of sigma_tilde, name -> feature names (``s = sigma_q sigma_k``,
#: ``L = log2 D``, ``M = log2 N``). ``"linear"`` is N-free; the others grow with N.
ENTROPY_FORMS: dict[str, tuple[str, ...]] = {
    "linear": ("1", "L", "s"),
    "linear_n": ("1", "L", "s", "M", "sM"),
    "curved_n": ("1", "L", "s", "log2s", "s2", "M", "sM"),
}

#: Fitted coefficients per (form, is_causal), rounded to 4 decimals, from
#: ``lln calibrate --target entropy --n 256 512 1024 --seeds 16 4 4 --seed 1`` (non-causal:
#: D = 16..128, N = 256, 512, 1024) and ``lln calibrate --target entropy --causal --dims 32 64
#: --n 256 1024 --seeds 16 4 --seed 1`` (causal: D = 32, 64 only), products 1/16..16
#: (results/analysis/calibrate_entropy*/, docs/analysis.md).
ENTROPY_COEFFICIENTS: dict[tuple[str, bool], tuple[float, ...]] = {
    ("linear", False): (0.0299, 0.1413, 0.9485),
    ("linear_n", False): (-0.1169, 0.1413, 1.2158, 0.0163, -0.0297),
    ("curved_n", False): (0.3188, 0.1413, 0.7769, 0.2160, 0.0559, 0.0163, -0.0297),
    ("linear", True): (-0.1875, 0.1757, 1.0209),
    ("linear_n", True): (-0.3040, 0.1757, 1.3876, 0.0129, -0.0408),
    ("curved_n", True): (0.1415, 0.1757, 0.9243, 0.2109, 0.0636, 0.0129, -0.0408),
}

#: The form :func:`entropy_sigma_tilde` uses by default.
DEFAULT_FORM = "curved_n"

#: Variances are floored here (as in moment matching) so that a constant q or k gives a
#: large but finite scale.
MIN_VARIANCE = 1e-12


def _check_form(form: object) -> str:
    if form not in ENTROPY_FORMS:
        raise ValueError(f"form must be one of {tuple(ENTROPY_FORMS)}, got {form!r}")
    return form


def _log2(x):
    return torch.log2(x) if isinstance(x, Tensor) else math.log2(x)


def form_features(form: str, sigma_qk, dim, n) -> list:
    """The features of ``form`` at ``s = sigma_qk``, ``L = log2(dim)``, ``M = log2(n)``.

    Works elementwise on floats and on tensors alike (``sigma_qk``, ``dim``, ``n`` broadcast),
    so the fit (:mod:`lln.analysis.calibrate`) and the scales below use one definition.
    """
    s, big_l, big_m = sigma_qk, _log2(dim), _log2(n)
    values = {
        "1": 1.0 + 0.0 * s, "L": big_l + 0.0 * s, "s": s, "M": big_m + 0.0 * s,
        "sM": s * big_m, "log2s": _log2(s), "s2": s * s,
    }
    return [values[name] for name in ENTROPY_FORMS[_check_form(form)]]


def shipped_coefficients(form: str, *, is_causal: bool) -> tuple[float, ...] | None:
    """The committed coefficients of ``form`` for causal or non-causal matrices (or None)."""
    return ENTROPY_COEFFICIENTS.get((_check_form(form), bool(is_causal)))


def entropy_sigma_tilde(
    sigma_qk: float | Tensor,
    *,
    dim: int,
    n: int | Tensor,
    is_causal: bool = False,
    form: str = DEFAULT_FORM,
) -> float | Tensor:
    """Entropy-matched ``sigma_tilde`` for ``sigma_q sigma_k`` (float or tensor).

    Args:
        sigma_qk: ``sigma_q * sigma_k`` (> 0), the product of the entry standard deviations.
        dim: head dim D (the fit covers 16 <= D <= 128).
        n: keys of the sequence (>= 1): an int, or a tensor broadcastable with
            ``sigma_qk`` (one count per sequence with padding). The fit covers
            256 <= N <= 1024; ignored by the N-free ``"linear"`` form.
        is_causal: use the coefficients fitted on causal matrices.
        form: a name of :data:`ENTROPY_FORMS`.

    Returns:
        sigma_tilde, floored at 1e-6 (a float for float input, else a tensor).
    """
    is_causal = check_bool(is_causal, "is_causal")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(n, Tensor):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive int or a tensor of counts, got {n!r}")
    if not isinstance(sigma_qk, Tensor):
        sigma_qk = check_positive_float(sigma_qk, "sigma_qk")
    coef = shipped_coefficients(form, is_causal=is_causal)
    if coef is None:
        raise ValueError(f"no committed coefficients for form={form!r}, is_causal={is_causal}")
    if isinstance(n, Tensor):
        n = n.to(sigma_qk.dtype if isinstance(sigma_qk, Tensor) else torch.float64).clamp_min(1)
    total = sum(c * f for c, f in zip(coef, form_features(form, sigma_qk, dim, n), strict=True))
    if isinstance(total, Tensor):
        return total.clamp_min(1e-6)
    return max(float(total), 1e-6)


def entropy_scales_from_variances(
    var_q: Tensor,
    var_k: Tensor,
    *,
    dim: int,
    n: int | Tensor,
    is_causal: bool = False,
    temperature: float = 1.0,
    form: str = DEFAULT_FORM,
) -> tuple[Tensor, Tensor]:
    """Entropy-matched ``(alpha, beta)`` from the variances of q and k entries.

    ``var_q``, ``var_k`` and a tensor ``n`` broadcast together; alpha = sigma_tilde /
    (sigma_q * temperature), beta = sigma_tilde / (sigma_k * temperature), as in moment
    matching. Same dtype as the variances.
    """
    temperature = check_positive_float(temperature, "temperature")
    if not isinstance(var_q, Tensor) or not isinstance(var_k, Tensor):
        raise TypeError("var_q and var_k must be tensors")
    var_q = var_q.clamp_min(MIN_VARIANCE)
    var_k = var_k.clamp_min(MIN_VARIANCE)
    sigma_q, sigma_k = var_q.sqrt(), var_k.sqrt()
    sigma_tilde = entropy_sigma_tilde(sigma_q * sigma_k, dim=dim, n=n, is_causal=is_causal,
                                      form=form) / temperature
    return sigma_tilde / sigma_q, sigma_tilde / sigma_k


@torch.no_grad()
def entropy_match(
    q: Tensor,
    k: Tensor,
    *,
    stats: str = "head",
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    temperature: float = 1.0,
    form: str = DEFAULT_FORM,
    fit: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Entropy-matched LLN feature scales ``(alpha, beta)`` for ``q, k (B, H, N, D)``.

    ``fit``: which coefficients, ``"causal"`` or ``"noncausal"``; None (default) = those of
    ``is_causal`` (the other set is there to measure whether one fit serves both).

    The variances are moment matching's (:func:`lln.ops.moment_matching.moment_match`: the
    same ``stats`` modes, padding and causal prefix statistics); only the map from variances
    to sigma_tilde differs. ``N`` of the closed form is the number of real keys of the
    sequence, causal or not: the causal coefficients were fitted on whole N x N causal
    matrices with one sigma_tilde, so N is the matrix size there too (the sequence length is
    then needed up front; the N-free ``"linear"`` form does not need it).

    Returns:
        ``alpha, beta`` of shape ``(B|1, H|1, N|1, 1)``, without gradient, in moment
        matching's output dtype. Causal scales are per token: scale q and k by them
        (``exp((alpha q) . ) = exp(1 * (alpha q))``) rather than passing them as ``alpha``.
    """
    from .moment_matching import moment_match

    temperature = check_positive_float(temperature, "temperature")
    if fit not in (None, "causal", "noncausal"):
        raise ValueError(f"fit must be None, 'causal' or 'noncausal', got {fit!r}")
    causal_fit = is_causal if fit is None else fit == "causal"
    # With a = 1/2, b = 0 moment matching's sigma_tilde is sigma_q sigma_k, so it returns
    # alpha = sigma_k, beta = sigma_q: its statistics, read back without a second definition.
    sigma_k, sigma_q = moment_match(q, k, stats=stats, is_causal=is_causal,
                                    key_padding_mask=key_padding_mask, a=0.5, b=0.0)
    if key_padding_mask is None:
        n = k.shape[2]
    else:  # real keys per sequence, (B, 1, 1, 1)
        n = key_padding_mask.to(torch.float64).sum(-1)[:, None, None, None]
    alpha, beta = entropy_scales_from_variances(
        sigma_q.double().square(), sigma_k.double().square(), dim=q.shape[-1], n=n,
        is_causal=causal_fit, temperature=temperature, form=form,
    )
    return alpha.to(sigma_q.dtype), beta.to(sigma_k.dtype)
