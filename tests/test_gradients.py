"""Gradients: torch.autograd.gradcheck in float64, and chunked form == oracle gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err
from torch.autograd import gradcheck

import lln


def _inputs(n: int = 13, d: int = 4, dv: int = 3):
    q, k, v = make_qkv(1, 2, n, d, dv, sigma=1.0, seed=7)
    return [t.requires_grad_(True) for t in (q, k, v)]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck_lln(is_causal, masked):
    q, k, v = _inputs()
    mask = padding_mask(1, 13) if masked else None
    alpha = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    beta = torch.full((1, 2, 1, 1), 0.8, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, alpha, beta):
        return lln.lln_attention(q, k, v, is_causal=is_causal, key_padding_mask=mask,
                                 alpha=alpha, beta=beta, chunk_size=4)

    assert gradcheck(f, (q, k, v, alpha, beta))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck_lln_diag(is_causal, masked):
    q, k, v = _inputs()
    mask = padding_mask(1, 13) if masked else None
    weight = torch.full((1, 2, 1, 3), 0.3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, weight):
        return lln.lln_diag_attention(q, k, v, is_causal=is_causal, key_padding_mask=mask,
                                      alpha=1.1, beta=0.9, chunk_size=4, block_size=5,
                                      lln_weight=weight, diag_weight=1 - weight)

    assert gradcheck(f, (q, k, v, weight))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradcheck_block_diag(is_causal):
    q, k, v = _inputs()
    mask = padding_mask(1, 13)

    def f(q, k, v):
        return lln.block_diag_attention(q, k, v, block_size=4, is_causal=is_causal,
                                        key_padding_mask=mask)

    assert gradcheck(f, (q, k, v))


def test_gradcheck_through_chained_state():
    """Gradients flow through the carried state into earlier pieces."""
    q, k, v = _inputs(n=11)

    def f(q, k, v):
        a, state = lln.lln_diag_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], is_causal=True,
                                          alpha=1.0, beta=1.0, block_size=4,
                                          output_final_state=True)
        b = lln.lln_diag_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], is_causal=True,
                                   alpha=1.0, beta=1.0, block_size=4, initial_state=state)
        return torch.cat([a, b], 2)

    assert gradcheck(f, (q, k, v))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("op", ["lln", "lln_diag"])
def test_chunked_gradients_equal_oracle_gradients(op, is_causal):
    """With moment matching (statistics carry no gradient in both), at sigma = 2."""
    q, k, v = make_qkv(2, 2, 150, 16, 8, sigma=2.0, seed=3)
    mask = padding_mask(2, 150)
    grad_out = torch.randn(2, 2, 150, 8, dtype=torch.float64)
    fast, matrix = {
        "lln": (lln.lln_attention, lln.lln_attention_matrix),
        "lln_diag": (lln.lln_diag_attention, lln.lln_diag_attention_matrix),
    }[op]
    grads = []
    for use_oracle in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if use_oracle:
            out = matrix(*leaves[:2], is_causal=is_causal, key_padding_mask=mask) @ leaves[2]
        else:
            out = fast(*leaves, is_causal=is_causal, key_padding_mask=mask, chunk_size=16)
        out.backward(grad_out)
        grads.append([t.grad for t in leaves])
    for fast_grad, oracle_grad in zip(*grads, strict=True):
        assert rel_err(fast_grad, oracle_grad) <= 1e-10
