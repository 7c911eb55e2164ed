"""Fast ops against the explicit quadratic float64 oracle, in every dtype.

Tolerances (relative: max |out - ref| / max |ref|, see ``conftest.rel_err``):

* float64: 1e-10 — only summation order differs.
* float32: 1e-5 — the fp32 features ``exp(alpha q)`` carry an absolute exponent error of
  about ulp(|alpha q|); at sigma = 3, |alpha q| reaches ~80, so ~5e-6 relative is intrinsic.
* bfloat16 / float16 inputs: the oracle runs on the *rounded* inputs (upcast to float64), the
  op computes in float32 and rounds its output once; the bound is two units of the output
  dtype's rounding: bf16 2^-7 ~ 7.8e-3, fp16 2^-10 ~ 9.8e-4.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err

import lln

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}
OPS = {
    "lln": (lln.lln_attention, lln.lln_attention_matrix),
    "lln_diag": (lln.lln_diag_attention, lln.lln_diag_attention_matrix),
}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("op", list(OPS))
def test_matches_float64_oracle(op, is_causal, sigma, dtype):
    fast, matrix = OPS[op]
    q, k, v = make_qkv(2, 2, 333, 24, 20, sigma=sigma, dtype=dtype)
    mask = padding_mask(2, 333)
    out = fast(q, k, v, is_causal=is_causal, key_padding_mask=mask, chunk_size=32)
    ref = matrix(q.double(), k.double(), is_causal=is_causal, key_padding_mask=mask) @ v.double()
    assert out.dtype == dtype and out.shape == v.shape
    assert rel_err(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_long_sequence_head_dim_64(is_causal, dtype):
    """N = 2048, D = 64 (the paper's head dim), sigma = 3: the hardest setting in the spec."""
    q, k, v = make_qkv(1, 1, 2048, 64, sigma=3.0, dtype=dtype, seed=1)
    out = lln.lln_diag_attention(q, k, v, is_causal=is_causal)
    ref = lln.lln_diag_attention_matrix(q.double(), k.double(), is_causal=is_causal) @ v.double()
    assert rel_err(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_single_token(op, is_causal):
    fast, _ = OPS[op]
    q, k, v = make_qkv(3, 2, 1, 5, 4)
    # one token attends to itself only: the output is its own value
    torch.testing.assert_close(fast(q, k, v, is_causal=is_causal), v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 500])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q, k, v = make_qkv(1, 2, 300, 8, sigma=2.0)
    ref = lln.lln_attention(q, k, v, is_causal=True, chunk_size=300)
    out = lln.lln_attention(q, k, v, is_causal=True, chunk_size=chunk_size)
    assert rel_err(out, ref) <= 1e-12


def test_long_input_crosses_segments():
    """Longer than one causal segment (16 chunks) and one LLN+Diag piece (1024 tokens)."""
    q, k, v = make_qkv(1, 1, 1500, 8, sigma=1.5, seed=3)
    mask = padding_mask(1, 1500)
    for fast, matrix in OPS.values():
        out = fast(q, k, v, is_causal=True, key_padding_mask=mask, chunk_size=16)
        ref = matrix(q, k, is_causal=True, key_padding_mask=mask) @ v
        assert rel_err(out, ref) <= 1e-10


def test_cross_attention_non_causal():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 41, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 41, 5, generator=g, dtype=torch.float64)
    mask = padding_mask(2, 41)
    out = lln.lln_attention(q, k, v, key_padding_mask=mask)
    ref = lln.lln_attention_matrix(q, k, key_padding_mask=mask) @ v
    assert out.shape == (2, 3, 17, 5)
    assert rel_err(out, ref) <= 1e-10


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_no_nan_or_inf_at_16k_tokens_sigma_3(op, dtype):
    fast, _ = OPS[op]
    q, k, v = make_qkv(1, 2, 16384, 64, sigma=3.0, dtype=dtype, seed=2)
    for is_causal in (False, True):
        out = fast(q, k, v, is_causal=is_causal)
        assert torch.isfinite(out).all()
        # a convex combination of values stays within their range
        assert out.abs().max() <= v.abs().max() * (1 + 1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_large_explicit_scales(is_causal, dtype):
    """alpha = beta = 20 on unit-variance inputs: exponents spread over +-150, ~1.2x the
    moment-matched sigma_tilde at sigma = 3. Non-causal is exact at any scale."""
    q, k, v = make_qkv(2, 2, 400, 64, sigma=1.0, dtype=dtype)
    out = lln.lln_attention(q, k, v, is_causal=is_causal, alpha=20.0, beta=20.0)
    ref = lln.lln_attention_matrix(
        q.double(), k.double(), is_causal=is_causal, alpha=20.0, beta=20.0
    ) @ v.double()
    assert rel_err(out, ref) <= TOLERANCE[dtype]


def test_non_causal_is_exact_at_huge_scales():
    q, k, v = make_qkv(1, 2, 200, 16, sigma=1.0)
    out = lln.lln_attention(q, k, v, alpha=300.0, beta=300.0)
    ref = lln.lln_attention_matrix(q, k, alpha=300.0, beta=300.0) @ v
    assert rel_err(out, ref) <= 1e-10


def test_causal_underflow_is_reported_not_silent():
    """Beyond the documented range a causal row can lose every term: that must warn."""
    q, k, v = make_qkv(1, 2, 200, 16, sigma=1.0)
    with pytest.warns(RuntimeWarning, match="underflowed"):
        lln.lln_attention(q, k, v, is_causal=True, alpha=300.0, beta=300.0)


def test_padded_keys_vanish():
    """Changing padded keys and values, however much, leaves every output unchanged."""
    q, k, v = make_qkv(2, 2, 50, 8)
    mask = padding_mask(2, 50)
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = 1e4
    v2[~mask[:, None, :, None].expand_as(v)] = -1e6
    for fast, _ in OPS.values():
        for is_causal in (False, True):
            a = fast(q, k, v, is_causal=is_causal, key_padding_mask=mask)
            b = fast(q, k2, v2, is_causal=is_causal, key_padding_mask=mask)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rows_without_visible_keys_are_zero():
    q, k, v = make_qkv(1, 1, 6, 4)
    mask = torch.tensor([[False, False, True, True, True, True]])
    for fast, _ in OPS.values():
        out = fast(q, k, v, is_causal=True, key_padding_mask=mask)
        assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
        assert torch.isfinite(out).all()


def test_block_diag_matches_oracle_and_sdpa():
    q, k, v = make_qkv(2, 2, 70, 16, 12)
    mask = padding_mask(2, 70)
    for is_causal in (False, True):
        out = lln.block_diag_attention(
            q, k, v, block_size=16, is_causal=is_causal, key_padding_mask=mask
        )
        p = lln.block_diag_attention_matrix(
            q, k, block_size=16, is_causal=is_causal, key_padding_mask=mask
        )
        assert rel_err(out, p @ v) <= 1e-12
    # a single block covering everything is plain softmax attention
    out = lln.block_diag_attention(q, k, v, block_size=70, is_causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(out, sdpa) <= 1e-12


def test_lln_diag_is_the_average_of_its_parts():
    q, k, v = make_qkv(1, 2, 90, 8)
    both = lln.lln_diag_attention(q, k, v, block_size=10)
    parts = 0.5 * (lln.lln_attention(q, k, v) + lln.block_diag_attention(q, k, v, block_size=10))
    assert rel_err(both, parts) <= 1e-13


def test_oracle_rows_are_stochastic():
    q, k, _ = make_qkv(2, 2, 40, 8, sigma=2.0)
    for is_causal in (False, True):
        p = lln.lln_diag_attention_matrix(q, k, is_causal=is_causal)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 40, dtype=torch.float64))
        assert (p >= 0).all()
        if is_causal:
            assert p.triu(1).abs().max() == 0


# ------------------------------------------------------------- moment-matching constants


@pytest.mark.parametrize("d", [32, 128])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("op", list(OPS))
def test_head_dim_constants_match_float64_oracle(op, is_causal, d):
    """constants="head_dim" reaches the fast path and the oracle alike, and changes both."""
    fast, matrix = OPS[op]
    q, k, v = make_qkv(2, 2, 77, d, 6, sigma=1.5)
    mask = padding_mask(2, 77)
    kw = dict(is_causal=is_causal, key_padding_mask=mask)
    out = fast(q, k, v, chunk_size=16, constants="head_dim", **kw)
    ref = matrix(q, k, constants="head_dim", **kw) @ v
    assert rel_err(out, ref) <= TOLERANCE[torch.float64]
    assert rel_err(ref, matrix(q, k, **kw) @ v) > 1e-3  # not the paper's constants


@pytest.mark.parametrize("op", list(OPS))
def test_head_dim_constants_equal_explicit_moment_matched_scales(op):
    fast, _ = OPS[op]
    q, k, v = make_qkv(2, 2, 77, 32, 6)
    mask = padding_mask(2, 77)
    alpha, beta = lln.moment_match(q, k, key_padding_mask=mask, constants="head_dim")
    out = fast(q, k, v, key_padding_mask=mask, constants="head_dim")
    assert torch.equal(out, fast(q, k, v, key_padding_mask=mask, alpha=alpha, beta=beta))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_head_dim_constants_single_token(op, is_causal):
    fast, matrix = OPS[op]
    q, k, v = make_qkv(3, 2, 1, 32, 4)
    out = fast(q, k, v, is_causal=is_causal, constants="head_dim")
    torch.testing.assert_close(out, v, rtol=1e-12, atol=1e-12)
    p = matrix(q, k, is_causal=is_causal, constants="head_dim")
    torch.testing.assert_close(p, torch.ones_like(p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("op", list(OPS))
def test_default_constants_are_the_papers(op, is_causal):
    fast, matrix = OPS[op]
    q, k, v = make_qkv(2, 2, 45, 32, 6)
    kw = dict(is_causal=is_causal, key_padding_mask=padding_mask(2, 45))
    out = fast(q, k, v, **kw)
    assert torch.equal(out, fast(q, k, v, constants="paper", **kw))
    assert torch.equal(matrix(q, k, **kw), matrix(q, k, constants="paper", **kw))
    if not is_causal:  # "paper" = MOMENT_A, MOMENT_B
        alpha, beta = lln.moment_match(
            q, k, key_padding_mask=kw["key_padding_mask"], a=lln.MOMENT_A, b=lln.MOMENT_B
        )
        assert torch.equal(out, fast(q, k, v, alpha=alpha, beta=beta, **kw))


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_head_dim_constants_at_d64_are_close_to_the_papers(is_causal):
    """The D = 64 calibration lands near the paper's fit: a small, nonzero change."""
    q, k, v = make_qkv(1, 2, 50, 64, sigma=1.5)
    paper = lln.lln_attention(q, k, v, is_causal=is_causal)
    head_dim = lln.lln_attention(q, k, v, is_causal=is_causal, constants="head_dim")
    assert not torch.equal(paper, head_dim)
    assert rel_err(head_dim, paper) < 1e-2
