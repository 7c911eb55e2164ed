"""Performer FAVOR+ (Choromanski et al., ICLR 2021): positive orthogonal random features.

For ``w ~ N(0, I_D)``, ``E[exp(w.x - |x|^2/2) exp(w.y - |y|^2/2)] = exp(x.y)``. With
``x = sqrt(scale) q``, ``y = sqrt(scale) k`` (``scale = 1/sqrt(D)`` as in softmax) and ``M``
draws ``w_1..w_M`` (the rows of a ``projection (M, D)``), the features::

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(M)                    (M positive numbers)

give an unbiased estimate ``phi(q_i) . phi(k_j)`` of the softmax kernel
``exp(scale q_i . k_j)``, and attention ``P_ij ∝ phi(q_i) . phi(k_j)`` runs in linear time
(see "Stabilisation"). The rows of W are drawn in orthogonal blocks
of D (QR of a Gaussian matrix), each row rescaled to the norm of an independent Gaussian
vector, so every row is still marginally ``N(0, I_D)`` (unbiased) with lower variance.

Stabilisation, exact and without look-ahead: ``phi(q_i).phi(k_j) = sum_m exp(a_im + b_jm)
/ M`` with the feature logits ``a = W q' - |q'|^2/2``, ``b = W k' - |k'|^2/2``, which is the
LLN kernel with ``alpha = beta = 1`` on ``(a, b)``: it runs through
:func:`lln.lln_attention`, whose per-feature key offsets (a running max when causal) and
per-row query offsets keep every exponent <= 0 and never look ahead. (Per-key offsets
alone, as before, zeroed rows in float32 from sigma ~ 20: a row's best feature need not be
its keys' best.) Where float32 still cannot hold a row (feature logits more than ~80 apart
inside one causal chunk, sigma >~ 30 at D = 16) the LLN kernel warns and sets the row to 0;
use float64 there. No eps is added to the features (the authors' code adds 1e-4, a bias).

**Redraw.** ``projection=None`` draws a fresh projection on every call (from ``generator``,
or from ``seed``, or from the global torch RNG): that is FAVOR+ with redraw at every step.
Pass a fixed ``projection`` (see :func:`draw_orthogonal_projection`) or a ``seed`` for a
deterministic op, e.g. to compare with :func:`performer_attention_matrix`.

Package decision: ``performer-pytorch`` (1.1.4) was inspected: its key stabiliser is the
max over all tokens, which looks ahead in causal mode, it adds eps to the features, and it
pulls in extra dependencies (einops, local-attention, axial-positional-embedding) for a
module API rather than a function. Implemented here from the paper instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import (
    check_is_causal,
    check_key_padding_mask,
    check_positive_float,
    check_positive_int,
    check_qkv,
    compute_dtype,
)
from .block_diag import masked_softmax
from .lln import lln_attention
from .naive import visible_keys

#: Query rows per step of the log-space oracle (bounds its memory to rows * S * M numbers).
_ORACLE_ELEMENTS = 1 << 24


def default_num_features(dim: int) -> int:
    """``max(D, round(D ln D))`` random features (266 for D = 64), the usual Performer choice."""
    return max(dim, round(dim * math.log(dim))) if dim > 1 else 1


def draw_orthogonal_projection(
    num_features: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random feature directions ``(num_features, dim)`` whose rows are marginally N(0, I).

    With ``orthogonal=True`` the rows come in blocks of ``dim`` mutually orthogonal vectors
    (Haar-random rotations from the QR of Gaussian matrices) scaled to the norms of
    independent Gaussian vectors; ``orthogonal=False`` gives i.i.d. Gaussian rows. Drawn in
    float64 on the CPU (so one generator state gives the same projection on every device and
    dtype), then cast.
    """
    num_features = check_positive_int(num_features, "num_features")
    dim = check_positive_int(dim, "dim")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    gauss = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
    if orthogonal:
        n_blocks = -(-num_features // dim)
        blocks = torch.randn(n_blocks, dim, dim, generator=generator, dtype=torch.float64)
        qmat, rmat = torch.linalg.qr(blocks)
        qmat = qmat * torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar
        directions = qmat.transpose(-1, -2).reshape(n_blocks * dim, dim)[:num_features]
        gauss = directions * gauss.norm(dim=-1, keepdim=True)
    return gauss.to(dtype=dtype, device=device)


def _projection(
    projection: Tensor | None,
    num_features: int | None,
    generator: torch.Generator | None,
    seed: int | None,
    q: Tensor,
) -> Tensor:
    """The ``(M, D)`` or ``(H, M, D)`` projection in the compute dtype, drawn if None."""
    h, d = q.shape[1], q.shape[3]
    cdt = compute_dtype(q.dtype)
    if projection is not None:
        if num_features is not None or generator is not None or seed is not None:
            raise ValueError("give either projection or num_features/generator/seed, not both")
        if not isinstance(projection, Tensor) or not projection.is_floating_point():
            raise TypeError(
                "projection must be a floating torch.Tensor of shape (M, D) or (H, M, D)"
            )
        if projection.dim() not in (2, 3) or projection.shape[-1] != d or (
            projection.dim() == 3 and projection.shape[0] != h
        ):
            raise ValueError(
                f"projection must have shape (M, {d}) or ({h}, M, {d}), "
                f"got {tuple(projection.shape)}"
            )
        if projection.device != q.device:
            raise ValueError(f"projection must be on {q.device}, got {projection.device}")
        return projection.to(cdt)
    m = default_num_features(d) if num_features is None else check_positive_int(
        num_features, "num_features"
    )
    if seed is not None:
        if generator is not None:
            raise ValueError("give either generator or seed, not both")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        generator = torch.Generator().manual_seed(seed)
    return draw_orthogonal_projection(m, d, generator=generator, dtype=cdt, device=q.device)


def _feature_logits(x: Tensor, projection: Tensor, scale: float) -> Tensor:
    """``log(phi(x)) + log(sqrt(M))`` = ``W x' - |x'|^2 / 2`` with ``x' = sqrt(scale) x``:
    ``(B, H, N, D)`` -> ``(B, H, N, M)``."""
    x = x * math.sqrt(scale)
    return x @ projection.transpose(-1, -2) - 0.5 * (x * x).sum(-1, keepdim=True)


def performer_features(x: Tensor, projection: Tensor, *, scale: float | None = None) -> Tensor:
    """The FAVOR+ features ``phi(x) (B, H, N, M)`` of ``x (B, H, N, D)``, unstabilised.

    ``performer_features(q, W) @ performer_features(k, W).mT`` is an unbiased estimate of
    ``exp(scale * q @ k.mT)`` over random ``W`` (``scale`` default ``1/sqrt(D)``).
    """
    scale = 1.0 / math.sqrt(x.shape[-1]) if scale is None else check_positive_float(scale, "scale")
    m = projection.shape[-2]
    return torch.exp(_feature_logits(x, projection.to(x.dtype), scale)) / math.sqrt(m)


def _check_scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else check_positive_float(scale, "scale")


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    num_features: int | None = None,
    projection: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    scale: float | None = None,
    eps: float = 0.0,
    chunk_size: int = 64,
) -> Tensor:
    """Performer FAVOR+ attention, an unbiased random-feature estimate of softmax, linear in N.

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)`` (``S == L`` when causal); v: ``(B, H, S, Dv)``.
        is_causal: query i sees keys j <= i only (strictly: stabilisers never look ahead).
        key_padding_mask: ``(B, S)`` bool, True = real token.
        num_features: M, random features when the projection is drawn (default
            :func:`default_num_features`: 266 for D = 64).
        projection: a fixed ``(M, D)`` (shared by heads) or ``(H, M, D)`` projection;
            None draws a fresh one (from ``generator`` / ``seed`` / the global RNG).
        generator, seed: where a drawn projection comes from (at most one of them).
        scale: the softmax logit scale being approximated (default ``1 / sqrt(D)``).
        eps: added to the denominator (default 0 = exact).
        chunk_size: tokens per chunk of the causal path.

    Returns:
        ``(B, H, L, Dv)`` in the dtype of ``v``; with the same projection it equals
        ``performer_attention_matrix(q, k, projection=...) @ v``.
    """
    check_qkv(q, k, v, same_length=is_causal)
    check_is_causal(is_causal)
    scale = _check_scale(scale, q.shape[-1])
    proj = _projection(projection, num_features, generator, seed, q)
    cdt = compute_dtype(q.dtype)
    q_logits = _feature_logits(q.to(cdt), proj, scale)
    k_logits = _feature_logits(k.to(cdt), proj, scale)
    # sum_m exp(a_im + b_jm) is the LLN kernel on the feature logits with alpha = beta = 1:
    # its per-feature key offsets (running max when causal) keep every row's denominator
    # >= 1 wherever the float range allows, instead of per-key offsets that zero a row when
    # its best feature is not its keys' best feature (sigma ~ 20-30 in float32)
    out = lln_attention(
        q_logits, k_logits, v.to(cdt), is_causal=is_causal, key_padding_mask=key_padding_mask,
        alpha=1.0, beta=1.0, eps=eps, chunk_size=chunk_size,
    )
    return out.to(v.dtype)


def performer_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    num_features: int | None = None,
    projection: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """The explicit ``(B, H, L, S)`` Performer matrix for one projection (compute dtype).

    Computed in log space, ``log(phi(q_i).phi(k_j)) = logsumexp_m(a_im + b_jm) - log M``,
    then normalised over the visible keys: independent of the fast path's offsets. Arguments
    as in :func:`performer_attention` (the same ``seed`` draws the same projection).
    """
    check_qkv(q, k, k, same_length=is_causal)
    check_is_causal(is_causal)
    mask = check_key_padding_mask(key_padding_mask, k)
    scale = _check_scale(scale, q.shape[-1])
    proj = _projection(projection, num_features, generator, seed, q)
    cdt = compute_dtype(q.dtype)
    a = _feature_logits(q.to(cdt), proj, scale)  # (B, H, L, M)
    b = _feature_logits(k.to(cdt), proj, scale)  # (B, H, S, M)
    rows = max(1, _ORACLE_ELEMENTS // (b.shape[2] * b.shape[3] * b.shape[0] * b.shape[1]))
    logits = torch.cat(
        [torch.logsumexp(part.unsqueeze(-2) + b.unsqueeze(-3), -1) for part in a.split(rows, 2)],
        2,
    )
    n_q, n_k = q.shape[2], k.shape[2]
    visible = visible_keys(n_q, n_k, is_causal=is_causal, key_padding_mask=mask, device=q.device)
    return masked_softmax(logits, visible)
