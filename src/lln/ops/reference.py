"""The authors' LLN formula, reproduced for parity tests and as a baseline peer.

SPEC section 3, "reference behaviour": one sigma_q, sigma_k over the whole ``(B, H, N, D)``
tensor (unbiased ``torch.std``, no gradient), features stabilised by subtracting the
per-row max of ``alpha q`` and the per-(batch, head) max of ``beta k``, ``eps`` added to the
denominator, computed in float32. Its known flaws are kept on purpose: in causal mode the
statistics and the key max look at future tokens, and at large sigma ``eps`` swamps the
denominator. Use :func:`lln.lln_attention` for real work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_qkv
from .moment_matching import scales_from_variances


def lln_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False, eps: float = 1e-5
) -> Tensor:
    """The reference-code LLN attention ``(B, H, N, Dv)`` (float32 output).

    Causal mode materialises the N x N matrix (as a reference, not for speed).
    """
    check_qkv(q, k, v, same_length=is_causal)
    q, k, v = q.float(), k.float(), v.float()
    with torch.no_grad():
        alpha, beta = scales_from_variances(q.var(), k.var())
    q_feat = alpha * q
    q_feat = torch.exp(q_feat - q_feat.amax(-1, keepdim=True))
    k_feat = beta * k
    k_feat = torch.exp(k_feat - k_feat.amax((-2, -1), keepdim=True))
    if is_causal:
        weights = (q_feat @ k_feat.transpose(-1, -2)).tril()
        return (weights @ v) / (weights.sum(-1, keepdim=True) + eps)
    num = q_feat @ (k_feat.transpose(-1, -2) @ v)
    den = q_feat @ k_feat.sum(-2).unsqueeze(-1)
    return num / (den + eps)
