"""Concentration instruments (entropy, spectral gap, log-normality), sweeps and calibration.

Instruments take explicit row-stochastic attention matrices ``(..., N, N)``; get one for any
attention of the library with :func:`attention_matrix`::

    from lln.analysis import attention_matrix, mean_entropy, spectral_gap, log_normality
    p = attention_matrix("lln", q, k)                 # (B, H, N, N)
    mean_entropy(p, normalize=True), spectral_gap(p), log_normality(p).var

Command-line tools: ``lln sweep``, ``lln calibrate``, ``lln analyze`` (docs/analysis.md).
"""

from .instruments import (
    LogNormalStats,
    check_attention_matrix,
    dagostino_k2,
    log_normality,
    mean_entropy,
    row_entropy,
    spectral_gap,
)
from .matrices import LLN_VARIANTS, analysis_methods, attention_matrix

__all__ = [
    "LLN_VARIANTS",
    "LogNormalStats",
    "analysis_methods",
    "attention_matrix",
    "check_attention_matrix",
    "dagostino_k2",
    "log_normality",
    "mean_entropy",
    "row_entropy",
    "spectral_gap",
]
