"""Quadratic oracles: the explicit N x N attention matrices of LLN, block-diagonal softmax
and LLN+Diag, with the same masks as the fast ops.

The moment-matched scales are computed here independently of the fast path
(:func:`oracle_scales`: ``torch.var`` over the real entries of ``[:t+1]`` for every token,
and the moment-matching formula written out), so that a bug in
:mod:`lln.ops.moment_matching` shows up as a difference between the two.

They cost O(N^2 D) time and O(N^2) memory: use them to test, to analyse attention (entropy,
spectral gap, log-normality), never to train. Run them in float64 for an oracle.

The LLN matrix is written in log space, independently of the fast path's offsets::

    logit_ij = log sum_d exp(alpha_i q_id + beta_j k_jd) = log(exp(alpha_i q_i) . exp(beta_j k_j))
    P_ij     = softmax_j(logit_ij) over the visible keys
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import check_key_padding_mask, check_positive_int, check_qkv, compute_dtype
from .block_diag import masked_softmax
from .lln import check_lln_args, feature_scales
from .moment_matching import resolve_constants

#: Query rows per step of the log-space oracle (bounds its memory to rows * S * D numbers).
_ORACLE_ELEMENTS = 1 << 24


def visible_keys(
    n_q: int, n_k: int, *, is_causal: bool, key_padding_mask: Tensor | None, device
) -> Tensor:
    """Bool ``(B|1, 1, L, S)``: which key each query may attend to."""
    visible = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=device)
    if is_causal:
        visible = visible.tril()
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


def _oracle_sigma2(
    x: Tensor, mask: Tensor | None, *, stats: str, is_causal: bool
) -> Tensor:
    """sigma^2 per statistics group (and per token if causal), shape ``(B|1, H|1, N|1, 1)``.

    Written out plainly in float64 over the real entries ``e`` of ``[:t+1]`` (``[:N]`` when
    not causal), with ``n`` of them: the unbiased variance ``sum (e - mean)^2 / (n - 1)``;
    for ``n < 16`` the mean square ``sum e^2 / n``; 1 for ``n = 0``. The sums are cumulative
    sums of ``e - c`` and ``(e - c)^2`` with ``c`` the mean of all real entries of the
    group (so no offset cancels; the oracle may look ahead, it is not an op). No gradient:
    the scales are normalisation constants, as in the ops.
    """
    x = x.detach().double()
    b, h, n, d = x.shape
    real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    if stats == "head":
        groups = x  # (B, H, N, D): token t of head g
    else:
        groups = x.transpose(1, 2).reshape(b, 1, n, h * d)  # token t, all heads
    w = real[:, None, :, None].to(torch.float64)
    if stats == "tensor":
        groups = groups.transpose(0, 2).reshape(1, 1, b * n, h * d)  # every sequence
        w = w.transpose(0, 2).reshape(1, 1, b * n, 1)
    per_token = groups.shape[-1] * w[..., 0]
    c = (groups * w).sum((2, 3), keepdim=True) / (per_token.sum(-1)[..., None, None]).clamp_min(1)
    y = (groups - c) * w
    s1, s2, count = y.sum(-1), y.square().sum(-1), per_token
    if is_causal:
        s1, s2, count = s1.cumsum(-1), s2.cumsum(-1), count.cumsum(-1)
    else:
        s1, s2, count = s1.sum(-1, True), s2.sum(-1, True), count.sum(-1, True)
    c = c[..., 0]
    variance = (s2 - s1 * s1 / count) / (count - 1)
    mean_square = (s2 + 2 * c * s1) / count + c * c
    sigma2 = torch.where(count >= 16, variance, mean_square)
    sigma2 = torch.where(count > 0, sigma2, torch.ones_like(sigma2))
    return sigma2[..., None]


def oracle_scales(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    stats: str = "head",
    temperature: float = 1.0,
    constants: str = "paper",
) -> tuple[Tensor, Tensor]:
    """Moment-matched ``(alpha, beta)`` computed plainly, for testing the fast path.

    For every statistics group (and every token ``t`` when causal), the variance in float64
    of the real entries of ``[:t+1]`` (the whole sequence when not causal; see
    ``_oracle_sigma2``); then::

        sigma_tilde = sqrt(max(var_q var_k - b, 1e-12) / (2 a)) / temperature
        alpha = sigma_tilde / sqrt(max(var_q, 1e-12)),  beta = sigma_tilde / sqrt(max(var_k, 1e-12))

    Shares no code with :mod:`lln.ops.moment_matching` but the constants. float64 results.
    """
    a, b = resolve_constants(constants, q.shape[-1])
    q_mask = key_padding_mask if q.shape[2] == k.shape[2] else None
    var_q = _oracle_sigma2(q, q_mask, stats=stats, is_causal=is_causal)
    var_k = _oracle_sigma2(k, key_padding_mask, stats=stats, is_causal=is_causal)
    var_q, var_k = var_q.clamp_min(1e-12), var_k.clamp_min(1e-12)
    sigma_tilde = torch.sqrt((var_q * var_k - b).clamp_min(1e-12) / (2 * a)) / temperature
    return sigma_tilde / var_q.sqrt(), sigma_tilde / var_k.sqrt()


def lln_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    alpha: float | Tensor | None = None,
    beta: float | Tensor | None = None,
    stats: str = "head",
    temperature: float = 1.0,
    constants: str = "paper",
) -> Tensor:
    """The row-stochastic LLN attention matrix ``(B, H, L, S)`` (compute dtype).

    Arguments as in :func:`lln.lln_attention`; ``v @`` this matrix is its exact output.
    Moment-matched scales come from :func:`oracle_scales` (independent of the fast path).
    """
    mask = check_lln_args(
        q, k, k, is_causal=is_causal, key_padding_mask=key_padding_mask, alpha=alpha,
        beta=beta, stats=stats, temperature=temperature, eps=0.0, chunk_size=1,
        initial_state=None, output_final_state=False, block_size=None, constants=constants,
    )
    cdt = compute_dtype(q.dtype)
    if alpha is None:
        alpha_t, beta_t = oracle_scales(
            q, k, is_causal=is_causal, key_padding_mask=mask, stats=stats,
            temperature=temperature, constants=constants,
        )
        alpha_t, beta_t = alpha_t.to(cdt), beta_t.to(cdt)
    else:
        alpha_t, beta_t, _ = feature_scales(
            q, k, is_causal=is_causal, key_padding_mask=mask, alpha=alpha, beta=beta,
            stats=stats, temperature=temperature, constants=constants,
        )
    qs, ks = q.to(cdt) * alpha_t, k.to(cdt) * beta_t
    n_q, n_k, d = qs.shape[2], ks.shape[2], qs.shape[3]
    rows = max(1, _ORACLE_ELEMENTS // (n_k * d * qs.shape[0] * qs.shape[1]))
    logits = torch.cat(
        [
            torch.logsumexp(q_rows.unsqueeze(-2) + ks.unsqueeze(-3), dim=-1)
            for q_rows in qs.split(rows, dim=2)
        ],
        dim=2,
    )
    visible = visible_keys(n_q, n_k, is_causal=is_causal, key_padding_mask=mask, device=q.device)
    return masked_softmax(logits, visible)


def block_diag_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int | None = None,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    position: int = 0,
) -> Tensor:
    """Softmax attention restricted to diagonal blocks, as an explicit ``(B, H, N, N)`` matrix.

    Token ``t`` belongs to block ``(position + t) // block_size``: ``position`` is the index
    of the first token in the whole sequence (blocks are aligned to the sequence start).
    """
    check_qkv(q, k, k, same_length=True)
    mask = check_key_padding_mask(key_padding_mask, k)
    n, d = q.shape[2], q.shape[3]
    block_size = d if block_size is None else check_positive_int(block_size, "block_size")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cdt = compute_dtype(q.dtype)
    logits = (q.to(cdt) @ k.to(cdt).transpose(-1, -2)) * scale
    block = (torch.arange(n, device=q.device) + position) // block_size
    visible = visible_keys(n, n, is_causal=is_causal, key_padding_mask=mask, device=q.device)
    visible = visible & (block[:, None] == block[None, :])
    return masked_softmax(logits, visible)


def lln_diag_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    alpha: float | Tensor | None = None,
    beta: float | Tensor | None = None,
    stats: str = "head",
    temperature: float = 1.0,
    constants: str = "paper",
    block_size: int | None = None,
    scale: float | None = None,
    lln_weight: float = 0.5,
    diag_weight: float = 0.5,
) -> Tensor:
    """``lln_weight * P_lln + diag_weight * P_diag`` (scalar weights), ``(B, H, N, N)``.

    With the default weights (0.5, 0.5) every row that sees a real key in both parts sums
    to 1; a row whose diagonal block holds no real key keeps only its LLN half (0.5).
    """
    p_lln = lln_attention_matrix(
        q, k, is_causal=is_causal, key_padding_mask=key_padding_mask, alpha=alpha, beta=beta,
        stats=stats, temperature=temperature, constants=constants,
    )
    p_diag = block_diag_attention_matrix(
        q, k, block_size=block_size, is_causal=is_causal, key_padding_mask=key_padding_mask,
        scale=scale,
    )
    return lln_weight * p_lln + diag_weight * p_diag
