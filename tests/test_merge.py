"""State merging (lln.ops.merge): the math that context parallelism is built on, alone.

Merging the state of the first half with the summary of the second half (computed from
``without_sums`` of the first) must give the state of one call over the whole sequence;
the sums agree to float64 rounding (1e-12 relative), the moments, position and block
exactly up to rounding of the float64 moment sums.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err

from lln.ops import lln_attention, lln_diag_attention, merge
from lln.ops.lln import feature_scales
from lln.ops.merge import add_moments, merge_states, merge_sums, segment_sums, without_sums
from lln.ops.moment_matching import PrefixMoments

TOL = 1e-12


def _assert_states_equal(a, b):
    for name in ("kv", "k_sum"):
        assert rel_err(getattr(a, name), getattr(b, name)) <= TOL, name
    torch.testing.assert_close(a.k_max, b.k_max, rtol=0, atol=1e-12)
    assert a.position == b.position and a.stats == b.stats and a.block_size == b.block_size
    if b.moments is None:
        assert a.moments is None
    else:
        for name in ("count", "q_sum", "q_sq_sum", "k_sum", "k_sq_sum"):
            torch.testing.assert_close(getattr(a.moments, name), getattr(b.moments, name))
    if b.block_k is not None:
        torch.testing.assert_close(a.block_k, b.block_k, rtol=0, atol=0)
        torch.testing.assert_close(a.block_v, b.block_v, rtol=0, atol=0)
        assert torch.equal(a.block_mask, b.block_mask)


@pytest.mark.parametrize("op", ["lln", "lln_diag"])
@pytest.mark.parametrize("fixed", [False, True], ids=["moments", "fixed"])
@pytest.mark.parametrize("split", [1, 37, 100])
def test_merge_of_chained_halves_equals_one_call(op, fixed, split):
    q, k, v = make_qkv(2, 3, 141, 8, 5, seed=split)
    mask = padding_mask(2, 141, seed=1)
    fn = lln_attention if op == "lln" else lln_diag_attention
    kw = dict(is_causal=True, key_padding_mask=None, output_final_state=True, chunk_size=16)
    if op == "lln_diag":
        kw["block_size"] = 12
    if fixed:
        kw.update(alpha=0.7, beta=torch.tensor([0.5, 0.9, 1.1]).view(1, 3, 1, 1).double())
    whole_out, whole = fn(q, k, v, **{**kw, "key_padding_mask": mask})
    first_out, first = fn(
        q[:, :, :split], k[:, :, :split], v[:, :, :split],
        **{**kw, "key_padding_mask": mask[:, :split]},
    )
    _, second = fn(
        q[:, :, split:], k[:, :, split:], v[:, :, split:],
        **{**kw, "key_padding_mask": mask[:, split:]}, initial_state=without_sums(first),
    )
    _assert_states_equal(merge_states(first, second), whole)
    # and the merged state continues the sequence like the whole call's state
    tail = make_qkv(2, 3, 5, 8, 5, seed=99)
    kw["output_final_state"] = False
    cont = fn(*tail, **kw, initial_state=merge_states(first, second))
    ref = fn(*tail, **kw, initial_state=whole)
    assert rel_err(cont, ref) <= TOL
    assert rel_err(first_out, whole_out[:, :, :split]) <= TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("masked", [False, True])
def test_segment_sums_equal_the_state_of_a_call(dtype, tol, masked):
    q, k, v = make_qkv(2, 2, 5000, 8, 6, sigma=2.0, dtype=dtype, seed=3)  # > one SUMS_STEP
    mask = padding_mask(2, 5000, seed=2) if masked else None
    _, state = lln_attention(
        q, k, v, is_causal=True, key_padding_mask=mask, output_final_state=True
    )
    _, beta, _ = feature_scales(
        q, k, is_causal=True, key_padding_mask=mask, alpha=None, beta=None, stats="head",
        temperature=1.0,
    )
    kv, k_sum, k_max = segment_sums(k, v, beta, mask)
    assert kv.dtype == state.kv.dtype
    assert rel_err(kv, state.kv) <= tol and rel_err(k_sum, state.k_sum) <= tol
    torch.testing.assert_close(k_max, state.k_max, rtol=tol, atol=tol)


@pytest.mark.parametrize("per_token", [True, False])
def test_segment_sums_gradients_equal_autograd_of_the_formula(per_token, monkeypatch):
    monkeypatch.setattr(merge, "SUMS_STEP", 16)  # several steps
    q, k, v = make_qkv(2, 3, 53, 4, 5, seed=7)
    mask = padding_mask(2, 53, seed=3)
    shape = (2, 3, 53, 1) if per_token else (1, 3, 1, 1)
    beta = (torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    g_kv = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    g_ks = torch.randn(2, 3, 4, dtype=torch.float64)
    kv, k_sum, k_max = segment_sums(k, v, beta, mask)
    grads = torch.autograd.grad((kv, k_sum), (k, v, beta), (g_kv, g_ks))
    # the formula with plain autograd, offset = the same k_max
    feat = torch.exp(k * beta - k_max.unsqueeze(-2)) * mask[:, None, :, None]
    ref_kv, ref_ks = feat.transpose(-1, -2) @ v, feat.sum(-2)
    assert rel_err(kv, ref_kv) <= TOL and rel_err(k_sum, ref_ks) <= TOL
    ref = torch.autograd.grad((ref_kv, ref_ks), (k, v, beta), (g_kv, g_ks))
    for got, want in zip(grads, ref, strict=True):
        assert got.shape == want.shape and rel_err(got, want) <= TOL


def test_merge_sums_with_empty_parts_and_gradients():
    b, h, d, dv = 1, 2, 3, 4
    empty = (torch.zeros(b, h, d, dv), torch.zeros(b, h, d), torch.full((b, h, d), float("-inf")))
    kv = torch.rand(b, h, d, dv, requires_grad=True)
    ks = torch.rand(b, h, d, requires_grad=True)
    km = torch.randn(b, h, d)
    for first, second in ((empty, (kv, ks, km)), ((kv, ks, km), empty)):
        out = merge_sums(first, second)
        assert torch.equal(out[0], kv) and torch.equal(out[1], ks) and torch.equal(out[2], km)
    both = merge_sums(empty, empty)
    assert torch.equal(both[0], empty[0]) and torch.isneginf(both[2]).all()
    # rescaling: a part with a smaller offset is scaled down by exp(difference)
    kv2, ks2, km2 = merge_sums((kv, ks, km), (kv, ks, km + 1.0))
    scale = 1 + torch.exp(torch.tensor(-1.0))
    torch.testing.assert_close(kv2, kv * scale)
    torch.testing.assert_close(km2, km + 1.0)
    kv2.sum().backward()
    torch.testing.assert_close(kv.grad, torch.full_like(kv, scale.item()))


def test_add_moments_and_errors():
    a = PrefixMoments(*(torch.full((1, 2), float(i), dtype=torch.float64) for i in range(5)))
    assert add_moments(None, a) is a and add_moments(a, None) is a
    assert torch.equal(add_moments(a, a).k_sq_sum, torch.full((1, 2), 8.0, dtype=torch.float64))
    q, k, v = make_qkv(1, 2, 10, 4)
    _, s = lln_attention(q, k, v, is_causal=True, output_final_state=True)
    _, t = lln_attention(
        q[:, :, :1], k[:, :, :1], v[:, :, :1], is_causal=True, output_final_state=True
    )
    with pytest.raises(ValueError, match="second must continue first"):
        merge_states(s, t)
    with pytest.raises(TypeError, match="first and second must be lln.LLNState"):
        merge_states(s, None)
