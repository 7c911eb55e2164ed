"""lln: Linear Log-Normal attention for PyTorch.

Functional API (tensors ``(batch, heads, seq, dim)`` as in
``torch.nn.functional.scaled_dot_product_attention``)::

    lln.lln_attention(q, k, v, is_causal=True)          # linear-cost LLN attention
    lln.lln_diag_attention(q, k, v, is_causal=True)     # LLN + block-diagonal softmax
    lln.block_diag_attention(q, k, v)                   # the diagonal part alone
    lln.moment_match(q, k)                              # the feature scales (alpha, beta)
    lln.lln_attention_matrix(q, k)                      # explicit N x N oracle

Layers: :class:`lln.LLNAttention`, a drop-in for ``nn.MultiheadAttention(batch_first=True)``.
"""

from .layers import LLNAttention
from .ops import (
    MOMENT_A,
    MOMENT_B,
    STATS_MODES,
    LLNState,
    PrefixMoments,
    block_diag_attention,
    block_diag_attention_matrix,
    lln_attention,
    lln_attention_matrix,
    lln_diag_attention,
    lln_diag_attention_matrix,
    moment_match,
)

__version__ = "0.1.0"

__all__ = [
    "LLNAttention",
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
