"""``LLNCache``: a transformers ``Cache`` that keeps the LLN state, not the keys and values.

Through the attention interface transformers hands the attention the whole key/value cache
at each decoding step, which makes LLN decoding O(context) per token. ``LLNCache`` stores,
per layer, the :class:`lln.LLNState` (``D x Dv`` sums per head, plus the prefix moments when
alpha/beta are moment-matched) and, for ``lln_diag``, the :class:`lln.hf.local.DiagWindow`
of the current unfinished diagonal block. ``update`` returns the new keys/values only (tagged
so that the LLN attention function finds the layer) and the attention advances the state::

    cache = lln.hf.LLNCache()
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache)

Every decoded token then reads and writes O(H * D * Dv + H * block_size * D) numbers per
layer, whatever the context length. Works with greedy/sampling and beam search
(``reorder_cache``); ``crop`` (assisted decoding) is not possible for a recurrent state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.state import LLNState
from .attention import CACHE_TAG
from .local import DiagWindow

try:  # transformers is the optional `hf` extra
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "lln.hf needs transformers >= 4.56: pip install lln[hf]"
    ) from err


class LLNCacheLayer(CacheLayerMixin):
    """The cache of one layer: an :class:`LLNState`, a diagonal window and a token count."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.is_initialized = False  # set by the base class from transformers 4.57 on
        self.state: LLNState | None = None
        self.window: DiagWindow | None = None
        self.seen = 0  # tokens consumed, padding included (what the masks are sized by)
        self.pending = False
        self.setup: tuple | None = None  # the attention's parsed per-layer settings

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        """Register new tokens; returns them (not the past) for the LLN attention to consume."""
        if self.pending:
            raise RuntimeError(
                "LLNCache: the previous update of this layer was not consumed by an LLN "
                "attention; LLNCache needs attn_implementation 'lln' or 'lln_diag' (call "
                "lln.hf.register() before loading the model)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = True
        self.seen += key_states.shape[-2]
        tagged = key_states.view_as(key_states)  # a new tensor object, same storage
        setattr(tagged, CACHE_TAG, self)
        return tagged, value_states

    def consume(self, state: LLNState | None, window: DiagWindow | None) -> None:
        """Called by the attention with the state after the new tokens."""
        self.state, self.window, self.pending = state, window, False

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        # transformers 4.56 passes cache_position (a tensor), 5.x the query length
        q = query_length.shape[0] if isinstance(query_length, Tensor) else int(query_length)
        return self.seen + q, 0

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the name of this method in transformers 4.x

    def offload(self) -> None:  # the state is small: nothing to offload
        return None

    def prefetch(self) -> None:
        return None

    def reset(self) -> None:
        self.state = self.window = self.setup = None
        self.seen, self.pending = 0, False

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)
        if self.window is not None:
            self.window = self.window.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(
                "LLNCache cannot remove tokens: the LLN state is a running sum (no assisted "
                "decoding / rollback)"
            )


class LLNCache(Cache):
    """O(1)-per-token decoding cache for models using ``attn_implementation="lln"`` /
    ``"lln_diag"``. Pass it as ``past_key_values`` to ``model(...)`` or ``generate``.

    Args:
        config: accepted (and ignored) for symmetry with transformers' caches; layers are
            created on first use.
    """

    def __init__(self, config=None, **kwargs) -> None:
        super().__init__(layer_class_to_replicate=LLNCacheLayer)

    def __repr__(self) -> str:
        return f"LLNCache(layers={len(self.layers)}, tokens={self.get_seq_length()})"
