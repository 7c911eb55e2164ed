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

from ._validation import check_param, compute_dtype
from .moment_matching import (
    PrefixMoments,
    resolve_constants,
    scales_from_variances,
    variance_from_sums,
)
from .state import LLNState

#: Longest query block (tokens) that takes the step path when a state is given.
STEP_MAX_TOKENS = 16
NEG_INF = float("-inf")


def takes_step_path(n: int, is_causal: bool, initial_state: LLNState | None) -> bool:
    """Whether a call with ``n`` queries runs the recurrent step path (static: no data)."""
    return is_causal and initial_state is not None and n <= STEP_MAX_TOKENS


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, without the call when it has that dtype (a step is made of tiny ops:
    every dispatch counts)."""
    return x if x.dtype == dtype else x.to(dtype)


def _floor(x: Tensor) -> Tensor:
    """``x`` with -inf (no key seen yet) replaced by the lowest finite value, so that
    ``y - x`` stays defined: ``exp(-inf - lowest) = 0`` where nothing was seen."""
    return x.clamp_min(torch.finfo(x.dtype).min)


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
    same variance rule :func:`variance_from_sums`, same :func:`scales_from_variances`) with
    q and k stacked into one pass and per-token sums in float64. Returns ``(alpha, beta)`` of shape
    ``(B, G, L, 1)`` in the compute dtype and the moments after the block, without
    gradient (as the chunked path)."""
    b, h, n, d = q.shape
    fit_a, fit_b = resolve_constants(constants, d)
    x = torch.stack((q, k))
    if x.requires_grad:
        x = x.detach()
    x = x.double()  # (2, B, H, L, D)
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
    # sums after each token: (4, B, G, L) = q, k, q^2, k^2; count (B, G, L)
    prev = torch.stack((moments.q_sum, moments.k_sum, moments.q_sq_sum, moments.k_sq_sum))
    sums = prev.unsqueeze(-1) + torch.cat((s1, s2))  # (4, B, G, L): q, k, q^2, k^2
    cn = moments.count.unsqueeze(-1) + cnt  # (B, G, L)
    c1, c2 = sums[:2], sums[2:]
    var_q, var_k = variance_from_sums(cn, c1, c2).unbind(0)  # the ops' rule (MIN_COUNT, ...)
    cdt = compute_dtype(q.dtype)
    alpha, beta = scales_from_variances(var_q, var_k, temperature=temperature, a=fit_a, b=fit_b)
    alpha, beta = alpha.to(cdt).unsqueeze(-1), beta.to(cdt).unsqueeze(-1)
    q_sum, k_sum, q_sq, k_sq = sums[..., -1].unbind(0)
    return alpha, beta, PrefixMoments(cn[..., -1], q_sum, q_sq, k_sum, k_sq)


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
    else:  # floats stay Python numbers (no tensor to make per step)
        shape = (b, h, 1, 1)
        alpha_t = check_param(alpha, "alpha", shape, dtype=cdt, device=q.device, positive=True)
        beta_t = check_param(beta, "beta", shape, dtype=cdt, device=q.device, positive=True)
        moments = None
    qs = _as(q, cdt) * alpha_t
    ks = _as(k, cdt) * beta_t
    vc = _as(v, cdt)
    if mask is not None:  # padded keys: exact zeros everywhere (exp(-inf))
        ks = ks.masked_fill(~mask[:, None, :, None], NEG_INF)
    k_max = state.k_max
    # offsets (from detached values): any value gives the same output, so no gradient
    ks_d = ks.detach() if ks.requires_grad else ks
    run = ks_d if n == 1 else ks_d.cummax(2).values
    m = torch.maximum(run, k_max.unsqueeze(2))  # (B, H, L, D), -inf: no key yet
    new_max = m[:, :, -1]
    ref = _floor(new_max)
    decay = torch.exp(k_max - ref).unsqueeze(-1)  # 0 where the state had no key
    inject = torch.exp(ks - ref.unsqueeze(2))  # (B, H, L, D), <= 1
    if n == 1:
        # fold the key in, then read the updated state: its offsets are exactly m
        inject = inject.transpose(-1, -2)  # (B, H, D, 1)
        kv = torch.addcmul(state.kv * decay, inject, vc)
        k_sum = torch.addcmul(inject, state.k_sum.unsqueeze(-1), decay)  # (B, H, D, 1)
        # (ref: m floored, so mu is finite; with no key at all num = den = 0 anyway)
        q_plus = qs + ref.unsqueeze(2)
        mu = (q_plus.detach() if q_plus.requires_grad else q_plus).amax(-1, keepdim=True)
        q_feat = torch.exp(q_plus - mu)  # (B, H, 1, D)
        num = q_feat @ kv
        den = q_feat @ k_sum  # (B, H, 1, 1)
        k_sum = k_sum.squeeze(-1)
    else:
        mu = _floor((qs.detach() + m).amax(-1, keepdim=True))  # (B, H, L, 1)
        state_offset = k_max.unsqueeze(2) - mu
        q_state = torch.exp(qs + state_offset)  # (B, H, L, D), 0 where no past key
        num = q_state @ state.kv
        den = q_state @ state.k_sum.unsqueeze(-1)  # (B, H, L, 1)
        # the block itself, exactly: exp(qs_id + ks_jd - mu_i) summed over d, j <= i
        logits = qs.unsqueeze(3) + ks.unsqueeze(2) - mu.unsqueeze(-1)  # (B, H, L, L, D)
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        weights = logits.masked_fill(future[:, :, None], NEG_INF).exp().sum(-1)
        num = num + weights @ vc
        den = den + weights.sum(-1, keepdim=True)
        kv = torch.addcmul(inject.transpose(-1, -2) @ vc, state.kv, decay)
        k_sum = torch.addcmul(inject.sum(2), state.k_sum, decay.squeeze(-1))
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
    lln_weight: float | Tensor,
    diag_weight: float | Tensor,
    **lln_options,
) -> tuple[Tensor, LLNState]:
    """Causal LLN+Diag of a short block continuing ``state`` (validated inputs, except the
    mixing weights). Returns ``(out in the compute dtype, new state)``."""
    b, h, n, _ = q.shape
    cdt = state.kv.dtype
    shape = (b, h, 1, v.shape[-1])
    lln_w = check_param(lln_weight, "lln_weight", shape, dtype=cdt, device=q.device,
                        positive=False)
    diag_w = check_param(diag_weight, "diag_weight", shape, dtype=cdt, device=q.device,
                         positive=False)
    lln_out, new_state = lln_step(q, k, v, mask, state, block_size=block_size, **lln_options)
    carried = state.position % block_size
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    if carried:
        keys = torch.cat([_as(state.block_k, k.dtype), k], 2)
        values = torch.cat([_as(state.block_v, v.dtype), v], 2)
        real = torch.cat([state.block_mask, real], 1)
    else:
        keys, values = k, v
    total = carried + n
    # query i (local index carried + i) sees the real keys j <= carried + i of its block
    visible = real[:, None, None, :]  # (B, 1, 1, total)
    if n > 1:
        rows = torch.arange(carried, total, device=q.device)[:, None]
        cols = torch.arange(total, device=q.device)[None, :]
        visible = visible & (cols <= rows) & (cols // block_size == rows // block_size)
    logits = (_as(q, cdt) @ _as(keys, cdt).transpose(-1, -2)) * scale  # (B, H, L, total)
    # softmax over the visible keys; a row that sees none (padding) is 0, not NaN
    probs = torch.softmax(logits.masked_fill(~visible, NEG_INF), -1)
    probs = torch.where(visible, probs, 0.0)
    diag_out = probs @ _as(values, cdt)
    if isinstance(diag_w, Tensor):
        out = torch.addcmul(lln_out * lln_w, diag_w, diag_out)
    else:  # a Python float: no tensor made for it
        out = torch.add(lln_out * lln_w, diag_out, alpha=diag_w)
    start = total // block_size * block_size  # first token of the unfinished block
    block_k, block_v, block_mask = keys[:, :, start:], values[:, :, start:], real[:, start:]
    if not carried:  # slices of the caller's k, v (or mask): copy, the state owns its data
        block_k, block_v = block_k.clone(), block_v.clone()
        if mask is not None:
            block_mask = block_mask.clone()
    new_state.block_k, new_state.block_v, new_state.block_mask = block_k, block_v, block_mask
    return out, new_state
