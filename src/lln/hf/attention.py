"""LLN attention functions with the signature of transformers' ``AttentionInterface``.

``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)`` with
``query (B, H, L, D)``, ``key``/``value`` ``(B, H_kv, S, D)``; returns ``(out (B, L, H, Dv),
None)`` (LLN has no explicit attention weights). What each argument becomes:

* ``module.is_causal`` (or an ``is_causal`` keyword) -> ``is_causal`` of the op.
* grouped-query attention: ``key``/``value`` are expanded to ``H`` heads with
  ``repeat_interleave`` (``module.num_key_value_groups`` times): memory for k/v grows by that
  factor for the call, and the LLN state is per query head (alpha/beta are per query head).
* ``attention_mask``: the 2-D padding mask made by :func:`lln.hf.masks.padding_mask`
  (True = real token). Left and right padding give the same outputs as unpadded per-sample
  runs: padded keys leave numerator, denominator and statistics, and the diagonal blocks
  of ``lln_diag`` start at each sequence's first real token (:mod:`lln.hf.local`).
* ``scaling``: softmax uses ``scaling * q.k``; moment matching assumes ``q.k / sqrt(D)``, so
  q is multiplied by ``scaling * sqrt(D)`` (a no-op for the usual ``1/sqrt(D)``).
* ``dropout`` (training only): LLN has no attention matrix to drop entries from, so dropout
  is applied to the value vectors (elementwise, rescaled by ``1/(1-p)``), which matches the
  expectation of attention-weight dropout at linear cost.
* alpha/beta: the per-head frozen values of the module's :class:`LLNAttentionParams` when
  calibrated (see :mod:`lln.hf.params`), else moment matching per sequence and head (prefix
  statistics when causal).
* an :class:`lln.hf.LLNCache`: the keys/values are the new tokens only and the attention
  continues the layer's :class:`lln.LLNState` (O(1) per decoded token). Without it, a causal
  call with fewer queries than keys (transformers' ``DynamicCache``) recomputes the whole
  prefix: correct with calibrated alpha/beta, O(context) per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.block_diag import check_block_args
from ..ops.lln import lln_attention
from .local import aligned_block_diag
from .masks import key_padding_mask_from_hf
from .params import lln_options, params_for

#: Attribute set on the key tensor returned by ``LLNCacheLayer.update``.
CACHE_TAG = "_lln_cache_layer"
#: The implementations built on LLN (the others come from the op registry).
LLN_METHODS = ("lln", "lln_diag")


def _expand_heads(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _prepare(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
             scaling: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """GQA expansion and the ``scaling`` correction of q (see the module docstring)."""
    h, h_kv = query.shape[1], key.shape[1]
    if key.shape[1] != value.shape[1] or h % h_kv:
        raise ValueError(
            f"query heads ({h}) must be a multiple of key/value heads, got key "
            f"{tuple(key.shape)}, value {tuple(value.shape)}"
        )
    groups = h // h_kv
    expected = getattr(module, "num_key_value_groups", groups)
    if expected != groups:
        raise ValueError(
            f"module.num_key_value_groups is {expected}, but query/key heads give {groups}"
        )
    key, value = _expand_heads(key, groups), _expand_heads(value, groups)
    if scaling is not None:
        factor = float(scaling) * math.sqrt(query.shape[-1])
        if abs(factor - 1.0) > 1e-6:
            query = query * factor
    return query, key, value


def _softmax_teacher(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     is_causal: bool) -> Tensor:
    """Exact softmax attention (scale 1/sqrt(D)) on prepared inputs; used while calibrating."""
    b, _, n, _ = q.shape
    s = k.shape[2]
    visible = torch.ones(b, 1, n, s, dtype=torch.bool, device=q.device)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    if is_causal:
        visible = visible & torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
    empty = ~visible.any(-1, keepdim=True)  # padded queries: let them see all, output unused
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | empty)
    return out.masked_fill(empty, 0.0)


def _layer_setup(module: nn.Module, head_dim: int, cache_layer) -> tuple:
    """``(params, options, block_size, scale)`` of an attention module: looked up and
    parsed once per cache layer (a generation), not at every decoded token."""
    setup = None if cache_layer is None else cache_layer.setup
    if setup is not None and setup[0] is module and setup[1] == head_dim:
        return setup[2]
    params = params_for(module)
    options = lln_options(module.config)
    block_size, scale = check_block_args(options["block_size"], None, head_dim)
    found = (params, options, block_size, scale)
    if cache_layer is not None:
        cache_layer.setup = (module, head_dim, found)
    return found


def _lln_family(
    method: str, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
    is_causal: bool, cache_layer,
) -> Tensor:
    """LLN or LLN+Diag on prepared ``(B, H, ., D)`` inputs; continues ``cache_layer``."""
    params, options, block_size, scale = _layer_setup(module, q.shape[-1], cache_layer)
    alpha, beta = (None, None) if params is None else params.scales()
    state = window = None
    if cache_layer is not None:
        state, window = cache_layer.state, cache_layer.window
    keep_state = cache_layer is not None
    lln_out = lln_attention(
        q, k, v, is_causal=is_causal, key_padding_mask=mask, alpha=alpha, beta=beta,
        eps=options["eps"], chunk_size=options["chunk_size"], initial_state=state,
        output_final_state=keep_state,
        constants=options["constants"] if alpha is None else "paper",  # else frozen scales
        checkpoint=options["checkpoint"],
    )
    if keep_state:
        lln_out, state = lln_out
    if method == "lln":
        out = lln_out
    else:
        diag_out, window = aligned_block_diag(
            q, k, v, mask, block_size=block_size, scale=scale, is_causal=is_causal,
            window=window, output_window=keep_state,
        )
        if params is None:
            out = torch.add(lln_out * 0.5, diag_out, alpha=0.5)
        else:
            lw, dw = params.mixing_weights()
            out = torch.addcmul(lw * lln_out, dw, diag_out)
    if cache_layer is not None:
        cache_layer.consume(state, window)
    return out


def _registry_method(method: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                     is_causal: bool) -> Tensor:
    """A baseline from :mod:`lln.ops.registry`, with sequences compacted when padded (so
    position-dependent methods see each sequence from its first real token)."""
    from ..ops.registry import get_attention

    spec = get_attention(method)
    if is_causal and not spec.supports_causal:
        raise ValueError(f"attention {method!r} has no causal form; use it in encoders only")
    if mask is not None and not spec.supports_padding:
        raise ValueError(f"attention {method!r} does not support padding masks")
    if mask is None or q.shape[2] != k.shape[2]:
        return spec.fn(q, k, v, is_causal=is_causal, key_padding_mask=mask)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    n_real = mask.sum(1)
    mask_c = torch.arange(mask.shape[1], device=mask.device)[None, :] < n_real[:, None]

    def gather(x: Tensor) -> Tensor:
        return x.gather(2, order[:, None, :, None].expand(*x.shape[:2], -1, x.shape[3]))

    out_c = spec.fn(gather(q), gather(k), gather(v), is_causal=is_causal, key_padding_mask=mask_c)
    return torch.empty_like(out_c).scatter_(2, order[:, None, :, None].expand_as(out_c), out_c)


def hf_attention(
    method: str,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention-interface function for ``method`` ("lln", "lln_diag" or a registry
    name). Returns ``(out (B, L, H, Dv) in the dtype of query, None)``."""
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    cache_layer = getattr(key, CACHE_TAG, None)
    b, _, n_q, _ = query.shape
    mask = key_padding_mask_from_hf(attention_mask, b, key.shape[2])
    q, k, v = _prepare(module, query, key, value, scaling)
    if dropout and module.training:
        v = F.dropout(v, p=dropout, training=True)
    params = params_for(module) if method in LLN_METHODS else None

    if params is not None and params.recording:
        params.record(q, k, mask)
        if params.record_forward == "softmax":
            out = _softmax_teacher(q, k, v, mask, is_causal)
            return out.transpose(1, 2).contiguous().to(query.dtype), None

    prefix = k.shape[2] - n_q
    if cache_layer is None and prefix > 0 and is_causal:
        # a cache that hands over every past key (DynamicCache): rerun the prefix
        if method in LLN_METHODS and (params is None or params.scales()[0] is None):
            raise ValueError(
                "causal LLN with moment matching needs the statistics of past queries, which "
                "a key/value cache does not keep: decode with lln.hf.LLNCache "
                "(past_key_values=LLNCache()), or calibrate the model (lln.hf.calibrate)"
            )
        q = torch.cat([q.new_zeros(b, q.shape[1], prefix, q.shape[3]), q], 2)
    if cache_layer is not None:
        if method not in LLN_METHODS:
            raise ValueError(f"lln.hf.LLNCache supports 'lln' and 'lln_diag', not {method!r}")
        if not is_causal:
            raise ValueError("lln.hf.LLNCache needs a causal attention module")
        if prefix != 0:
            raise ValueError(
                f"with LLNCache the attention gets the new tokens only; got {n_q} queries and "
                f"{k.shape[2]} keys"
            )
    if method in LLN_METHODS:
        out = _lln_family(method, module, q, k, v, mask, is_causal, cache_layer)
    else:
        out = _registry_method(method, q, k, v, mask, is_causal)
    out = out[:, :, out.shape[2] - n_q:]
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def lln_hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """``attn_implementation="lln"``: see the module docstring."""
    return hf_attention("lln", module, query, key, value, attention_mask, scaling, dropout,
                        **kwargs)


def lln_diag_hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          **kwargs):
    """``attn_implementation="lln_diag"``: LLN plus per-sequence block-diagonal softmax."""
    return hf_attention("lln_diag", module, query, key, value, attention_mask, scaling,
                        dropout, **kwargs)


def registry_hf_attention(method: str):
    """An attention-interface function for the registry entry ``method`` (e.g. "elu")."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return hf_attention(method, module, query, key, value, attention_mask, scaling,
                            dropout, **kwargs)

    fn.__name__ = f"{method}_hf_attention"
    fn.__doc__ = f"``attn_implementation='lln_{method}'``: registry attention {method!r}."
    return fn
