"""Strict causality, state chaining and token-by-token decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err

import lln
from lln.ops.reference import lln_attention_reference

CAUSAL_OPS = [lln.lln_attention, lln.lln_diag_attention]


@pytest.mark.parametrize("op", CAUSAL_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("stats", ["head", "sequence"])
@pytest.mark.parametrize("t", [0, 37, 64, 200])
def test_strictly_causal_under_huge_future_changes(op, stats, t):
    """Outputs at positions <= t ignore tokens after t, even when those are enormous."""
    q, k, v = make_qkv(2, 2, 256, 32, sigma=1.0, dtype=torch.float32)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t + 1 :] = 1e3
    k2[:, :, t + 1 :] *= 1e3
    v2[:, :, t + 1 :] = -1e6
    a = op(q, k, v, is_causal=True, stats=stats)
    b = op(q2, k2, v2, is_causal=True, stats=stats)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a[:, :, : t + 1], b[:, :, : t + 1], rtol=0, atol=1e-6)


def test_reference_code_is_not_causal():
    """The flaw this library fixes (SPEC section 3): the reference leaks the future."""
    q, k, v = make_qkv(1, 1, 256, 32, sigma=1.0, dtype=torch.float32)
    k2 = k.clone()
    k2[:, :, 200:] *= 50
    a = lln_attention_reference(q, k, v, is_causal=True)
    b = lln_attention_reference(q, k2, v, is_causal=True)
    assert rel_err(b[:, :, :200], a[:, :, :200]) > 0.1


@pytest.mark.parametrize("op", CAUSAL_OPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "cuts", [[1], [63, 64, 65], [5, 6, 7, 100, 101], list(range(1, 20)) + [150]]
)
def test_chaining_any_split_equals_one_call(op, cuts):
    q, k, v = make_qkv(2, 3, 190, 16, 12, sigma=2.0)
    mask = padding_mask(2, 190)
    full = op(q, k, v, is_causal=True, key_padding_mask=mask, chunk_size=16)
    state, outs = None, []
    for s, e in zip([0, *cuts], [*cuts, 190], strict=True):
        out, state = op(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
            key_padding_mask=mask[:, s:e], chunk_size=16, initial_state=state,
            output_final_state=True,
        )
        outs.append(out)
    assert state.position == 190
    assert rel_err(torch.cat(outs, 2), full) <= 1e-12


@pytest.mark.parametrize("op", CAUSAL_OPS, ids=lambda f: f.__name__)
def test_decode_4096_tokens_equals_parallel(op):
    """Acceptance: one token at a time over 4096 tokens, float32, max abs error <= 1e-5."""
    q, k, v = make_qkv(1, 2, 4096, 32, sigma=1.0, dtype=torch.float32, seed=5)
    full = op(q, k, v, is_causal=True)
    state, outs = None, []
    for t in range(4096):
        out, state = op(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], is_causal=True,
            initial_state=state, output_final_state=True,
        )
        outs.append(out)
    assert (torch.cat(outs, 2) - full).abs().max().item() <= 1e-5


def test_state_size_does_not_grow_with_context():
    q, k, v = make_qkv(1, 2, 300, 8, 6)
    _, s1 = lln.lln_diag_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], is_causal=True,
                                   output_final_state=True)
    _, s2 = lln.lln_diag_attention(q, k, v, is_causal=True, output_final_state=True)
    for state in (s1, s2):
        assert state.kv.shape == (1, 2, 8, 6) and state.k_sum.shape == (1, 2, 8)
        assert state.block_k.shape[2] < 8  # only the unfinished diagonal block is kept
    assert s2.block_k.shape[2] == 300 % 8


def test_fixed_scales_chain_and_state_records_them():
    q, k, v = make_qkv(1, 2, 50, 8)
    full = lln.lln_attention(q, k, v, is_causal=True, alpha=1.5, beta=0.7)
    a, state = lln.lln_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], is_causal=True,
                                 alpha=1.5, beta=0.7, output_final_state=True)
    assert state.stats is None and state.moments is None
    b = lln.lln_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], is_causal=True,
                          alpha=1.5, beta=0.7, initial_state=state)
    assert rel_err(torch.cat([a, b], 2), full) <= 1e-12


def test_state_detach_and_to():
    q, k, v = make_qkv(1, 1, 20, 4)
    k.requires_grad_(True)  # the state is a function of the keys and values
    _, state = lln.lln_diag_attention(q, k, v, is_causal=True, output_final_state=True)
    assert state.kv.requires_grad
    detached = state.detach()
    assert not detached.kv.requires_grad and not detached.k_max.requires_grad
    moved = state.to("cpu")
    assert moved.position == state.position and moved.moments is not None
