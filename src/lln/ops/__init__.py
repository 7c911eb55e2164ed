"""The math: pure functions on ``(batch, heads, seq, dim)`` tensors, each next to its oracle."""

from .block_diag import block_diag_attention
from .cosformer import cosformer_attention, cosformer_attention_matrix
from .elu import elu_attention, elu_attention_matrix, linear_attention
from .lln import lln_attention
from .lln_diag import lln_diag_attention
from .moment_matching import MOMENT_A, MOMENT_B, STATS_MODES, PrefixMoments, moment_match
from .naive import block_diag_attention_matrix, lln_attention_matrix, lln_diag_attention_matrix
from .nystrom import nystrom_attention, nystrom_attention_matrix
from .performer import (
    draw_orthogonal_projection,
    performer_attention,
    performer_attention_matrix,
    performer_features,
)
from .registry import ATTENTIONS, AttentionSpec, attention_names, get_attention
from .softmax import softmax_attention, softmax_attention_matrix
from .state import LLNState

__all__ = [
    "ATTENTIONS",
    "MOMENT_A",
    "MOMENT_B",
    "STATS_MODES",
    "AttentionSpec",
    "LLNState",
    "PrefixMoments",
    "attention_names",
    "block_diag_attention",
    "block_diag_attention_matrix",
    "cosformer_attention",
    "cosformer_attention_matrix",
    "draw_orthogonal_projection",
    "elu_attention",
    "elu_attention_matrix",
    "get_attention",
    "linear_attention",
    "lln_attention",
    "lln_attention_matrix",
    "lln_diag_attention",
    "lln_diag_attention_matrix",
    "moment_match",
    "nystrom_attention",
    "nystrom_attention_matrix",
    "performer_attention",
    "performer_attention_matrix",
    "performer_features",
    "softmax_attention",
    "softmax_attention_matrix",
]
