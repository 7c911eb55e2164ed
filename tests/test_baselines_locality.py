"""Strict causality of the baselines' causal modes for non-finite inputs: a NaN or +-Inf in q
or k at token t leaves every earlier output exactly as without it (as causal SDPA does)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lln.ops.registry import attention_names, get_attention

CAUSAL = [n for n in attention_names() if get_attention(n).supports_causal
          and n not in ("lln_reference",)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", CAUSAL)
def test_non_finite_future_q_k_never_reach_earlier_rows(name, bad):
    spec = get_attention(name)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 8) for _ in range(3))
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 33:] = bad
    k2[:, :, 33:] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)  # (Performer draws its projection)
        a = spec.fn(q, k, v, is_causal=True)
        torch.manual_seed(1)
        b = spec.fn(q2, k2, v, is_causal=True)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:, :, :33], b[:, :, :33]), name
