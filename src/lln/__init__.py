"""lln: Linear Log-Normal attention for PyTorch.

Functional API (tensors ``(batch, heads, seq, dim)`` as in
``torch.nn.functional.scaled_dot_product_attention``)::

    lln.lln_attention(q, k, v, is_causal=True)          # linear-cost LLN attention
    lln.lln_diag_attention(q, k, v, is_causal=True)     # LLN + block-diagonal softmax
    lln.block_diag_attention(q, k, v)                   # the diagonal part alone
    lln.moment_match(q, k)                              # the feature scales (alpha, beta)
    lln.lln_attention_matrix(q, k)                      # explicit N x N oracle
    lln.get_attention("performer").fn(q, k, v)          # baselines, one signature
    lln.set_debug(True)                                 # data-dependent checks (they sync)

Layers: :class:`lln.LLNAttention`, a drop-in for ``nn.MultiheadAttention(batch_first=True)``.
"""

from .layers import LLNAttention
from .ops import (
    ATTENTIONS,
    MOMENT_A,
    MOMENT_B,
    STATS_MODES,
    AttentionSpec,
    LLNState,
    PrefixMoments,
    attention_names,
    block_diag_attention,
    block_diag_attention_matrix,
    cosformer_attention,
    cosformer_attention_matrix,
    draw_orthogonal_projection,
    elu_attention,
    elu_attention_matrix,
    get_attention,
    lln_attention,
    lln_attention_matrix,
    lln_diag_attention,
    lln_diag_attention_matrix,
    moment_match,
    nystrom_attention,
    nystrom_attention_matrix,
    performer_attention,
    performer_attention_matrix,
    softmax_attention,
    softmax_attention_matrix,
)
from .ops._validation import debug_enabled, set_debug

__version__ = "0.1.0"

__all__ = [
    "ATTENTIONS",
    "MOMENT_A",
    "MOMENT_B",
    "STATS_MODES",
    "AttentionSpec",
    "LLNAttention",
    "LLNState",
    "PrefixMoments",
    "attention_names",
    "block_diag_attention",
    "block_diag_attention_matrix",
    "cosformer_attention",
    "cosformer_attention_matrix",
    "debug_enabled",
    "draw_orthogonal_projection",
    "elu_attention",
    "elu_attention_matrix",
    "get_attention",
    "lln_attention",
    "lln_attention_matrix",
    "lln_diag_attention",
    "lln_diag_attention_matrix",
    "moment_match",
    "nystrom_attention",
    "nystrom_attention_matrix",
    "performer_attention",
    "performer_attention_matrix",
    "set_debug",
    "softmax_attention",
    "softmax_attention_matrix",
]
