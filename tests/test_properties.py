"""Hypothesis property tests of the fast ops against the quadratic oracles (float64).

Shapes, chunk and block sizes, masks, input scales and feature-scale modes are drawn at
random (derandomized, so every run checks the same examples). Comparisons with an oracle or
between two computations of the same numbers use ``max |out - ref| <= 1e-10 * max |ref|``;
batch independence is checked bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from lln.ops import (
    block_diag_attention,
    block_diag_attention_matrix,
    lln_attention,
    lln_attention_matrix,
    lln_diag_attention,
    lln_diag_attention_matrix,
)

TOL = 1e-10
#: Padding probabilities of the drawn key_padding_mask; None = no mask at all.
PAD_PROBS = (None, 0.0, 0.25, 0.6, 1.0)
#: How alpha and beta are chosen: moment matching with a stats mode, or given explicitly.
SCALE_MODES = ("head", "sequence", "tensor", "given", "given-tensor")

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

batch = st.integers(1, 2)
heads = st.integers(1, 2)
length = st.integers(1, 70)
dim = st.integers(1, 9)
value_dim = st.integers(1, 7)
chunk = st.integers(1, 17)
block = st.integers(1, 13)
sigma = st.floats(0.3, 3.0)
seed = st.integers(0, 2**31 - 1)
pad = st.sampled_from(PAD_PROBS)
scale_mode = st.sampled_from(SCALE_MODES)
#: Raw cut points; taken modulo N, so they land anywhere in the sequence.
cuts = st.lists(st.integers(0, 69), max_size=8)


def make_inputs(b, h, n, d, dv, sigma_q, sigma_k, pad_prob, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * sigma_q
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * sigma_k
    v = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64)
    mask = None if pad_prob is None else torch.rand(b, n, generator=g) >= pad_prob
    return q, k, v, mask


def scale_kwargs(mode: str, b: int, h: int, seed: int) -> dict:
    """Keyword arguments selecting how alpha and beta are chosen."""
    if mode == "given":
        g = torch.Generator().manual_seed(seed + 1)
        alpha, beta = (0.1 + 2.9 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        return {"alpha": alpha, "beta": beta}
    if mode == "given-tensor":
        g = torch.Generator().manual_seed(seed + 1)
        alpha, beta = 0.1 + 2.9 * torch.rand(2, b, h, 1, 1, generator=g, dtype=torch.float64)
        return {"alpha": alpha, "beta": beta}
    return {"stats": mode}


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype == torch.float64
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    bound = TOL * ref.abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e} (= {TOL} * max |ref|)"


def visible(n: int, is_causal: bool, mask, b: int) -> torch.Tensor:
    """Bool ``(B, 1, N, N)``: which key each query sees (all real keys, or j <= i when causal)."""
    vis = torch.ones(b, 1, n, n, dtype=torch.bool)
    if is_causal:
        vis = vis.tril()
    if mask is not None:
        vis = vis & mask[:, None, None, :]
    return vis


# --------------------------------------------------------------------------- a. LLN == oracle


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@SETTINGS
@given(
    b=batch, h=heads, n=length, d=dim, dv=value_dim, chunk_size=chunk, pad_prob=pad,
    sigma_q=sigma, sigma_k=sigma, mode=scale_mode, seed=seed,
)
@example(b=1, h=1, n=1, d=1, dv=1, chunk_size=1, pad_prob=None,
         sigma_q=1.0, sigma_k=1.0, mode="given", seed=0)
@example(b=2, h=2, n=1, d=3, dv=2, chunk_size=5, pad_prob=0.6,
         sigma_q=3.0, sigma_k=0.3, mode="head", seed=1)
@example(b=2, h=1, n=70, d=9, dv=7, chunk_size=17, pad_prob=0.25,
         sigma_q=3.0, sigma_k=3.0, mode="sequence", seed=2)
@example(b=1, h=2, n=23, d=4, dv=2, chunk_size=6, pad_prob=1.0,
         sigma_q=1.0, sigma_k=2.0, mode="given-tensor", seed=3)
def test_lln_attention_matches_oracle(
    is_causal, b, h, n, d, dv, chunk_size, pad_prob, sigma_q, sigma_k, mode, seed
):
    """a. lln_attention == lln_attention_matrix @ v, for every way of choosing alpha, beta."""
    assume(not (is_causal and mode == "tensor"))
    q, k, v, mask = make_inputs(b, h, n, d, dv, sigma_q, sigma_k, pad_prob, seed)
    kw = dict(is_causal=is_causal, key_padding_mask=mask, **scale_kwargs(mode, b, h, seed))
    out = lln_attention(q, k, v, chunk_size=chunk_size, **kw)
    ref = lln_attention_matrix(q, k, **kw) @ v
    assert_close(out, ref)


@SETTINGS
@given(
    b=batch, h=heads, n_q=length, n_k=length, d=dim, dv=value_dim, pad_prob=pad,
    sigma_q=sigma, sigma_k=sigma, mode=scale_mode, seed=seed,
)
@example(b=2, h=2, n_q=1, n_k=70, d=9, dv=7, pad_prob=0.6, sigma_q=3.0, sigma_k=3.0,
         mode="head", seed=0)
@example(b=1, h=1, n_q=70, n_k=1, d=1, dv=1, pad_prob=None, sigma_q=0.3, sigma_k=3.0,
         mode="given", seed=1)
def test_lln_cross_attention_matches_oracle(
    b, h, n_q, n_k, d, dv, pad_prob, sigma_q, sigma_k, mode, seed
):
    """a'. Non-causal LLN with L queries and S != L keys (mask over the keys) == oracle."""
    q, _, _, _ = make_inputs(b, h, n_q, d, dv, sigma_q, sigma_k, pad_prob, seed)
    _, k, v, mask = make_inputs(b, h, n_k, d, dv, sigma_q, sigma_k, pad_prob, seed + 1)
    kw = dict(key_padding_mask=mask, **scale_kwargs(mode, b, h, seed))
    out = lln_attention(q, k, v, **kw)
    assert out.shape == (b, h, n_q, dv)
    assert_close(out, lln_attention_matrix(q, k, **kw) @ v)


# --------------------------------------------------------------------------- b. LLN+Diag == oracle


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@SETTINGS
@given(
    b=batch, h=heads, n=length, d=dim, dv=value_dim, chunk_size=chunk, block_size=block,
    pad_prob=pad, sigma_q=sigma, sigma_k=sigma, mode=scale_mode, seed=seed,
)
@example(b=1, h=1, n=1, d=1, dv=1, chunk_size=1, block_size=1, pad_prob=None,
         sigma_q=1.0, sigma_k=1.0, mode="given", seed=0)
@example(b=2, h=2, n=70, d=9, dv=7, chunk_size=17, block_size=13,
         pad_prob=0.25, sigma_q=3.0, sigma_k=3.0, mode="head", seed=1)
@example(b=2, h=1, n=41, d=5, dv=3, chunk_size=4, block_size=6,
         pad_prob=0.6, sigma_q=0.3, sigma_k=3.0, mode="sequence", seed=2)
def test_lln_diag_attention_matches_oracle(
    is_causal, b, h, n, d, dv, chunk_size, block_size, pad_prob, sigma_q, sigma_k, mode, seed
):
    """b. lln_diag_attention (weights 0.5 / 0.5) == lln_diag_attention_matrix @ v."""
    assume(not (is_causal and mode == "tensor"))
    q, k, v, mask = make_inputs(b, h, n, d, dv, sigma_q, sigma_k, pad_prob, seed)
    kw = dict(
        is_causal=is_causal, key_padding_mask=mask, block_size=block_size,
        **scale_kwargs(mode, b, h, seed),
    )
    out = lln_diag_attention(q, k, v, chunk_size=chunk_size, **kw)
    ref = lln_diag_attention_matrix(q, k, **kw) @ v
    assert_close(out, ref)
    # the diagonal half on its own
    kw_diag = dict(is_causal=is_causal, key_padding_mask=mask, block_size=block_size)
    assert_close(block_diag_attention(q, k, v, **kw_diag),
                 block_diag_attention_matrix(q, k, **kw_diag) @ v)


# --------------------------------------------------------------------------- c. state chaining


def pieces(n: int, raw_cuts: list[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)``, cut at ``raw_cuts`` taken modulo ``n``."""
    points = sorted({c % n for c in raw_cuts} - {0})
    bounds = [0, *points, n]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def assert_states_close(chained, whole) -> None:
    assert chained.position == whole.position
    assert chained.stats == whole.stats and chained.block_size == whole.block_size
    # running max of beta * k: beta (moment-matched per token) may differ in the last bits
    torch.testing.assert_close(chained.k_max, whole.k_max, rtol=1e-12, atol=0)
    for name in ("kv", "k_sum"):
        assert_close(getattr(chained, name), getattr(whole, name))
    assert (chained.moments is None) == (whole.moments is None)
    if whole.moments is not None:
        for name in ("count", "q_sum", "q_sq_sum", "k_sum", "k_sq_sum"):
            torch.testing.assert_close(
                getattr(chained.moments, name), getattr(whole.moments, name),
                rtol=1e-12, atol=1e-9,
            )
    for name in ("block_k", "block_v", "block_mask"):
        a, w = getattr(chained, name), getattr(whole, name)
        assert (a is None) == (w is None)
        if w is not None:
            assert torch.equal(a, w), name


@pytest.mark.parametrize("op_name", ["lln", "lln_diag"])
@SETTINGS
@given(
    b=batch, h=heads, n=length, d=dim, dv=value_dim, chunk_sizes=st.tuples(chunk, chunk),
    block_size=block, pad_prob=pad, sigma_q=sigma, sigma_k=sigma,
    mode=st.sampled_from(["head", "sequence", "given", "given-tensor"]), raw_cuts=cuts,
    seed=seed,
)
@example(b=1, h=1, n=7, d=2, dv=3, chunk_sizes=(3, 1), block_size=3,  # token by token
         pad_prob=None, sigma_q=1.0, sigma_k=1.0, mode="head", raw_cuts=[1, 2, 3, 4, 5, 6],
         seed=0)
@example(b=2, h=2, n=9, d=3, dv=2, chunk_sizes=(2, 5), block_size=4,
         pad_prob=0.25, sigma_q=2.0, sigma_k=0.5, mode="sequence",
         raw_cuts=[1, 2, 3, 4, 5, 6, 7, 8], seed=1)
@example(b=1, h=1, n=1, d=1, dv=1, chunk_sizes=(1, 1), block_size=1,
         pad_prob=None, sigma_q=1.0, sigma_k=1.0, mode="given", raw_cuts=[], seed=2)
@example(b=2, h=1, n=70, d=9, dv=7, chunk_sizes=(17, 16), block_size=13,
         pad_prob=0.6, sigma_q=3.0, sigma_k=3.0, mode="head", raw_cuts=[12, 13, 14, 40, 69],
         seed=3)
def test_state_chaining_equals_one_call(
    op_name, b, h, n, d, dv, chunk_sizes, block_size, pad_prob, sigma_q, sigma_k, mode,
    raw_cuts, seed,
):
    """c. Causal calls chained through LLNState over random pieces == one call (output and
    final state); the chunk size alternates between pieces."""
    q, k, v, mask = make_inputs(b, h, n, d, dv, sigma_q, sigma_k, pad_prob, seed)
    kw = scale_kwargs(mode, b, h, seed)
    if op_name == "lln":
        op = lln_attention
    else:
        op = lln_diag_attention
        kw["block_size"] = block_size
    whole, whole_state = op(
        q, k, v, is_causal=True, key_padding_mask=mask, chunk_size=chunk_sizes[0],
        output_final_state=True, **kw,
    )
    outs, state = [], None
    for i, (start, stop) in enumerate(pieces(n, raw_cuts)):
        out, state = op(
            q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], is_causal=True,
            key_padding_mask=None if mask is None else mask[:, start:stop],
            chunk_size=chunk_sizes[i % 2], initial_state=state, output_final_state=True, **kw,
        )
        assert state.position == stop
        outs.append(out)
    assert_close(torch.cat(outs, 2), whole)
    assert whole_state.position == state.position == n
    assert_states_close(state, whole_state)


# --------------------------------------------------------------------------- d. row sums


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@SETTINGS
@given(
    b=batch, h=heads, n=length, d=dim, dv=value_dim, chunk_size=chunk, block_size=block,
    pad_prob=pad, sigma_q=sigma, sigma_k=sigma, mode=scale_mode, seed=seed,
)
@example(b=2, h=1, n=1, d=1, dv=1, chunk_size=1, block_size=1, pad_prob=0.6,
         sigma_q=1.0, sigma_k=1.0, mode="head", seed=0)
@example(b=1, h=2, n=30, d=3, dv=2, chunk_size=7, block_size=4, pad_prob=1.0,
         sigma_q=1.0, sigma_k=1.0, mode="sequence", seed=1)
def test_oracle_rows_sum_to_one_and_outputs_are_finite(
    is_causal, b, h, n, d, dv, chunk_size, block_size, pad_prob, sigma_q, sigma_k, mode, seed
):
    """d. Oracle rows sum to 1 over the visible keys (0 when none is visible); outputs finite."""
    assume(not (is_causal and mode == "tensor"))
    q, k, v, mask = make_inputs(b, h, n, d, dv, sigma_q, sigma_k, pad_prob, seed)
    scales = scale_kwargs(mode, b, h, seed)
    kw = dict(is_causal=is_causal, key_padding_mask=mask)
    vis = visible(n, is_causal, mask, b)
    block_id = torch.arange(n) // block_size
    vis_diag = vis & (block_id[:, None] == block_id[None, :])

    p_lln = lln_attention_matrix(q, k, **kw, **scales)
    p_diag = block_diag_attention_matrix(q, k, block_size=block_size, **kw)
    p_both = lln_diag_attention_matrix(q, k, block_size=block_size, **kw, **scales)
    for p, vis_p in ((p_lln, vis), (p_diag, vis_diag)):
        assert p.shape == (b, h, n, n) and torch.isfinite(p).all()
        assert (p >= 0).all()
        assert (p[~vis_p.expand_as(p)] == 0).all()  # nothing outside the visible keys
        sums = p.sum(-1)
        expected = vis_p.any(-1).expand_as(sums).to(torch.float64)
        assert (sums - expected).abs().max() <= TOL
    # LLN+Diag = 0.5 P_lln + 0.5 P_diag: a row sums to 1 when both halves see a key. A query
    # whose own diagonal block holds no visible key (padded query) gets only the LLN half.
    expected = 0.5 * vis.any(-1).to(torch.float64) + 0.5 * vis_diag.any(-1).to(torch.float64)
    assert (p_both.sum(-1) - expected.expand(b, h, n)).abs().max() <= TOL
    if mask is None:
        assert (p_both.sum(-1) - 1).abs().max() <= TOL
    if mask is not None:  # a real query always sees itself in its block (and not causal: more)
        real_rows = mask[:, None, :].expand(b, h, n)
        assert ((p_both.sum(-1)[real_rows] - 1).abs() <= TOL).all()

    out_lln = lln_attention(q, k, v, chunk_size=chunk_size, **kw, **scales)
    out_diag = lln_diag_attention(
        q, k, v, chunk_size=chunk_size, block_size=block_size, **kw, **scales
    )
    for out in (out_lln, out_diag):
        assert torch.isfinite(out).all()
        # rows that see no key at all are exactly zero
        assert (out[~vis.any(-1).expand(b, h, n)] == 0).all()


# --------------------------------------------------------------------------- e. batch independence


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("op_name", ["lln", "lln_diag"])
@SETTINGS
@given(
    h=heads, n=length, d=dim, dv=value_dim, chunk_size=chunk, block_size=block, pad_prob=pad,
    sigma_q=sigma, sigma_k=sigma, seed=seed,
    mode=st.sampled_from(["head", "sequence", "given", "given-tensor"]),
)
@example(h=1, n=1, d=1, dv=1, chunk_size=1, block_size=1, pad_prob=None, sigma_q=1.0,
         sigma_k=1.0, mode="head", seed=0)
@example(h=2, n=70, d=9, dv=7, chunk_size=17, block_size=13, pad_prob=0.25, sigma_q=0.3,
         sigma_k=3.0, mode="sequence", seed=1)
def test_batch_independence(
    op_name, is_causal, h, n, d, dv, chunk_size, block_size, pad_prob, sigma_q, sigma_k, mode,
    seed,
):
    """e. Replacing sequence 1 of the batch leaves the output of sequence 0 bit for bit
    unchanged (every stats mode but "tensor", which mixes the batch on purpose)."""
    b = 2
    q, k, v, mask = make_inputs(b, h, n, d, dv, sigma_q, sigma_k, pad_prob, seed)
    # another sequence 1: other values, another scale, other padding
    q2, k2, v2, mask2 = make_inputs(b, h, n, d, dv, 3.0, 0.3, pad_prob, seed + 7)
    q2[0], k2[0], v2[0] = q[0], k[0], v[0]
    q2[1] *= 10
    if mask is not None:
        mask2[0] = mask[0]
    kw = dict(is_causal=is_causal, chunk_size=chunk_size, **scale_kwargs(mode, b, h, seed))
    if op_name == "lln":
        op = lln_attention
    else:
        op = lln_diag_attention
        kw["block_size"] = block_size
    out = op(q, k, v, key_padding_mask=mask, **kw)
    out2 = op(q2, k2, v2, key_padding_mask=mask2, **kw)
    if mask2 is None or mask2[1].any():
        assert not torch.equal(out2[1], out[1])  # sequence 1 did change
    assert torch.equal(out2[0], out[0])
    # and sequence 0 alone gives the same output as within the batch
    kw_one = dict(kw)
    for name in ("alpha", "beta"):
        if isinstance(kw_one.get(name), torch.Tensor):
            kw_one[name] = kw_one[name][:1]
    alone = op(q[:1], k[:1], v[:1], key_padding_mask=None if mask is None else mask[:1], **kw_one)
    assert_close(alone[0], out[0])


# ------------------------------------------------------------- single-entry statistics


@pytest.mark.parametrize(
    "shape, stats", [((1, 1, 1, 1), "head"), ((2, 1, 1, 1), "sequence"), ((1, 3, 1, 1), "head")]
)
def test_single_entry_statistics_are_finite(shape, stats):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    all_real = torch.ones(shape[0], shape[2], dtype=torch.bool)
    masked = lln_attention(q, k, v, stats=stats, key_padding_mask=all_real)
    assert_close(masked, v)  # one key: the output is its value
    assert_close(lln_attention(q, k, v, stats=stats), v)

