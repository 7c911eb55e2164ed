"""Nystromformer (Xiong et al., AAAI 2021): softmax attention through landmarks, non-causal.

With ``m`` landmark queries ``Q~`` and keys ``K~`` (means of consecutive segments of the
queries and of the keys) and ``s`` the logit scale, softmax attention is approximated by::

    P ≈ F pinv(A) B,   F = softmax(s Q K~^T),  A = softmax(s Q~ K~^T),  B = softmax(s Q~ K^T)

``(L x m) (m x m) (m x S)``: cost linear in N. Details chosen here:

* **Segments.** The ``n`` real tokens of a sequence are cut into ``min(m, n)`` consecutive
  segments whose sizes differ by at most one (token of rank r goes to segment
  ``floor(r * m / n)``): N need not be a multiple of m, no zero padding enters a mean, and
  with ``n <= m`` every token is its own landmark, so the approximation is exact softmax.
* **Padding.** Padded keys are left out of the key landmarks and of ``B``; a landmark with
  no token (fewer real tokens than m) gets an all-zero row / column in ``A``, which the
  pseudo-inverse maps to zero. So a padded batch equals per-sample unpadded runs. When
  ``L == S`` (self-attention) the key padding mask also removes padded positions from the
  query landmarks.
* **Pseudo-inverse.** ``pinv_iterations`` steps of the iterative method used by the paper
  (``Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4`` from ``Z0 = A^T / (|A|_1 |A|_inf)``,
  norms per batch element and head, unlike the authors' code which takes them over the
  whole batch); ``pinv_iterations=None`` uses the exact ``torch.linalg.pinv``, as the
  oracle :func:`nystrom_attention_matrix` does.
* Causal masking cannot be expressed through segment-mean landmarks (each landmark mixes
  past and future tokens), so ``is_causal=True`` raises ValueError. The paper's optional
  depthwise-convolution skip on ``v`` has learned weights and is left to the layer level.

Package decision: ``nystrom-attention`` (0.0.14) was inspected: it is a module with its own
projections (not a function of q, k, v), pads the sequence with zeros at the front (the
zeros enter the landmark means) and scales the pseudo-inverse start by a max over the whole
batch (so one sample's output depends on the others). Implemented here from the paper.
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


def _check_args(
    q: Tensor, k: Tensor, v: Tensor, is_causal: bool, key_padding_mask: Tensor | None,
    num_landmarks: int, pinv_iterations: int | None, scale: float | None,
) -> tuple[Tensor | None, int, int | None, float]:
    check_qkv(q, k, v, same_length=False)
    if check_is_causal(is_causal):
        raise ValueError(
            "nystrom attention does not support is_causal=True: its landmarks are means over "
            "whole segments, so every output mixes future tokens; use is_causal=False"
        )
    mask = check_key_padding_mask(key_padding_mask, k)
    num_landmarks = check_positive_int(num_landmarks, "num_landmarks")
    if pinv_iterations is not None:
        pinv_iterations = check_positive_int(pinv_iterations, "pinv_iterations")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else check_positive_float(scale, "scale")
    return mask, num_landmarks, pinv_iterations, scale


def segment_means(
    x: Tensor, real: Tensor | None, num_landmarks: int
) -> tuple[Tensor, Tensor]:
    """Landmarks of ``x (B, H, N, D)``: means of consecutive segments of its real tokens.

    Args:
        x: the queries or keys.
        real: ``(B, N)`` bool (True = real token) or None (all real).
        num_landmarks: m.

    Returns:
        ``(landmarks (B, H, m, D), present (B, 1, m) bool)``; a sequence with ``n < m`` real
        tokens has ``n`` landmarks followed by ``m - n`` all-zero absent ones.
    """
    b, _, n, _ = x.shape
    if real is None:
        real = torch.ones(b, n, dtype=torch.bool, device=x.device)
    rank = real.long().cumsum(1) - 1  # rank among the real tokens
    count = real.sum(1, keepdim=True)  # (B, 1)
    used = count.clamp(max=num_landmarks)
    segment = rank * used // count.clamp(min=1)  # (B, N), in [0, used)
    slots = torch.arange(num_landmarks, device=x.device)
    member = (segment[:, None, :] == slots[None, :, None]) & real[:, None, :]  # (B, m, N)
    sizes = member.sum(-1, keepdim=True)  # (B, m, 1)
    average = member.to(x.dtype) / sizes.clamp(min=1).to(x.dtype)
    return average.unsqueeze(1) @ x, (sizes.squeeze(-1) > 0).unsqueeze(1)


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of ``a (..., m, n)`` by the iterative method of the paper.

    Converges (cubically, once close) when ``a`` is well conditioned; an all-zero matrix
    gives zeros.
    """
    absolute = a.abs()
    norm = absolute.sum(-1).amax(-1) * absolute.sum(-2).amax(-1)  # |A|_inf |A|_1
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    z = a.transpose(-1, -2) / norm[..., None, None]
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _factors(
    q: Tensor, k: Tensor, mask: Tensor | None, num_landmarks: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``F (B,H,L,m)``, ``A (B,H,m,m)``, ``B (B,H,m,S)`` in the compute dtype."""
    cdt = compute_dtype(q.dtype)
    q, k = q.to(cdt), k.to(cdt)
    q_real = mask if mask is not None and q.shape[2] == k.shape[2] else None
    q_land, q_present = segment_means(q, q_real, num_landmarks)
    k_land, k_present = segment_means(k, mask, num_landmarks)
    if mask is None:
        key_visible = torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool, device=k.device)
    else:
        key_visible = mask[:, None, None, :]  # (B, 1, 1, S)
    f = masked_softmax((q @ k_land.transpose(-1, -2)) * scale, k_present.unsqueeze(-2))
    a = masked_softmax(
        (q_land @ k_land.transpose(-1, -2)) * scale,
        q_present.unsqueeze(-1) & k_present.unsqueeze(-2),
    )
    b = masked_softmax(
        (q_land @ k.transpose(-1, -2)) * scale,
        q_present.unsqueeze(-1) & key_visible,
    )
    return f, a, b


def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    num_landmarks: int = 64,
    pinv_iterations: int | None = 6,
    scale: float | None = None,
) -> Tensor:
    """Nystromformer attention, linear in N (non-causal only).

    Args:
        q: ``(B, H, L, D)``; k: ``(B, H, S, D)``; v: ``(B, H, S, Dv)``.
        is_causal: must be False (ValueError otherwise).
        key_padding_mask: ``(B, S)`` bool, True = real token (see the module docstring).
        num_landmarks: m, landmarks per sequence (fewer when a sequence has fewer tokens).
        pinv_iterations: steps of the iterative pseudo-inverse (paper: 6); None = exact
            ``torch.linalg.pinv``.
        scale: logit scale (default ``1 / sqrt(D)``).

    Returns:
        ``(B, H, L, Dv)`` in the dtype of ``v`` (computed in float32, float64 for float64);
        with ``pinv_iterations=None`` it equals ``nystrom_attention_matrix(q, k) @ v``.
    """
    mask, num_landmarks, pinv_iterations, scale = _check_args(
        q, k, v, is_causal, key_padding_mask, num_landmarks, pinv_iterations, scale
    )
    f, a, b = _factors(q, k, mask, num_landmarks, scale)
    a_inv = torch.linalg.pinv(a) if pinv_iterations is None else iterative_pinv(
        a, pinv_iterations
    )
    out = f @ (a_inv @ (b @ v.to(f.dtype)))
    return out.to(v.dtype)


def nystrom_attention_matrix(
    q: Tensor,
    k: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    num_landmarks: int = 64,
    pinv_iterations: int | None = 6,
    scale: float | None = None,
) -> Tensor:
    """The explicit ``(B, H, L, S)`` Nystrom matrix ``F pinv(A) B`` (compute dtype).

    Defaults as in :func:`nystrom_attention` (so ``matrix @ v`` is the op's output);
    ``pinv_iterations=None`` gives the exact-pseudo-inverse oracle. Not row-stochastic in
    general (rows sum to about 1, entries may be negative).
    """
    mask, num_landmarks, pinv_iterations, scale = _check_args(
        q, k, k, is_causal, key_padding_mask, num_landmarks, pinv_iterations, scale
    )
    f, a, b = _factors(q, k, mask, num_landmarks, scale)
    a_inv = torch.linalg.pinv(a) if pinv_iterations is None else iterative_pinv(
        a, pinv_iterations
    )
    return f @ a_inv @ b
