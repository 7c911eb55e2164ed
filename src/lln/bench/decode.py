"""Token-by-token decoding after a prefilled context, for the decoding benchmark.

* ``lln`` / ``lln_diag``: the context of length T is prefilled by one causal call with
  ``output_final_state=True``; every new token is one call with ``initial_state=state``
  (constant work and memory: the state is ``O(D * Dv)`` per head, plus at most one
  diagonal block for LLN+Diag).
* ``softmax``: a pre-allocated KV cache holds the T context keys and values; every new token
  writes its key and value into the cache and runs SDPA of its query against the cache so
  far (work and memory grow with T).
* ``<method>+compile``: the same step under ``torch.compile(fullgraph=True)`` (Inductor).
  The first steps compile (the benchmark's warm-up steps absorb that): a static graph, then
  one with the position (and the cache or diagonal-block length) as dynamic sizes.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import lln_attention, lln_diag_attention
from ..ops.state import LLNState

#: The attentions with a decoding path here.
BASE_METHODS = ("lln", "lln_diag", "softmax")
#: Suffix of a method name that runs its step under ``torch.compile``.
COMPILE_SUFFIX = "+compile"
#: Every decoding method: the eager steps and their compiled variants.
DECODE_METHODS = BASE_METHODS + tuple(m + COMPILE_SUFFIX for m in BASE_METHODS)


def _softmax_step(q: Tensor, k: Tensor, v: Tensor, cache_k: Tensor, cache_v: Tensor,
                  position: int) -> Tensor:
    """Write the token's key and value at ``position`` and attend over the cache so far."""
    end = position + 1
    cache_k[:, :, position:end].copy_(k)
    cache_v[:, :, position:end].copy_(v)
    return F.scaled_dot_product_attention(q, cache_k[:, :, :end], cache_v[:, :, :end])


def _tensor_bytes(obj: object) -> int:
    """Bytes of every tensor reachable through the dataclass fields of ``obj``."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in fields(obj))
    return 0


class Decoder:
    """One sequence being decoded: :meth:`step` appends a token and returns its output.

    Args:
        method: one of :data:`DECODE_METHODS`.
        q, k, v: the context, ``(B, H, T, D)``; consumed by the prefill.
        capacity: tokens the softmax KV cache is allocated for (>= T + the steps to come).
    """

    def __init__(self, method: str, q: Tensor, k: Tensor, v: Tensor, *, capacity: int) -> None:
        if method not in DECODE_METHODS:
            raise ValueError(
                f"method must be one of {', '.join(DECODE_METHODS)} for decoding, got {method!r}"
            )
        context = q.shape[2]
        if capacity < context:
            raise ValueError(f"capacity must be >= the context length {context}, got {capacity}")
        self.method = method
        self.base = method.removesuffix(COMPILE_SUFFIX)
        self.position = context
        self.state: LLNState | None = None
        if self.base == "softmax":
            self._step = _softmax_step
        else:
            self._step = lln_attention if self.base == "lln" else lln_diag_attention
        if method.endswith(COMPILE_SUFFIX):
            self._step = torch.compile(self._step, fullgraph=True)
        with torch.no_grad():
            if self.base == "softmax":
                b, h, _, d = k.shape
                self.cache_k = k.new_empty(b, h, capacity, d)
                self.cache_v = v.new_empty(b, h, capacity, v.shape[-1])
                self.cache_k[:, :, :context].copy_(k)
                self.cache_v[:, :, :context].copy_(v)
            else:  # the prefill is eager (the benchmark times the steps)
                attend = lln_attention if self.base == "lln" else lln_diag_attention
                _, self.state = attend(q, k, v, is_causal=True, output_final_state=True)

    def step(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Decode one token: ``q, k, v`` are ``(B, H, 1, D)``; returns ``(B, H, 1, Dv)``."""
        with torch.no_grad():
            if self.base == "softmax":
                if self.position + 1 > self.cache_k.shape[2]:
                    raise ValueError(
                        f"KV cache is full ({self.cache_k.shape[2]} tokens); raise capacity"
                    )
                out = self._step(q, k, v, self.cache_k, self.cache_v, self.position)
            else:
                out, self.state = self._step(
                    q, k, v, is_causal=True, initial_state=self.state, output_final_state=True
                )
        self.position += 1
        return out

    def memory_bytes(self) -> int:
        """Bytes the decoder carries for the tokens so far: the filled part of the KV cache,
        or every tensor of the recurrent state."""
        if self.base == "softmax":
            per_token = (self.cache_k[:, :, :1].numel() * self.cache_k.element_size()
                         + self.cache_v[:, :, :1].numel() * self.cache_v.element_size())
            return per_token * self.position
        return _tensor_bytes(self.state)
