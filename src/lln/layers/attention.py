"""``LLNAttention``: multi-head attention with LLN (or LLN+Diag) inside.

A thin module over :func:`lln.lln_attention` / :func:`lln.lln_diag_attention`: q/k/v/out
projections plus the choice of statistics and of how the two parts are combined. Its
``forward`` mirrors ``nn.MultiheadAttention(batch_first=True)``, so it can replace one; like
that class, ``key_padding_mask`` here is True where a token is *padding* (the functional API
uses the SDPA / Hugging Face convention, True = real token).

Differences from ``nn.MultiheadAttention`` (each refused with a clear error, never ignored):

* ``batch_first`` only (inputs ``(B, N, E)``), no ``kdim``/``vdim``, no ``add_bias_kv``.
* ``need_weights`` defaults to **False** (``nn.MultiheadAttention``: True): the weights are
  an N x N matrix, which would make every call quadratic; pass ``need_weights=True`` to get
  them.
* ``attn_mask`` must be the causal mask (``nn.Transformer.generate_square_subsequent_mask``
  or its bool form): LLN cannot apply an arbitrary mask in linear time.
* Cross-attention (``key``/``value`` other than ``query``) works when the op does: non-causal
  with ``diag=False`` for any key length; LLN+Diag and causal attention need as many keys as
  queries (their diagonal blocks / causal order pair query i with key i).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import (
    LLNState,
    lln_attention,
    lln_attention_matrix,
    lln_diag_attention,
    lln_diag_attention_matrix,
)
from ..ops._validation import check_bool
from ..ops.moment_matching import (
    check_constants_mode,
    head_variances,
    resolve_constants,
    scales_from_variances,
)

COMBINE_MODES = ("average", "scale", "ratio")
STATS_MODES = ("batch", "running", "fixed")


def _real_tokens(key_padding_mask: Tensor) -> Tensor:
    """``nn.MultiheadAttention``'s padding mask (bool True = padding, or float 0 / -inf) as
    the functional API's mask (True = real token)."""
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask
    if key_padding_mask.is_floating_point():
        real = key_padding_mask == 0
        if not bool((real | (key_padding_mask == float("-inf"))).all()):
            raise ValueError(
                "a float key_padding_mask must hold only 0 (attend) and -inf (padding); LLN "
                "cannot add arbitrary biases to its scores"
            )
        return real
    raise TypeError(
        f"key_padding_mask must be bool (True = padding) or float (0 / -inf), got "
        f"{key_padding_mask.dtype}"
    )


def _check_causal_mask(attn_mask: Tensor, n_query: int, n_key: int) -> None:
    """Raise ValueError unless ``attn_mask`` is ``nn.MultiheadAttention``'s causal mask:
    ``(L, L)`` or ``(B * H, L, L)``; bool True / float -inf strictly above the diagonal."""
    if attn_mask.dim() not in (2, 3) or attn_mask.shape[-2:] != (n_query, n_key) \
            or n_query != n_key:
        raise ValueError(
            f"attn_mask must be the causal mask of shape ({n_query}, {n_query}) or (batch * "
            f"heads, {n_query}, {n_query}), got {tuple(attn_mask.shape)}; LLN cannot apply "
            "an arbitrary attention mask"
        )
    above = torch.ones(n_query, n_query, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        causal = bool((attn_mask == above).all())
    elif attn_mask.is_floating_point():
        causal = bool(((attn_mask == float("-inf")) == above).all()
                      and (attn_mask.masked_fill(above, 0) == 0).all())
    else:
        causal = False
    if not causal:
        raise ValueError(
            "attn_mask is not the causal mask (True or -inf exactly above the diagonal, "
            "False or 0 elsewhere); LLN cannot apply an arbitrary attention mask: pass "
            "is_causal=True for causal attention, or key_padding_mask for padding"
        )


class LLNAttention(nn.Module):
    """Multi-head self-attention with Linear Log-Normal attention, linear in sequence length.

    Args:
        embed_dim: model width E (split into ``num_heads`` heads of ``E // num_heads``).
        num_heads: number of heads H.
        bias: biases in the projections.
        is_causal: causal self-attention (strictly causal; supports state chaining).
        diag: add block-diagonal softmax attention (LLN+Diag, the paper's best variant).
        block_size: diagonal block size (default: the head dim).
        combine: how LLN and Diag are joined: ``"average"`` (0.5 each), ``"scale"``
            (learnable r, p of shape (1, H, 1, head_dim), init 0.5: ``r*LLN + p*Diag``) or
            ``"ratio"`` (learnable r: ``r*LLN + (1-r)*Diag``).
        stats: where the moment-matching statistics come from: ``"batch"`` (each sequence's
            own, per head; prefix statistics when causal), ``"running"`` (batch statistics in
            training, tracked per head as an exponential moving average in the buffers
            ``running_var_q/k``; those are used in eval — like BatchNorm) or ``"fixed"``
            (always the buffers, e.g. after calibration on real data). The statistics
            carry no gradient (as in the paper's code): alpha and beta are constants for
            autograd.
        momentum: EMA factor of the running statistics.
        temperature: divides the moment-matched sigma_tilde (> 1 flattens attention).
        constants: moment-matching constants (a, b): ``"paper"`` (the paper's D = 64 fit,
            default) or ``"head_dim"`` (calibrated for the head dim, see
            :func:`lln.lln_attention`); used with every ``stats`` mode.
        chunk_size: chunk length of the causal kernel.
        checkpoint: passed to the op, where it no longer has an effect (see
            :func:`lln.lln_attention`: the kernel's backward recomputes one segment at a
            time anyway).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        is_causal: bool = False,
        diag: bool = True,
        block_size: int | None = None,
        combine: str = "average",
        stats: str = "batch",
        momentum: float = 0.1,
        temperature: float = 1.0,
        constants: str = "paper",
        chunk_size: int = 64,
        checkpoint: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
        if combine != "average" and not diag:
            raise ValueError(f"combine={combine!r} needs diag=True")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        check_constants_mode(constants)
        self.checkpoint = check_bool(checkpoint, "checkpoint")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.is_causal, self.diag, self.block_size = is_causal, diag, block_size
        self.combine, self.stats, self.momentum = combine, stats, momentum
        self.temperature, self.chunk_size = temperature, chunk_size
        self.constants = constants
        self.batch_first = True  # what nn.MultiheadAttention users check
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        weight_shape = (1, num_heads, 1, self.head_dim)
        if combine == "scale":
            self.lln_scale = nn.Parameter(torch.full(weight_shape, 0.5, **factory))
            self.diag_scale = nn.Parameter(torch.full(weight_shape, 0.5, **factory))
        elif combine == "ratio":
            self.ratio = nn.Parameter(torch.full(weight_shape, 0.5, **factory))
        stat_kw = {"device": device, "dtype": torch.float32}
        self.register_buffer("running_var_q", torch.ones(num_heads, **stat_kw))
        self.register_buffer("running_var_k", torch.ones(num_heads, **stat_kw))
        self.register_buffer(
            "num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"is_causal={self.is_causal}, diag={self.diag}, combine={self.combine!r}, "
            f"stats={self.stats!r}, temperature={self.temperature}, "
            f"constants={self.constants!r}"
        )

    def reset_running_stats(self) -> None:
        self.running_var_q.fill_(1.0)
        self.running_var_k.fill_(1.0)
        self.num_batches_tracked.zero_()

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _weights(self) -> tuple[float | Tensor, float | Tensor]:
        if self.combine == "scale":
            return self.lln_scale, self.diag_scale
        if self.combine == "ratio":
            return self.ratio, 1 - self.ratio
        return 0.5, 0.5

    def _scales(self, q: Tensor, k: Tensor, real: Tensor | None) -> tuple[Tensor | None, ...]:
        """alpha, beta to pass on (None = per-sequence moment matching in the op)."""
        if self.stats == "running" and self.training:
            with torch.no_grad():
                m = self.momentum
                buffer_dtype = self.running_var_q.dtype  # follows module.to(dtype)
                self.running_var_q.lerp_(head_variances(q, real).to(buffer_dtype), m)
                self.running_var_k.lerp_(head_variances(k, real).to(buffer_dtype), m)
                self.num_batches_tracked += 1
        if self.stats == "batch" or (self.stats == "running" and self.training):
            return None, None
        shape = (1, self.num_heads, 1, 1)
        a, b = resolve_constants(self.constants, self.head_dim)
        return scales_from_variances(
            self.running_var_q.view(shape), self.running_var_k.view(shape),
            temperature=self.temperature, a=a, b=b,
        )

    def _op_constants(self, alpha: Tensor | None) -> str:
        """``constants`` for the ops: ours when they moment-match, else the default (alpha,
        beta from the buffers were already made with ours, and the ops refuse both)."""
        return self.constants if alpha is None else "paper"

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        initial_state: LLNState | None = None,
        output_final_state: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, LLNState]:
        """Attention of ``query (B, L, E)`` over ``key (B, S, E)`` / ``value (B, S, E)``.

        ``key`` defaults to ``query`` and ``value`` to ``key`` (self-attention); any tensors
        of the right shape may be given (cross-attention, see the module doc for which
        configurations allow ``S != L``). ``key_padding_mask (B, S)`` bool: True = padding
        (``nn.MultiheadAttention``'s convention), or float 0 / -inf.
        ``attn_mask``: ``None`` or the causal mask, ``(L, L)`` or ``(B * H, L, L)``, bool
        (True above the diagonal = not allowed) or float (-inf above the diagonal, 0 else);
        it makes the call causal, with or without ``is_causal=True`` (as in
        ``nn.MultiheadAttention``, where ``is_causal`` is a hint about ``attn_mask``). Any
        other mask raises ValueError: LLN cannot apply it in linear time. Checking the mask
        reads its values (one host sync); pass ``is_causal=True`` alone to avoid it.
        ``need_weights`` (default **False**, unlike ``nn.MultiheadAttention``) also returns
        the explicit attention matrix ``(B, L, S)`` (averaged over heads) or
        ``(B, H, L, S)`` — quadratic, for analysis only.

        Returns ``(out (B, L, E), weights or None)``, plus the state when
        ``output_final_state`` (causal only).
        """
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have shape (batch, seq, {self.embed_dim}), got "
                    f"{tuple(t.shape)}"
                )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"key {tuple(key.shape)} and value {tuple(value.shape)} must share batch and "
                f"length, and the batch of query {tuple(query.shape)}"
            )
        causal = self.is_causal or check_bool(is_causal, "is_causal")
        if attn_mask is not None:
            _check_causal_mask(attn_mask, query.shape[1], key.shape[1])
            causal = True
        if key.shape[1] != query.shape[1] and (causal or self.diag):
            raise ValueError(
                f"cross-attention over {key.shape[1]} keys for {query.shape[1]} queries needs "
                f"diag=False and a non-causal call (got diag={self.diag}, causal={causal}); "
                "LLN+Diag's blocks and causal order pair query i with key i"
            )
        if need_weights and initial_state is not None:
            raise ValueError(
                "need_weights=True cannot be combined with initial_state: the matrix would "
                "cover only the current piece"
            )
        real = None if key_padding_mask is None else _real_tokens(key_padding_mask)
        q, k, v = (self._split_heads(p(x)) for p, x in
                   ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        alpha, beta = self._scales(q, k, real)
        common = dict(
            is_causal=causal, key_padding_mask=real, alpha=alpha, beta=beta, stats="head",
            temperature=self.temperature, constants=self._op_constants(alpha),
            chunk_size=self.chunk_size, checkpoint=self.checkpoint,
            initial_state=initial_state, output_final_state=output_final_state,
        )
        lln_w, diag_w = self._weights()
        if self.diag:
            result = lln_diag_attention(
                q, k, v, block_size=self.block_size, lln_weight=lln_w, diag_weight=diag_w,
                **common,
            )
        else:
            result = lln_attention(q, k, v, **common)
        out, state = result if output_final_state else (result, None)
        b, _, n, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))
        weights = None
        if need_weights:
            weights = self._attention_matrix(q, k, real, causal, alpha, beta).to(query.dtype)
            weights = weights.mean(1) if average_attn_weights else weights
        return (out, weights, state) if output_final_state else (out, weights)

    @torch.no_grad()
    def _attention_matrix(self, q, k, real, causal, alpha, beta) -> Tensor:
        if self.combine != "average":
            raise ValueError(
                f"need_weights=True needs combine='average': with combine={self.combine!r} "
                "the output mixes channels differently, so it has no single attention matrix"
            )
        common = dict(
            is_causal=causal, key_padding_mask=real, alpha=alpha, beta=beta, stats="head",
            temperature=self.temperature, constants=self._op_constants(alpha),
        )
        if self.diag:
            return lln_diag_attention_matrix(q, k, block_size=self.block_size, **common)
        return lln_attention_matrix(q, k, **common)
