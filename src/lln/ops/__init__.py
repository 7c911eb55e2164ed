"""The math: pure functions on ``(batch, heads, seq, dim)`` tensors, each next to its oracle."""

from .block_diag import block_diag_attention
from .lln import lln_attention
from .lln_diag import lln_diag_attention
from .moment_matching import MOMENT_A, MOMENT_B, STATS_MODES, PrefixMoments, moment_match
from .naive import block_diag_attention_matrix, lln_attention_matrix, lln_diag_attention_matrix
from .state import LLNState

__all__ = [
    "MOMENT_A",
    "MOMENT_B",
    "STATS_MODES",
    "LLNState",
    "PrefixMoments",
    "block_diag_attention",
    "block_diag_attention_matrix",
    "lln_attention",
    "lln_attention_matrix",
    "lln_diag_attention",
    "lln_diag_attention_matrix",
    "moment_match",
]
