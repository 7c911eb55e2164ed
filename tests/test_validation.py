"""Bad input raises ``TypeError`` / ``ValueError`` whose message names the offending argument.

Covers the public ops ``lln_attention``, ``lln_diag_attention``, ``block_diag_attention`` and
``moment_match``; each also gets a positive control (a fully valid call does not raise).
"""

from __future__ import annotations

import pytest
import torch

import lln
from lln.ops import (
    LLNState,
    block_diag_attention,
    lln_attention,
    lln_attention_matrix,
    lln_diag_attention,
    lln_diag_attention_matrix,
    moment_match,
)

B, H, N, D, DV = 2, 3, 5, 4, 3


def make(
    b: int = B, h: int = H, n: int = N, d: int = D, dv: int = DV, *, dtype=torch.float64
):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _mm(q, k, v, **kwargs):
    """``moment_match`` with the (q, k, v) signature of the attention ops (v is unused)."""
    return moment_match(q, k, **kwargs)


#: Ops taking (q, k, v): name -> callable.
ATTENTION_OPS = {
    "lln_attention": lln_attention,
    "lln_diag_attention": lln_diag_attention,
    "block_diag_attention": block_diag_attention,
}
#: Every op, moment_match called as (q, k, v) with v ignored.
ALL_OPS = {**ATTENTION_OPS, "moment_match": _mm}
#: Ops with alpha / beta / stats / temperature / eps / chunk_size.
LLN_OPS = {"lln_attention": lln_attention, "lln_diag_attention": lln_diag_attention}
#: Ops with stats / temperature.
STATS_OPS = {**LLN_OPS, "moment_match": _mm}
#: Ops with block_size.
BLOCK_OPS = {
    "lln_diag_attention": lln_diag_attention,
    "block_diag_attention": block_diag_attention,
}


def ops(table: dict):
    return pytest.mark.parametrize("op", list(table.values()), ids=list(table))


def ops_and_tensors(table: dict, tensors: str = "qkv"):
    """Parametrize ``(op, which)`` over the ops and the tensors each takes (moment_match: q, k)."""
    cases = [
        pytest.param(op, which, id=f"{name}-{which}")
        for name, op in table.items()
        for which in tensors
        if not (op is _mm and which == "v")
    ]
    return pytest.mark.parametrize("op, which", cases)


# --------------------------------------------------------------------------- positive controls


def test_lln_attention_valid_calls_do_not_raise():
    q, k, v = make()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 0] = False
    assert lln_attention(q, k, v).shape == (B, H, N, DV)
    assert lln_attention(q, k, v, key_padding_mask=mask, stats="tensor").shape == (B, H, N, DV)
    alpha = torch.full((B, H, 1, 1), 0.7, dtype=torch.float64)
    out, state = lln_attention(
        q, k, v, is_causal=True, key_padding_mask=mask, alpha=alpha, beta=1.3, chunk_size=2,
        eps=0.0, output_final_state=True,
    )
    assert out.shape == (B, H, N, DV) and isinstance(state, LLNState)
    out2 = lln_attention(q, k, v, is_causal=True, alpha=alpha, beta=1.3, initial_state=state)
    assert out2.shape == (B, H, N, DV)
    # cross-attention: different query and key lengths are fine when not causal
    assert lln_attention(q[:, :, :2], k, v).shape == (B, H, 2, DV)


def test_lln_diag_attention_valid_calls_do_not_raise():
    q, k, v = make()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, -1] = False
    assert lln_diag_attention(q, k, v, block_size=2).shape == (B, H, N, DV)
    out, state = lln_diag_attention(
        q, k, v, is_causal=True, key_padding_mask=mask, block_size=3, stats="sequence",
        temperature=2.0, output_final_state=True,
    )
    out2 = lln_diag_attention(
        q, k, v, is_causal=True, block_size=3, stats="sequence", initial_state=state,
    )
    assert out.shape == out2.shape == (B, H, N, DV)


def test_block_diag_attention_valid_call_does_not_raise():
    q, k, v = make()
    mask = torch.ones(B, N, dtype=torch.bool)
    out = block_diag_attention(q, k, v, block_size=2, is_causal=True, key_padding_mask=mask)
    assert out.shape == (B, H, N, DV)


def test_moment_match_valid_calls_do_not_raise():
    q, k, _ = make()
    alpha, beta = moment_match(q, k, stats="tensor")
    assert alpha.shape == beta.shape == (1, 1, 1, 1)
    alpha, beta = moment_match(q, k, is_causal=True, key_padding_mask=torch.ones(B, N).bool())
    assert alpha.shape == (B, H, N, 1)
    # non-causal statistics of q and k with different lengths are fine
    alpha, _ = moment_match(q[:, :, :2], k, stats="sequence")
    assert alpha.shape == (B, 1, 1, 1)


# --------------------------------------------------------------------------- q, k, v


@ops_and_tensors(ALL_OPS)
def test_wrong_ndim(op, which):
    q, k, v = make()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which][0]  # 3-D
    with pytest.raises(ValueError, match=rf"\b{which} must be 4-D"):
        op(args["q"], args["k"], args["v"])


@ops(ALL_OPS)
def test_not_a_tensor(op):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"\bq must be a torch.Tensor"):
        op(q.numpy(), k, v)


@ops(ALL_OPS)
@pytest.mark.parametrize("axis", [0, 1], ids=["batch", "heads"])
def test_mismatched_batch_or_heads(op, axis):
    q, k, v = make()
    shape = list(k.shape)
    shape[axis] += 1
    with pytest.raises(ValueError, match=r"q, k, v must agree on \(batch, heads\)"):
        op(q, torch.zeros(shape, dtype=k.dtype), v)


@ops(ATTENTION_OPS)
@pytest.mark.parametrize("axis", [0, 1], ids=["batch", "heads"])
def test_mismatched_batch_or_heads_of_v(op, axis):
    q, k, v = make()
    shape = list(v.shape)
    shape[axis] += 1
    with pytest.raises(ValueError, match=r"q, k, v must agree .* v \("):
        op(q, k, torch.zeros(shape, dtype=v.dtype))


@ops(ALL_OPS)
def test_mismatched_head_dim(op):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"\bk must have the head dim of q"):
        op(q, k[..., :-1], v)


@ops(ATTENTION_OPS)
def test_v_with_other_token_count(op):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"\bv must have as many tokens as k"):
        op(q, k, v[:, :, :-1])


@ops_and_tensors(ALL_OPS, "kv")
def test_mismatched_dtypes(op, which):
    q, k, v = make()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which].float()
    with pytest.raises(TypeError, match=r"q, k, v must share one dtype"):
        op(args["q"], args["k"], args["v"])


@ops_and_tensors(ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_dtype(op, which, dtype):
    q, k, v = make()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=rf"\b{which} must have a floating dtype"):
        op(args["q"], args["k"], args["v"])


@ops(ALL_OPS)
def test_all_int_inputs(op):
    q, k, v = (t.long() for t in make())
    with pytest.raises(TypeError, match=r"\bq must have a floating dtype"):
        op(q, k, v)


@ops(ALL_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_sequence(op, is_causal):
    q, k, v = make(n=0)
    with pytest.raises(ValueError, match=r"sequence length must be >= 1, got q"):
        op(q, k, v, is_causal=is_causal)


@ops(ATTENTION_OPS)
def test_empty_key_sequence(op):
    q, _, _ = make()
    _, k, v = make(n=0)
    with pytest.raises(ValueError, match=r"sequence length must be >= 1, .*k \(2, 3, 0, 4\)"):
        op(q, k, v)


@ops(ATTENTION_OPS)
def test_empty_head_dims(op):
    q, k, v = make(dv=0)
    with pytest.raises(ValueError, match=r"head dims must be >= 1, got q .* v \("):
        op(q, k, v)


@ops({**ATTENTION_OPS, "moment_match": _mm})
def test_causal_needs_equal_lengths(op):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"q length 2 and k length 5"):
        op(q[:, :, :2], k, v, is_causal=True)


@ops(BLOCK_OPS)
def test_block_ops_need_equal_lengths_even_non_causal(op):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"q length 2 and k length 5"):
        op(q[:, :, :2], k, v)


# --------------------------------------------------------------------------- key_padding_mask


@ops(ALL_OPS)
@pytest.mark.parametrize(
    "shape", [(B, N + 1), (B + 1, N), (N,), (B, 1, N), (1, N)], ids=str
)
def test_mask_wrong_shape(op, shape):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape"):
        op(q, k, v, key_padding_mask=torch.ones(shape, dtype=torch.bool))


@ops(ALL_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.uint8])
def test_mask_wrong_dtype(op, dtype):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"key_padding_mask must have dtype torch.bool"):
        op(q, k, v, key_padding_mask=torch.ones(B, N, dtype=dtype))


@ops(ALL_OPS)
def test_mask_not_a_tensor(op):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool torch.Tensor"):
        op(q, k, v, key_padding_mask=[[True] * N] * B)


def test_mask_follows_keys_for_cross_attention():
    q, k, v = make()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape"):
        lln_attention(q[:, :, :2], k, v, key_padding_mask=torch.ones(B, 2, dtype=torch.bool))


# --------------------------------------------------------------------------- alpha, beta


BAD_SCALES = [
    pytest.param(0.0, id="zero"),
    pytest.param(0, id="int-zero"),
    pytest.param(-1.5, id="negative"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(float("nan"), id="nan"),
    pytest.param(torch.tensor([[[[1.0]], [[0.0]], [[2.0]]]], dtype=torch.float64), id="t-zero"),
    pytest.param(torch.tensor(-0.5, dtype=torch.float64), id="t-negative-scalar"),
    pytest.param(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64).view(3, 1, 1), id="t-neg"),
    pytest.param(torch.tensor([1.0, float("nan")], dtype=torch.float64).view(2, 1, 1, 1),
                 id="t-nan"),
]


@ops(LLN_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("which", ["alpha", "beta"])
@pytest.mark.parametrize("bad", BAD_SCALES)
def test_non_positive_alpha_beta(op, is_causal, which, bad, debug_mode):
    """Floats are always checked; tensor values in debug mode (reading them would sync)."""
    q, k, v = make()
    kwargs = {"alpha": 1.0, "beta": 1.0}
    kwargs[which] = bad
    with pytest.raises(ValueError, match=rf"\b{which} must be"):
        op(q, k, v, is_causal=is_causal, **kwargs)


@pytest.fixture
def debug_mode():
    """``lln.set_debug(True)`` for one test, restored afterwards."""
    previous = lln.debug_enabled()
    lln.set_debug(True)
    yield
    lln.set_debug(previous)


@ops(LLN_OPS)
def test_tensor_values_are_not_read_outside_debug_mode(op):
    """Without debug mode a tensor alpha is used as given (no host read, no sync): a NaN
    tensor gives NaN outputs rather than a data-dependent check; debug mode rejects it."""
    q, k, v = make()
    bad = torch.tensor(float("nan"), dtype=torch.float64)
    assert lln.debug_enabled() is False
    assert op(q, k, v, alpha=bad, beta=1.0).isnan().all()
    lln.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"\balpha must be"):
            op(q, k, v, alpha=bad, beta=1.0)
    finally:
        lln.set_debug(False)


def test_set_debug_takes_a_bool():
    with pytest.raises(TypeError, match=r"\benabled must be a bool"):
        lln.set_debug(1)


@ops(LLN_OPS)
@pytest.mark.parametrize("which", ["alpha", "beta"])
@pytest.mark.parametrize("bad", ["1.0", [1.0], True, torch.ones(1, dtype=torch.int64)],
                         ids=["str", "list", "bool", "int-tensor"])
def test_alpha_beta_wrong_type(op, which, bad):
    q, k, v = make()
    kwargs = {"alpha": 1.0, "beta": 1.0}
    kwargs[which] = bad
    with pytest.raises(TypeError, match=rf"\b{which} must be"):
        op(q, k, v, **kwargs)


@ops(LLN_OPS)
@pytest.mark.parametrize("given", ["alpha", "beta"])
@pytest.mark.parametrize("value", [1.0, torch.ones(1, dtype=torch.float64)], ids=["f", "t"])
def test_alpha_without_beta(op, given, value):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"alpha and beta must be given together"):
        op(q, k, v, **{given: value})


@ops(LLN_OPS)
@pytest.mark.parametrize("which", ["alpha", "beta"])
@pytest.mark.parametrize(
    "shape", [(B, H, N, 1), (B + 1, 1, 1, 1), (1, H + 1, 1, 1), (4,), (1, 1, 1, 1, 1)], ids=str
)
def test_alpha_beta_not_broadcastable(op, which, shape):
    q, k, v = make()
    kwargs = {"alpha": 1.0, "beta": 1.0}
    kwargs[which] = torch.ones(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"\b{which} must be broadcastable to"):
        op(q, k, v, **kwargs)


# --------------------------------------------------------------------------- ints and floats


BAD_POSITIVE_INTS = [0, -1, 2.5, True, False, "4", 4.0]


@ops(LLN_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bad", BAD_POSITIVE_INTS, ids=repr)
def test_invalid_chunk_size(op, is_causal, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        op(q, k, v, is_causal=is_causal, chunk_size=bad)


@ops(BLOCK_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bad", BAD_POSITIVE_INTS, ids=repr)
def test_invalid_block_size(op, is_causal, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"block_size must be a positive int"):
        op(q, k, v, is_causal=is_causal, block_size=bad)


@ops(BLOCK_OPS)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")], ids=repr)
def test_invalid_scale(op, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"scale must be a positive finite float"):
        op(q, k, v, scale=bad)


@ops(LLN_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bad", [-1e-6, -1.0, float("inf"), float("nan")], ids=repr)
def test_invalid_eps(op, is_causal, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"\beps must be a finite float >= 0"):
        op(q, k, v, is_causal=is_causal, eps=bad)


@ops(LLN_OPS)
def test_eps_wrong_type(op):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"\beps must be"):
        op(q, k, v, eps="0")


@ops(STATS_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bad", [0.0, 0, -1.0, -1e-9, float("inf"), float("nan")], ids=repr)
def test_non_positive_temperature(op, is_causal, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"\btemperature must be a positive finite float"):
        op(q, k, v, is_causal=is_causal, temperature=bad)


@ops(STATS_OPS)
def test_temperature_wrong_type(op):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"\btemperature must be"):
        op(q, k, v, temperature=None)


@pytest.mark.parametrize("bad", [0.0, -0.1], ids=repr)
def test_moment_match_non_positive_a(bad):
    q, k, _ = make()
    with pytest.raises(ValueError, match=r"\ba must be a positive finite float"):
        moment_match(q, k, a=bad)


@pytest.mark.parametrize("which", ["lln_weight", "diag_weight"])
def test_lln_diag_weights(which):
    q, k, v = make()
    for bad in (float("nan"), float("inf"), -float("inf")):  # issue 17, bug 6
        with pytest.raises(ValueError, match=rf"\b{which} must be a finite float"):
            lln_diag_attention(q, k, v, **{which: bad})
    with pytest.raises(TypeError, match=rf"\b{which} must be"):
        lln_diag_attention(q, k, v, **{which: "0.5"})
    with pytest.raises(ValueError, match=rf"\b{which} must be broadcastable"):
        lln_diag_attention(q, k, v, **{which: torch.ones(B, H, N, DV, dtype=torch.float64)})


@ops(LLN_OPS)
def test_is_causal_must_be_bool(op):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"\bis_causal must be a bool"):
        op(q, k, v, is_causal=None)


# --------------------------------------------------------------------------- stats


@ops(STATS_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bad", ["heads", "", "Head", None, 1], ids=repr)
def test_invalid_stats(op, is_causal, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"\bstats must be one of"):
        op(q, k, v, is_causal=is_causal, stats=bad)


@ops(STATS_OPS)
def test_tensor_stats_cannot_be_causal(op):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"stats='tensor'.*cannot be causal"):
        op(q, k, v, is_causal=True, stats="tensor")


# --------------------------------------------------------------------------- constants


def _lln_matrix(q, k, v, **kwargs):
    return lln_attention_matrix(q, k, **kwargs)


def _lln_diag_matrix(q, k, v, **kwargs):
    return lln_diag_attention_matrix(q, k, **kwargs)


#: Ops that moment-match with alpha / beta as an alternative, oracles included.
SCALES_OPS = {**LLN_OPS, "lln_attention_matrix": _lln_matrix,
              "lln_diag_attention_matrix": _lln_diag_matrix}


@ops({**SCALES_OPS, "moment_match": _mm})
@pytest.mark.parametrize("bad", ["D", "head", "Paper", None, 64], ids=repr)
def test_invalid_constants(op, bad):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"\bconstants must be one of \('paper', 'head_dim'\)"):
        op(q, k, v, constants=bad)


@ops(SCALES_OPS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_head_dim_constants_with_explicit_scales(op, is_causal):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"constants='head_dim'.*alpha, beta.*not both"):
        op(q, k, v, is_causal=is_causal, alpha=1.0, beta=1.0, constants="head_dim")
    # positive controls: the default "paper" goes with explicit scales, "head_dim" without
    assert op(q, k, v, is_causal=is_causal, alpha=1.0, beta=1.0, constants="paper").isfinite().all()
    assert op(q, k, v, is_causal=is_causal, constants="head_dim").isfinite().all()


# --------------------------------------------------------------------------- state


@ops(LLN_OPS)
def test_output_final_state_needs_causal(op):
    q, k, v = make()
    with pytest.raises(ValueError, match=r"output_final_state need is_causal=True"):
        op(q, k, v, output_final_state=True)


@ops(LLN_OPS)
def test_initial_state_needs_causal(op):
    q, k, v = make()
    _, state = op(q, k, v, is_causal=True, output_final_state=True)
    with pytest.raises(ValueError, match=r"initial_state .*need is_causal=True"):
        op(q, k, v, initial_state=state)
    empty = LLNState.empty(B, H, D, DV, dtype=torch.float64, device=q.device)
    with pytest.raises(ValueError, match=r"initial_state .*need is_causal=True"):
        op(q, k, v, initial_state=empty)


@ops(LLN_OPS)
@pytest.mark.parametrize("bad", ["state", {"kv": None}, (1, 2)], ids=repr)
def test_initial_state_wrong_type(op, bad):
    q, k, v = make()
    with pytest.raises(TypeError, match=r"initial_state must be an lln.LLNState"):
        op(q, k, v, is_causal=True, initial_state=bad)


@ops(LLN_OPS)
@pytest.mark.parametrize(
    "other", [(B + 1, H, D, DV), (B, H + 1, D, DV), (B, H, D + 1, DV), (B, H, D, DV + 1)],
    ids=["batch", "heads", "dim", "value_dim"],
)
@pytest.mark.parametrize("used", [False, True], ids=["empty", "used"])
def test_initial_state_of_other_shape(op, other, used):
    q, k, v = make()
    if used:
        qo, ko, vo = make(*other[:2], N, *other[2:])
        _, state = op(qo, ko, vo, is_causal=True, output_final_state=True)
    else:
        state = LLNState.empty(*other, dtype=torch.float64, device=q.device)
    with pytest.raises(ValueError, match=r"initial_state was made for \(batch, heads, dim"):
        op(q, k, v, is_causal=True, initial_state=state)


@ops(LLN_OPS)
def test_initial_state_of_other_dtype(op):
    q, k, v = make()
    _, state = op(q.float(), k.float(), v.float(), is_causal=True, output_final_state=True)
    with pytest.raises(TypeError, match=r"initial_state holds torch.float32"):
        op(q, k, v, is_causal=True, initial_state=state)


@pytest.mark.parametrize("n_first", [1, 4])
def test_lln_state_reused_by_lln_diag(n_first):
    q, k, v = make()
    _, state = lln_attention(
        q[:, :, :n_first], k[:, :, :n_first], v[:, :, :n_first], is_causal=True,
        output_final_state=True,
    )
    with pytest.raises(ValueError, match=r"initial_state belongs to lln_attention"):
        lln_diag_attention(q, k, v, is_causal=True, initial_state=state)


def test_lln_diag_state_reused_by_lln():
    q, k, v = make()
    _, state = lln_diag_attention(
        q[:, :, :1], k[:, :, :1], v[:, :, :1], is_causal=True, output_final_state=True
    )
    with pytest.raises(ValueError, match=r"initial_state belongs to lln_diag_attention"):
        lln_attention(q, k, v, is_causal=True, initial_state=state)


@pytest.mark.parametrize("n_first", [1, 3])
def test_lln_diag_state_reused_with_other_block_size(n_first):
    q, k, v = make()
    _, state = lln_diag_attention(
        q[:, :, :n_first], k[:, :, :n_first], v[:, :, :n_first], is_causal=True,
        block_size=2, output_final_state=True,
    )
    with pytest.raises(ValueError, match=r"initial_state .*block_size=2.*block_size=3"):
        lln_diag_attention(q, k, v, is_causal=True, block_size=3, initial_state=state)
    # default block_size is D (= 4), also different from 2
    with pytest.raises(ValueError, match=r"initial_state .*block_size"):
        lln_diag_attention(q, k, v, is_causal=True, initial_state=state)


@ops(LLN_OPS)
@pytest.mark.parametrize(
    "first, second",
    [
        ({"stats": "head"}, {"stats": "sequence"}),
        ({"stats": "sequence"}, {"stats": "head"}),
        ({"alpha": 1.0, "beta": 1.0}, {"stats": "head"}),
        ({"stats": "head"}, {"alpha": 1.0, "beta": 1.0}),
    ],
    ids=["head->sequence", "sequence->head", "given->head", "head->given"],
)
def test_state_reused_with_other_stats(op, first, second):
    q, k, v = make()
    _, state = op(q[:, :, :1], k[:, :, :1], v[:, :, :1], is_causal=True,
                  output_final_state=True, **first)
    with pytest.raises(ValueError, match=r"initial_state was built with stats="):
        op(q, k, v, is_causal=True, initial_state=state, **second)
