"""The recurrent step path of causal LLN / LLN+Diag: a few tokens continuing a state.

The counterpart of fla's ``fused_recurrent`` kernels. Decoding (L = 1) and short blocks
(``L <= STEP_MAX_TOKENS``, e.g. speculative or chunked decoding) given an ``initial_state``
skip the chunked kernel: the state is updated and read with a handful of tensor ops, so one
step costs microseconds of arithmetic plus a fixed number of op launches, whatever the
context length. ``lln_attention`` and ``lln_diag_attention`` dispatch here by themselves;
the results equal the chunked path to rounding (tested token by token over 4096 tokens).

How a block of L new tokens is attended (``m`` the running per-dim max of the scaled keys,
the state's ``k_max`` continued through the block, ``m_i`` its value at token i)::

    mu_i    = max_d (alpha_i q_id + m_id)                  (no gradient, like every offset)
    state   = exp(alpha_i q_i + k_max - mu_i) @ [kv | k_sum]
    block   = sum_{j <= i} sum_d exp(alpha_i q_id + beta_j k_jd - mu_i) [v_j | 1]

Every exponent is <= 0 and the dim reaching ``mu_i`` contributes at least 1 to the
denominator, so nothing overflows or underflows whatever the spread of the scores (no
per-token offsets that could lose a row, unlike the C x C blocks of the chunked path). For
L = 1 the new key is first folded into the state and the query reads the updated state:
one exponent map and two matrix-vector products. LLN+Diag's unfinished diagonal block
(kept in the state) is attended with one ``(L, carried + L)`` score matrix.

All returned state tensors are fresh (never views of the caller's q, k, v), so a decode loop
may refill its input buffers in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import broadcast_param, compute_dtype
from .block_diag import masked_softmax
from .moment_matching import PrefixMoments, resolve_constants, scales_from_variances
from .state import LLNState

#: Longest query block (tokens) that takes the step path when a state is given.
STEP_MAX_TOKENS = 16
NEG_INF = float("-inf")


def takes_step_path(n: int, is_causal: bool, initial_state: LLNState | None) -> bool:
    """Whether a call with ``n`` queries runs the recurrent step path (static: no data)."""
    return is_causal and initial_state is not None and n <= STEP_MAX_TOKENS


def _floor(x: Tensor) -> Tensor:
    """``x`` with -inf (no key seen yet) replaced by the lowest finite value, so that
    ``y - x`` stays defined: ``exp(-inf - lowest) = 0`` where nothing was seen."""
    return x.clamp_min(torch.finfo(x.dtype).min)


@torch.no_grad()
def step_moments(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None,
    moments: PrefixMoments | None,
    *,
    stats: str,
    temperature: float,
    constants: str,
) -> tuple[Tensor, Tensor, PrefixMoments]:
    """Causal moment matching of a short block continuing ``moments``: the prefix
    statistics of :func:`lln.ops.moment_matching.moment_match_with_moments` (same sums,
    same unbiased variance, same scales) with q and k stacked into one pass, per-token sums
    in float64. Returns ``(alpha, beta)`` of shape ``(B, G, L, 1)`` in the compute dtype and
    the moments after the block."""
    b, h, n, d = q.shape
    fit_a, fit_b = resolve_constants(constants, d)
    x = torch.stack((q, k)).double()  # (2, B, H, L, D)
    s1, s2 = x.sum(-1), torch.linalg.vecdot(x, x)  # (2, B, H, L)
    cnt: Tensor | float = float(d)
    if mask is not None:
        real = mask[:, None, :]  # (B, 1, L)
        s1, s2 = torch.where(real, s1, 0.0), torch.where(real, s2, 0.0)
        cnt = real.double() * d
    if stats == "sequence":
        s1, s2, cnt = s1.sum(2, keepdim=True), s2.sum(2, keepdim=True), cnt * h
    if n > 1:
        s1, s2 = s1.cumsum(-1), s2.cumsum(-1)
        if isinstance(cnt, Tensor):
            cnt = cnt.cumsum(-1)
        else:
            cnt = torch.arange(1, n + 1, dtype=torch.float64, device=q.device) * cnt
    if moments is None:
        moments = PrefixMoments.zeros(b, h if stats == "head" else 1, q.device)
    c1 = torch.stack((moments.q_sum, moments.k_sum)).unsqueeze(-1) + s1  # (2, B, G, L)
    c2 = torch.stack((moments.q_sq_sum, moments.k_sq_sum)).unsqueeze(-1) + s2
    cn = moments.count.unsqueeze(-1) + cnt  # (B, G, L)
    var = (c2 - c1.square() / cn.clamp_min(1)) / (cn - 1).clamp_min(1)
    if mask is not None:  # nothing real yet: a neutral variance (as the chunked path)
        var = torch.where(cn > 0, var, 1.0)
    alpha, beta = scales_from_variances(var[0], var[1], temperature=temperature, a=fit_a,
                                        b=fit_b)
    cdt = compute_dtype(q.dtype)
    after = PrefixMoments(cn[..., -1], c1[0, ..., -1], c2[0, ..., -1], c1[1, ..., -1],
                          c2[1, ..., -1])
    return alpha.unsqueeze(-1).to(cdt), beta.unsqueeze(-1).to(cdt), after


def lln_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    state: LLNState,
    *,
    alpha: float | Tensor | None,
    beta: float | Tensor | None,
    stats: str,
    temperature: float,
    constants: str,
    eps: float,
    block_size: int | None = None,
) -> tuple[Tensor, LLNState]:
    """Causal LLN of ``q, k (B, H, L, D)``, ``v (B, H, L, Dv)`` (validated, L small)
    continuing ``state``. Returns ``(out (B, H, L, Dv) in the compute dtype, new state)``;
    the ``block_*`` fields of the new state are left for LLN+Diag to fill."""
    cdt = state.kv.dtype
    b, h, n, _ = q.shape
    if alpha is None:
        alpha_t, beta_t, moments = step_moments(
            q, k, mask, state.moments, stats=stats, temperature=temperature,
            constants=constants,
        )
    else:
        shape = (b, h, 1, 1)
        alpha_t = broadcast_param(alpha, "alpha", shape, dtype=cdt, device=q.device,
                                  positive=True)
        beta_t = broadcast_param(beta, "beta", shape, dtype=cdt, device=q.device,
                                 positive=True)
        moments = None
    qs = q.to(cdt) * alpha_t
    ks = k.to(cdt) * beta_t
    vc = v.to(cdt)
    if mask is not None:  # padded keys: exact zeros everywhere (exp(-inf))
        ks = ks.masked_fill(~mask[:, None, :, None], NEG_INF)
    k_max = state.k_max
    with torch.no_grad():  # offsets: any value gives the same output, so no gradient
        run = ks if n == 1 else ks.cummax(2).values
        m = torch.maximum(run, k_max.unsqueeze(2))  # (B, H, L, D), -inf: no key yet
        new_max = m[:, :, -1]
        ref = _floor(new_max)
        decay = torch.exp(k_max - ref)  # 0 where the state had no key
    inject = torch.exp(ks - ref.unsqueeze(2))  # (B, H, L, D), <= 1
    if n == 1:
        # fold the key in, then read the updated state: its offsets are exactly m
        kv = torch.addcmul(state.kv * decay.unsqueeze(-1), inject.transpose(-1, -2), vc)
        k_sum = torch.addcmul(inject.squeeze(2), state.k_sum, decay)
        q_plus = qs + m
        with torch.no_grad():
            mu = _floor(q_plus.amax(-1, keepdim=True))
        q_feat = torch.exp(q_plus - mu)  # (B, H, 1, D)
        num = q_feat @ kv
        den = q_feat @ k_sum.unsqueeze(-1)  # (B, H, 1, 1)
    else:
        with torch.no_grad():
            mu = _floor((qs + m).amax(-1, keepdim=True))  # (B, H, L, 1)
            state_offset = k_max.unsqueeze(2) - mu
        q_state = torch.exp(qs + state_offset)  # (B, H, L, D), 0 where no past key
        num = q_state @ state.kv
        den = (q_state @ state.k_sum.unsqueeze(-1)).squeeze(-1)
        # the block itself, exactly: exp(qs_id + ks_jd - mu_i) summed over d, j <= i
        logits = qs.unsqueeze(3) + ks.unsqueeze(2) - mu.unsqueeze(-1)  # (B, H, L, L, D)
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        weights = logits.masked_fill(future[:, :, None], NEG_INF).exp().sum(-1)
        num = num + weights @ vc
        den = (den + weights.sum(-1)).unsqueeze(-1)
        kv = state.kv * decay.unsqueeze(-1) + inject.transpose(-1, -2) @ vc
        k_sum = torch.addcmul(inject.sum(2), state.k_sum, decay)
    if eps:
        den = den + eps
    # den >= 1 wherever a key is visible (the dim reaching mu holds a term exp(0) = 1), and
    # num = den = 0 where none is: the floor only turns 0 / 0 into 0
    out = num / den.clamp_min(torch.finfo(cdt).tiny)
    new_state = LLNState(
        kv=kv, k_sum=k_sum, k_max=new_max, position=state.position + n,
        stats=None if alpha is not None else stats, moments=moments, block_size=block_size,
    )
    return out, new_state


def lln_diag_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    state: LLNState,
    *,
    block_size: int,
    scale: float,
    lln_weight: Tensor,
    diag_weight: Tensor,
    **lln_options,
) -> tuple[Tensor, LLNState]:
    """Causal LLN+Diag of a short block continuing ``state`` (validated inputs; weights
    already broadcast). Returns ``(out in the compute dtype, new state)``."""
    b, h, n, _ = q.shape
    cdt = state.kv.dtype
    lln_out, new_state = lln_step(q, k, v, mask, state, block_size=block_size, **lln_options)
    carried = state.position % block_size
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    if carried:
        keys = torch.cat([state.block_k.to(k.dtype), k], 2)
        values = torch.cat([state.block_v.to(v.dtype), v], 2)
        real = torch.cat([state.block_mask, real], 1)
    else:
        keys, values = k, v
    total = carried + n
    # query i (local index carried + i) sees keys j <= carried + i of its own block
    visible = real[:, None, None, :]  # (B, 1, 1, total)
    if n > 1:
        rows = torch.arange(carried, total, device=q.device)[:, None]
        cols = torch.arange(total, device=q.device)[None, :]
        same = (cols <= rows) & (cols // block_size == rows // block_size)
        visible = visible & same
    logits = (q.to(cdt) @ keys.to(cdt).transpose(-1, -2)) * scale  # (B, H, L, total)
    diag_out = masked_softmax(logits, visible) @ values.to(cdt)
    out = torch.addcmul(lln_weight * lln_out, diag_weight, diag_out)
    start = total // block_size * block_size  # first token of the unfinished block
    block_k, block_v, block_mask = keys[:, :, start:], values[:, :, start:], real[:, start:]
    if not carried:  # slices of the caller's k, v (or mask): copy, the state owns its data
        block_k, block_v = block_k.clone(), block_v.clone()
        if mask is not None:
            block_mask = block_mask.clone()
    new_state.block_k, new_state.block_v, new_state.block_mask = block_k, block_v, block_mask
    return out, new_state
