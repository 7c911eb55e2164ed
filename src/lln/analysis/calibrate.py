"""Monte-Carlo re-derivation of the moment-matching constants ``(a, b)`` (SPEC section 3).

LLN attention with features ``exp(alpha q)``, ``exp(beta k)`` has ``Var(log P_lln)`` growing
roughly linearly in ``sigma_lln^2 = alpha^2 sigma_q^2 + beta^2 sigma_k^2``. Moment matching
inverts the line ``Var(log P_lln) = a * sigma_lln^2 + b``; this module measures the line.

Design of the simulation (what :func:`calibrate` does):

* q, k: i.i.d. standard-normal entries, one ``(N, D)`` pair per seed (``sigma_q = sigma_k = 1``);
* the symmetric split that moment matching uses: ``alpha = beta = sqrt(sigma_lln^2 / 2)``
  (an asymmetric split gives a different variance for the same sigma_lln^2: the line is a
  property of the symmetric split, not of sigma_lln^2 alone);
* ``Var(log P)`` over all N^2 entries of the exact float64 LLN matrix (the quadratic oracle
  :func:`lln.lln_attention_matrix`), the same quantity that equals ``sigma_q^2 sigma_k^2``
  for softmax attention;
* ``points`` values of sigma_lln^2 in ``[sigma2_min, sigma2_max]``, evenly spaced in
  ``sigma_lln`` (``spacing="sigma"``, default) or in ``sigma_lln^2`` (``"sigma2"``). The true
  curve is slightly convex, so the fitted line depends on the range and on the spacing;
* an ordinary least-squares fit on every (point, seed) measurement, with R^2, the OLS
  standard errors and 95% t-intervals, and a bootstrap over seeds (resample seeds with
  replacement, refit) for percentile 95% intervals that do not assume independent residuals.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..ops._validation import check_positive_int
from ..ops.naive import lln_attention_matrix

#: The paper's constants for D = 64, the target of the D = 64 check.
PAPER_A = 0.14855178144710912
PAPER_B = -0.35487039130661086

SPACINGS = ("sigma", "sigma2")


def sigma2_grid(sigma2_min: float, sigma2_max: float, points: int, spacing: str) -> np.ndarray:
    """``points`` values of sigma_lln^2, evenly spaced in sigma_lln or in sigma_lln^2."""
    if not (0 < sigma2_min < sigma2_max < math.inf):
        raise ValueError(
            f"need 0 < sigma2_min < sigma2_max, got sigma2_min={sigma2_min}, "
            f"sigma2_max={sigma2_max}"
        )
    points = check_positive_int(points, "points")
    if points < 3:
        raise ValueError(f"points must be >= 3 for a line fit with errors, got {points}")
    if spacing == "sigma":
        return np.linspace(math.sqrt(sigma2_min), math.sqrt(sigma2_max), points) ** 2
    if spacing == "sigma2":
        return np.linspace(sigma2_min, sigma2_max, points)
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


@torch.no_grad()
def lln_log_variance(dim: int, n: int, sigma2: float, *, seed: int) -> float:
    """``Var(log P_lln)`` over the entries of one ``(n, n)`` LLN matrix, float64.

    q, k are ``(n, dim)`` standard normal drawn from ``seed``; ``alpha = beta =
    sqrt(sigma2 / 2)``.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, n, dim, generator=gen, dtype=torch.float64)
    scale = math.sqrt(sigma2 / 2)
    log_p = lln_attention_matrix(q, k, alpha=scale, beta=scale).log()
    return log_p.var(correction=0).item()


def fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """OLS fit ``y = a x + b``: a, b, R^2, standard errors and 95% t-intervals."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.size
    design = np.stack([x, np.ones_like(x)], 1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - (a * x + b)
    ss_res, ss_tot = float(resid @ resid), float(((y - y.mean()) ** 2).sum())
    sigma2 = ss_res / (n - 2)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    se_a, se_b = math.sqrt(cov[0, 0]), math.sqrt(cov[1, 1])
    t = _t_quantile_975(n - 2)
    return {
        "a": float(a), "b": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "se_a": se_a, "se_b": se_b,
        "ci_a": [float(a - t * se_a), float(a + t * se_a)],
        "ci_b": [float(b - t * se_b), float(b + t * se_b)],
        "max_abs_residual": float(np.abs(resid).max()),
    }


def _t_quantile_975(dof: int) -> float:
    """0.975 quantile of Student's t (scipy when available, else a 1/dof expansion)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:  # Cornish-Fisher expansion, accurate to ~1e-3 for dof >= 5
        z = 1.959963984540054
        return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def calibrate(
    dim: int = 64,
    n: int = 512,
    *,
    sigma2_min: float = 1.3,
    sigma2_max: float = 18.0,
    points: int = 12,
    seeds: int = 8,
    spacing: str = "sigma",
    bootstrap: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Measure ``Var(log P_lln)`` over a sigma_lln^2 grid and fit ``a * sigma_lln^2 + b``.

    Args:
        dim: head dim D.
        n: tokens N (the matrix is N x N; the fit depends only weakly on N).
        sigma2_min, sigma2_max, points, spacing: the sigma_lln^2 grid (:func:`sigma2_grid`).
        seeds: independent (q, k) draws per grid point (the same draws at every point).
        bootstrap: bootstrap resamples over seeds for the percentile intervals (0 = none).
        seed: base seed; draw ``s`` uses ``seed * 100003 + s``.
        progress: show a tqdm bar.

    Returns:
        A JSON-ready dict: ``config``, ``sigma2`` (points), ``var_log_p`` (points x seeds),
        ``fit`` (:func:`fit_line` on all measurements) and ``bootstrap`` (95% percentile
        intervals of a and b).
    """
    from tqdm.auto import tqdm

    dim, n = check_positive_int(dim, "dim"), check_positive_int(n, "n")
    seeds = check_positive_int(seeds, "seeds")
    if n < 2:
        raise ValueError(f"n must be >= 2 (an N x N matrix with a spread), got {n}")
    grid = sigma2_grid(sigma2_min, sigma2_max, points, spacing)
    values = np.zeros((points, seeds))
    bar = tqdm(total=points * seeds, desc=f"calibrate D={dim}", disable=not progress)
    for i, s2 in enumerate(grid):
        for s in range(seeds):
            values[i, s] = lln_log_variance(dim, n, float(s2), seed=seed * 100003 + s)
            bar.update()
    bar.close()
    x_all = np.repeat(grid, seeds)
    fit = fit_line(x_all, values.reshape(-1))
    result = {
        "config": {
            "dim": dim, "n": n, "sigma2_min": sigma2_min, "sigma2_max": sigma2_max,
            "points": points, "seeds": seeds, "spacing": spacing, "seed": seed,
            "split": "symmetric (alpha sigma_q = beta sigma_k)",
        },
        "sigma2": grid.tolist(),
        "var_log_p": values.tolist(),
        "fit": fit,
    }
    if bootstrap and seeds > 1:
        rng = np.random.default_rng(seed)
        boot = np.empty((bootstrap, 2))
        for r in range(bootstrap):
            pick = rng.integers(0, seeds, seeds)
            boot[r] = np.polyfit(grid, values[:, pick].mean(1), 1)
        result["bootstrap"] = {
            "resamples": bootstrap,
            "ci_a": np.percentile(boot[:, 0], [2.5, 97.5]).tolist(),
            "ci_b": np.percentile(boot[:, 1], [2.5, 97.5]).tolist(),
        }
    return result


def paper_check(result: dict) -> dict:
    """How the fit compares with the paper's D = 64 constants (5% on a, 0.04 on b)."""
    a, b = result["fit"]["a"], result["fit"]["b"]
    rel_a = abs(a - PAPER_A) / PAPER_A
    return {
        "paper_a": PAPER_A, "paper_b": PAPER_B,
        "rel_err_a": rel_a, "abs_err_b": abs(b - PAPER_B),
        "a_within_5pct": rel_a <= 0.05, "b_within_0.04": abs(b - PAPER_B) <= 0.04,
    }


# ------------------------------------------------------------------ entropy-matched calibration
#
# Moment matching equates Var(log P); the target below equates the mean normalised row
# entropy instead. LLN with ``alpha sigma_q = beta sigma_k = sigma_tilde`` on Gaussian q, k is
# the LLN matrix of standard-normal draws with ``alpha = beta = sigma_tilde``: the matrix
# depends on sigma_tilde only, softmax's on the product sigma_q^2 sigma_k^2 only. So for
# every (D, N, product) one bisection on sigma_tilde equates the two entropies on the same
# standard-normal draws (common random numbers), and the matched sigma_tilde is what a closed
# form ``sigma_tilde(sigma_q sigma_k, D, N)`` has to reproduce.

#: Products sigma_q^2 sigma_k^2 of the entropy calibration: 2^(k/2), k = -8..8 (1/16 .. 16).
ENTROPY_PRODUCTS = tuple(2.0 ** (k / 2) for k in range(-8, 9))
#: Head dims and token counts of the committed entropy calibration.
ENTROPY_DIMS = (16, 32, 64, 128)
ENTROPY_NS = (256, 1024)


def standard_draws(dim: int, n: int, seeds: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 standard-normal ``q, k (seeds, 1, n, dim)`` drawn from ``seed``.

    The same generator calls as :func:`lln.analysis.sweep.gaussian_qk`, so the same ``seed``
    gives the same draws as a sweep (calibrate with another seed to test out of sample).
    """
    from .sweep import gaussian_qk

    return gaussian_qk(1.0, n=n, dim=dim, batch=seeds, seed=seed)


@torch.no_grad()
def softmax_norm_entropy(
    z_q: torch.Tensor, z_k: torch.Tensor, product: float, *, is_causal: bool
) -> torch.Tensor:
    """Mean normalised row entropy of softmax on ``product^(1/4)``-scaled draws: ``(seeds,)``."""
    from .instruments import mean_entropy
    from .matrices import attention_matrix

    scale = product**0.25
    p = attention_matrix("softmax", z_q * scale, z_k * scale, is_causal=is_causal)
    return mean_entropy(p, normalize=True, is_causal=is_causal).reshape(-1)


@torch.no_grad()
def lln_norm_entropy(
    z_q: torch.Tensor, z_k: torch.Tensor, sigma_tilde: float, *, is_causal: bool
) -> torch.Tensor:
    """Mean normalised row entropy of LLN with ``alpha = beta = sigma_tilde``: ``(seeds,)``.

    The matrix is ``lln_attention(q, k, I)`` (the fast path applied to the identity, equal to
    the quadratic oracle to ~1e-15 in float64 and ~50x faster at N = 1024).
    """
    from ..ops.lln import lln_attention
    from .instruments import mean_entropy

    b, h, n, _ = z_q.shape
    eye = torch.eye(n, dtype=z_q.dtype).expand(b, h, n, n)
    p = lln_attention(z_q, z_k, eye, alpha=sigma_tilde, beta=sigma_tilde, is_causal=is_causal)
    return mean_entropy(p, normalize=True, is_causal=is_causal).reshape(-1)


def match_entropy(
    z_q: torch.Tensor,
    z_k: torch.Tensor,
    target: float,
    *,
    is_causal: bool,
    tol: float = 5e-4,
    lower: float = 0.0,
    width: float = 0.5,
) -> tuple[float, int]:
    """Bisection for the sigma_tilde at which LLN's mean normalised entropy equals ``target``.

    LLN's entropy falls monotonically as sigma_tilde grows (1 at sigma_tilde = 0). The bracket
    starts at ``[lower, lower + width]`` (``lower`` falls back to 0 if its entropy is already
    below the target; the width doubles until the upper end's entropy is below it), then is
    halved until it is shorter than ``tol``. Returns ``(sigma_tilde, evaluations)``.
    """
    evals = 0

    def excess(s: float) -> float:
        nonlocal evals
        evals += 1
        return float(lln_norm_entropy(z_q, z_k, s, is_causal=is_causal).mean()) - target

    lo = lower if lower > 0 and excess(lower) > 0 else 0.0
    hi = lo + width
    while excess(hi) > 0:
        lo, hi = hi, hi + 2 * (hi - lo)
        if hi > 256:
            raise ValueError(f"no sigma_tilde <= 256 reaches the entropy {target:.4f}")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi), evals


def calibrate_entropy(
    dims: tuple[int, ...] | list[int] = ENTROPY_DIMS,
    ns: tuple[int, ...] | list[int] = ENTROPY_NS,
    products: tuple[float, ...] | list[float] = ENTROPY_PRODUCTS,
    *,
    seeds: int | tuple[int, ...] | list[int] = 4,
    seed: int = 1,
    is_causal: bool = False,
    tol: float = 5e-4,
    progress: bool = False,
) -> dict:
    """Entropy-matched sigma_tilde on a (D, N, product) grid, with the closed-form fits.

    For each point: the softmax target (mean over ``seeds`` draws of the mean normalised row
    entropy; rows normalised by their visible count when causal), the bisected sigma_tilde
    (:func:`match_entropy`) and, to judge the closed forms in entropy rather than in
    sigma_tilde, LLN's entropy at the sigma_tilde of every form of
    :data:`lln.ops.entropy_matching.ENTROPY_FORMS` fitted to this table and at the
    moment-matched sigma_tilde (paper constants), all on the same draws.

    Returns:
        A JSON-ready dict: ``config``, ``points`` (one dict per grid point) and ``fits``
        (per form: constants, R^2 and residuals in sigma_tilde, :func:`fit_entropy_forms`).
    """
    from tqdm.auto import tqdm

    from ..ops.moment_matching import MOMENT_A, MOMENT_B

    dims = [check_positive_int(d, "dims") for d in dims]
    ns = [check_positive_int(n, "ns") for n in ns]
    seeds_per_n = [seeds] * len(ns) if isinstance(seeds, numbers.Integral) else list(seeds)
    if len(seeds_per_n) != len(ns):
        raise ValueError(f"seeds must be one int or one per N ({len(ns)}), got {seeds}")
    seeds_per_n = [check_positive_int(s, "seeds") for s in seeds_per_n]
    if any(n < 2 for n in ns):
        raise ValueError(f"ns must be >= 2 (entropy needs two keys), got {ns}")
    products = sorted(float(t) for t in products)
    if not products or any(not (t > 0 and math.isfinite(t)) for t in products):
        raise ValueError(f"products must be positive finite numbers, got {products}")
    points = []
    bar = tqdm(total=len(dims) * len(ns) * len(products), desc="entropy calibration",
               disable=not progress)
    for dim in dims:
        for n, n_seeds in zip(ns, seeds_per_n, strict=True):
            z_q, z_k = standard_draws(dim, n, n_seeds, seed)
            lower = 0.0  # products increase, so the last sigma_tilde bounds the next from below
            for product in products:
                target = softmax_norm_entropy(z_q, z_k, product, is_causal=is_causal)
                sigma_tilde, evals = match_entropy(
                    z_q, z_k, float(target.mean()), is_causal=is_causal, tol=tol, lower=lower
                )
                lower = sigma_tilde - 2 * tol
                at_match = lln_norm_entropy(z_q, z_k, sigma_tilde, is_causal=is_causal)
                moments_sigma = math.sqrt(max(product - MOMENT_B, 0.0) / (2 * MOMENT_A))
                moments_h = lln_norm_entropy(z_q, z_k, moments_sigma, is_causal=is_causal)
                points.append({
                    "dim": dim, "n": n, "seeds": n_seeds, "product": product,
                    "sigma_qk": math.sqrt(product),
                    "softmax_entropy": float(target.mean()),
                    "softmax_entropy_std": float(target.std(correction=0)),
                    "sigma_tilde": sigma_tilde, "evaluations": evals,
                    "lln_entropy_at_match": float(at_match.mean()),
                    "moments_sigma_tilde": moments_sigma,
                    "moments_entropy": float(moments_h.mean()),
                })
                bar.update()
    bar.close()
    result = {
        "config": {
            "target": "entropy", "dims": dims, "ns": ns, "products": products,
            "seeds": seeds_per_n, "seed": seed, "is_causal": is_causal, "tol": tol,
            "dtype": "float64",
            "q_k": "i.i.d. standard normal, alpha = beta = sigma_tilde for LLN, entry std "
            "product^(1/4) for softmax; the same draws for every product",
        },
        "points": points,
    }
    result["fits"] = fit_entropy_forms(points)
    evaluate_fits(result, progress=progress)
    return result


def fit_entropy_forms(points: list[dict]) -> dict:
    """OLS fit of every closed form of ``ENTROPY_FORMS`` to the matched sigma_tilde."""
    from ..ops.entropy_matching import ENTROPY_FORMS, form_features

    fits = {}
    for name in ENTROPY_FORMS:
        x = np.stack([
            form_features(name, p["sigma_qk"], p["dim"], p["n"]) for p in points
        ])
        y = np.asarray([p["sigma_tilde"] for p in points])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        resid = y - x @ coef
        ss_tot = float(((y - y.mean()) ** 2).sum())
        fits[name] = {
            "coefficients": coef.tolist(),
            "r2": 1.0 - float(resid @ resid) / ss_tot if ss_tot > 0 else 1.0,
            "rms_residual": float(np.sqrt((resid**2).mean())),
            "max_abs_residual": float(np.abs(resid).max()),
        }
    return fits


def evaluate_fits(result: dict, *, progress: bool = False) -> None:
    """Add, for every point and every form, LLN's entropy at the fitted sigma_tilde.

    ``point["forms"]["fit:<form>"]``: the form's sigma_tilde (fitted to this table), LLN's
    mean normalised entropy there on the calibration draws, and its error against softmax.
    """
    from tqdm.auto import tqdm

    from ..ops.entropy_matching import ENTROPY_FORMS, form_features

    cfg = result["config"]
    draws: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    bar = tqdm(total=len(result["points"]), desc="evaluate fits", disable=not progress)
    for p in result["points"]:
        key = (p["dim"], p["n"])
        if key not in draws:
            draws = {key: standard_draws(p["dim"], p["n"], p["seeds"], cfg["seed"])}
        z_q, z_k = draws[key]
        evaluated = {}
        for name in ENTROPY_FORMS:
            feats = form_features(name, p["sigma_qk"], p["dim"], p["n"])
            s = max(float(np.dot(feats, result["fits"][name]["coefficients"])), 1e-6)
            h = float(lln_norm_entropy(z_q, z_k, s, is_causal=cfg["is_causal"]).mean())
            evaluated[f"fit:{name}"] = {"sigma_tilde": s, "entropy": h,
                                        "error": h - p["softmax_entropy"]}
        p["forms"] = evaluated
        bar.update()
    bar.close()
