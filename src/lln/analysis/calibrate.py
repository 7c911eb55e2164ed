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
