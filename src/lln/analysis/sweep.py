"""Temperature sweep: how concentration moves with ``sigma_q^2 sigma_k^2`` (SPEC sections 1-2).

Gaussian q, k with entries of standard deviation ``sigma = (sigma_q^2 sigma_k^2)^(1/4)`` (so
the softmax score ``q.k / sqrt(D)`` has variance ``sigma_q^2 sigma_k^2``, and softmax
``Var(log P) ~ sigma_q^2 sigma_k^2``). Larger products mean a colder, more concentrated
softmax. For each product and each method the sweep measures, per matrix, Var(log P) and the
other log-normality statistics, the mean row entropy (raw and normalised by log N) and the
spectral gap, then averages over seeds (one independent (q, k) draw per seed).

The paper's claims this checks: softmax entropy and gap fall monotonically as the product
grows (rise with temperature); moment-matched LLN follows softmax; LLN without moment
matching and ELU+1 do not (ELU+1 stays diluted: entropy and gap near 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ops._validation import check_bool, check_positive_int
from .instruments import log_normality, mean_entropy, spectral_gap
from .matrices import analysis_methods, attention_matrix

#: Methods of the default sweep: softmax, LLN with and without moment matching, ELU+1.
DEFAULT_METHODS = ("softmax", "lln", "lln_fixed", "lln_performer", "elu")
#: Default products sigma_q^2 sigma_k^2: 2^(k/2), k = -8..8 (1/16 .. 16).
DEFAULT_PRODUCTS = tuple(2.0 ** (k / 2) for k in range(-8, 9))
#: Per-matrix metrics recorded by the sweep.
METRICS = ("var_log_p", "skewness", "excess_kurtosis", "k2", "entropy", "norm_entropy", "gap")
#: The acceptance range of the issue: products in [0.25, 4], tolerance 0.05.
MATCH_RANGE = (0.25, 4.0)
MATCH_TOLERANCE = 0.05


def entropy_tolerance(n: int) -> float:
    """Entropy-matching acceptance (docs/analysis.md): |normalised entropy - softmax| over
    :data:`MATCH_RANGE` within 0.03 up to N = 256 and within 0.05 beyond."""
    return 0.03 if n <= 256 else 0.05


def gaussian_qk(
    product: float, *, n: int, dim: int, batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``q, k (batch, 1, n, dim)`` with entry std ``product ** 0.25`` each.

    The standard-normal draws depend on ``seed`` only, not on ``product``.
    """
    gen = torch.Generator().manual_seed(seed)
    sigma = product**0.25
    q = torch.randn(batch, 1, n, dim, generator=gen, dtype=torch.float64) * sigma
    k = torch.randn(batch, 1, n, dim, generator=gen, dtype=torch.float64) * sigma
    return q, k


def matrix_metrics(
    p: torch.Tensor, *, sample_size: int = 2000, is_causal: bool = False
) -> dict[str, torch.Tensor]:
    """Every sweep metric of the matrices ``p (..., N, N)``, each of shape ``(...)``.

    Causal: log-normality over the visible entries, entropy of each row normalised by its
    visible count (the first row left out), and the gap of the triangular matrix
    (``1 - max_{i >= 1} P_ii``).
    """
    stats = log_normality(p, sample_size=sample_size, is_causal=is_causal)
    return {
        "var_log_p": stats.var, "skewness": stats.skewness,
        "excess_kurtosis": stats.excess_kurtosis, "k2": stats.k2,
        "entropy": mean_entropy(p, is_causal=is_causal),
        "norm_entropy": mean_entropy(p, normalize=True, is_causal=is_causal),
        "gap": spectral_gap(p),
    }


def _histogram(p: torch.Tensor, bins: int = 60) -> dict:
    """Histogram of log P (one matrix) with the moments of the fitted normal."""
    log_p = torch.log(p[p > 0]).numpy()
    counts, edges = np.histogram(log_p, bins=bins, density=True)
    return {
        "density": counts.tolist(), "edges": edges.tolist(),
        "mean": float(log_p.mean()), "std": float(log_p.std()),
    }


def temperature_sweep(
    *,
    dim: int = 64,
    n: int = 256,
    products: tuple[float, ...] | list[float] = DEFAULT_PRODUCTS,
    methods: tuple[str, ...] | list[str] = DEFAULT_METHODS,
    seeds: int = 4,
    seed: int = 0,
    hist_product: float = 1.0,
    sample_size: int = 2000,
    is_causal: bool = False,
    progress: bool = False,
) -> dict:
    """Run the sweep; returns a JSON-ready dict.

    Args:
        dim, n: head dim D and tokens N of the Gaussian q, k.
        products: values of ``sigma_q^2 sigma_k^2`` (positive, increasing).
        methods: names from :func:`lln.analysis.analysis_methods`; must include "softmax".
        seeds: independent draws per product (a batch of ``seeds`` sequences, so
            per-sequence statistics see one draw each).
        seed: seed of the draws. Every product scales the same standard-normal draws
            (common random numbers): a product changes only the temperature of one and the
            same set of inputs, so curves are smooth and differences between products are not
            sampling noise.
        hist_product: product at which the log P histograms (first draw) are kept.
        sample_size: subsample for the K^2 normality statistic.
        is_causal: causal matrices (every method with its causal path: prefix statistics
            for the matched LLN variants; entropies normalised by each row's visible count).
        progress: tqdm bar.

    Returns:
        ``{"config", "products", "methods": {name: {metric: {"mean", "std"}}},
        "histograms": {name: ...}, "acceptance": ...}`` with one list entry per product.
    """
    from tqdm.auto import tqdm

    dim, n, seeds = (check_positive_int(v, name) for v, name in
                     ((dim, "dim"), (n, "n"), (seeds, "seeds")))
    is_causal = check_bool(is_causal, "is_causal")
    products = [float(t) for t in products]
    if not products or any(not (t > 0 and math.isfinite(t)) for t in products):
        raise ValueError(f"products must be positive finite numbers, got {products}")
    if products != sorted(products):
        raise ValueError("products must be increasing")
    known = analysis_methods()
    for name in methods:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; valid names: {', '.join(known)}")
    if "softmax" not in methods:
        raise ValueError("methods must include 'softmax' (the reference of the comparison)")
    hist_index = int(np.argmin([abs(math.log(t / hist_product)) for t in products]))

    per_seed = {m: {k: [] for k in METRICS} for m in methods}
    histograms = {}
    bar = tqdm(total=len(products) * len(methods),
               desc=f"sweep D={dim} N={n}{' causal' if is_causal else ''}",
               disable=not progress)
    for i, product in enumerate(products):
        q, k = gaussian_qk(product, n=n, dim=dim, batch=seeds, seed=seed)
        for name in methods:
            p = attention_matrix(name, q, k, is_causal=is_causal)
            metrics = matrix_metrics(p, sample_size=sample_size, is_causal=is_causal)
            for key, value in metrics.items():
                per_seed[name][key].append(value.reshape(-1).tolist())
            if i == hist_index:
                histograms[name] = _histogram(p[0, 0])
            bar.update()
    bar.close()

    summary = {
        name: {
            key: {
                "mean": np.nanmean(np.asarray(values), 1).tolist(),
                "std": np.nanstd(np.asarray(values), 1).tolist(),
                "values": values,
            }
            for key, values in metrics.items()
        }
        for name, metrics in per_seed.items()
    }
    result = {
        "config": {
            "dim": dim, "n": n, "seeds": seeds, "seed": seed, "dtype": "float64",
            "is_causal": is_causal,
            "sample_size": sample_size, "hist_product": products[hist_index],
            "q_k": "i.i.d. N(0, sigma^2) entries, sigma = product^(1/4); the same standard-normal "
            "draws at every product",
        },
        "products": products,
        "methods": summary,
        "histograms": histograms,
    }
    result["acceptance"] = acceptance(result)
    return result


def _monotone_decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:], strict=False))


def acceptance(result: dict) -> dict:
    """The issue's checks on a sweep result.

    * softmax normalised entropy and gap strictly decrease as the product grows (i.e. rise
      with temperature);
    * for every other method, the largest |method - softmax| difference of the mean
      normalised entropy, gap and Var(log P) over products in :data:`MATCH_RANGE`, whether
      both entropy and gap stay within :data:`MATCH_TOLERANCE` there, and every product
      (whole sweep) where either departs by more than the tolerance.
    """
    products = np.asarray(result["products"])
    methods = result["methods"]
    sa = methods["softmax"]
    checks: dict = {
        "softmax_entropy_monotone": _monotone_decreasing(sa["norm_entropy"]["mean"]),
        "softmax_gap_monotone": _monotone_decreasing(sa["gap"]["mean"]),
        "match_range": list(MATCH_RANGE),
        "tolerance": MATCH_TOLERANCE,
        "entropy_tolerance": entropy_tolerance(result["config"]["n"]),
        "vs_softmax": {},
    }
    in_range = (products >= MATCH_RANGE[0] - 1e-12) & (products <= MATCH_RANGE[1] + 1e-12)
    for name, metrics in methods.items():
        if name == "softmax":
            continue
        diffs = {
            key: np.asarray(metrics[key]["mean"]) - np.asarray(sa[key]["mean"])
            for key in ("norm_entropy", "gap", "var_log_p")
        }
        worst = {
            key: float(np.abs(d[in_range]).max()) if in_range.any() else math.nan
            for key, d in diffs.items()
        }
        mean_abs = {
            key: float(np.abs(d[in_range]).mean()) if in_range.any() else math.nan
            for key, d in diffs.items()
        }
        departs = (np.abs(diffs["norm_entropy"]) > MATCH_TOLERANCE) | (
            np.abs(diffs["gap"]) > MATCH_TOLERANCE
        )
        checks["vs_softmax"][name] = {
            "max_abs_diff_in_range": worst,
            "mean_abs_diff_in_range": mean_abs,
            "within_tolerance_in_range": bool(
                worst["norm_entropy"] <= MATCH_TOLERANCE and worst["gap"] <= MATCH_TOLERANCE
            ),
            "departs_at_products": products[departs].tolist(),
            "entropy_within_entropy_tolerance_in_range": bool(
                worst["norm_entropy"] <= checks["entropy_tolerance"]
            ),
        }
        if "values" in metrics["gap"]:
            # paired over seeds (same draws for every method): the gap's own noise cancels
            paired = np.asarray(metrics["gap"]["values"]) - np.asarray(sa["gap"]["values"])
            checks["vs_softmax"][name]["gap_paired_diff"] = {
                "mean": np.nanmean(paired, 1).tolist(), "std": np.nanstd(paired, 1).tolist(),
            }
    return checks
