"""nn.Modules: thin wrappers over the functions in :mod:`lln.ops`."""

from .attention import LLNAttention

__all__ = ["LLNAttention"]
