"""Models with a pluggable attention: encoder classifier and causal decoder LM.

Every model takes ``attention=<registry name>`` (``lln.ops.registry.attention_names()``) and
differs from its siblings only in that op; :func:`parameter_counts` reports the learnable
parameters (total, and those owned by the attention method itself).
"""

from .attention import SelfAttention
from .decoder import DecoderLM
from .encoder import EncoderClassifier
from .transformer import Block, Trunk, parameter_counts

__all__ = [
    "Block",
    "DecoderLM",
    "EncoderClassifier",
    "SelfAttention",
    "Trunk",
    "parameter_counts",
]
