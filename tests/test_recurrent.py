"""The recurrent step path (``lln.ops.recurrent``): short query blocks continuing a state.

Oracle: one parallel (chunked) call over the whole sequence. Decoding token by token, or in
blocks of up to ``STEP_MAX_TOKENS`` tokens, must give the same outputs (float64 <= 1e-12,
float32 <= 1e-5 max abs error) and a state that continues the sequence exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err

import lln
import lln.ops.lln as lln_module
import lln.ops.lln_diag as lln_diag_module
from lln.ops.recurrent import STEP_MAX_TOKENS

OPS = {"lln": lln.lln_attention, "lln_diag": lln.lln_diag_attention}


@contextmanager
def step_path_only():
    """Make the chunked path fail inside the block, so a test proves that the step path
    answered."""

    def chunked(*args, **kwargs):
        raise AssertionError("the chunked path ran")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lln_module, "lln_forward", chunked)
        mp.setattr(lln_diag_module, "lln_forward", chunked)
        yield


def left_padding(b: int, n: int) -> torch.Tensor:
    """Sample b has ``b * 7`` padding tokens at the start (sample 0 none)."""
    mask = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, : 7 * i] = False
    return mask


def decode(op, q, k, v, mask=None, *, block=1, state=None, **kwargs):
    """Run ``op`` over the sequence in blocks of ``block`` tokens, chaining the state."""
    outs = []
    for s in range(0, q.shape[2], block):
        e = s + block
        out, state = op(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
            key_padding_mask=None if mask is None else mask[:, s:e], initial_state=state,
            output_final_state=True, **kwargs,
        )
        outs.append(out)
    return torch.cat(outs, 2), state


def first_state(op, q, k, v, **kwargs):
    """The empty state the decoding starts from (the dtype of the sums follows q)."""
    b, h, _, d = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return lln.LLNState.empty(b, h, d, v.shape[-1], dtype=cdt, device=q.device)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("padding", ["none", "holes", "left"])
@pytest.mark.parametrize("n", [500, pytest.param(4096, marks=pytest.mark.slow)])
def test_token_by_token_equals_one_call(op, dtype, tol, padding, n, one_thread):
    """Acceptance (issue 11): 4096 tokens one at a time (slow; 500 in the default run)."""
    q, k, v = make_qkv(2, 2, n, 16, 8, sigma=1.0, dtype=dtype, seed=3)
    mask = {"none": None, "holes": padding_mask(2, n), "left": left_padding(2, n)}[padding]
    full, full_state = OPS[op](q, k, v, is_causal=True, key_padding_mask=mask,
                               output_final_state=True)
    with step_path_only():
        out, state = decode(OPS[op], q, k, v, mask, state=first_state(op, q, k, v))
    assert out.dtype == dtype
    assert (out - full).abs().max().item() <= tol
    assert state.position == n
    for name in ("kv", "k_sum", "k_max"):
        assert rel_err(getattr(state, name), getattr(full_state, name)) <= 10 * tol
    if op == "lln_diag":
        assert torch.equal(state.block_k, full_state.block_k)
        assert torch.equal(state.block_mask, full_state.block_mask)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("block", [2, 3, 5, STEP_MAX_TOKENS])
@pytest.mark.parametrize("stats", ["head", "sequence"])
def test_short_blocks_after_a_prefill_equal_one_call(op, block, stats):
    """Blocks of 2..STEP_MAX_TOKENS tokens, crossing diagonal-block boundaries (size 6),
    after a prefill of 37 tokens; padded batch, float64."""
    n, prefix = 37 + 4 * block + 1, 37
    q, k, v = make_qkv(2, 3, n, 8, 5, sigma=2.0, seed=1)
    mask = padding_mask(2, n, seed=2)
    kwargs = dict(stats=stats, block_size=6) if op == "lln_diag" else dict(stats=stats)
    full = OPS[op](q, k, v, is_causal=True, key_padding_mask=mask, **kwargs)
    head, state = OPS[op](
        q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], is_causal=True,
        key_padding_mask=mask[:, :prefix], output_final_state=True, **kwargs,
    )
    with step_path_only():
        tail, _ = decode(OPS[op], *(t[:, :, prefix:] for t in (q, k, v)), mask[:, prefix:],
                         block=block, state=state, **kwargs)
    assert rel_err(torch.cat([head, tail], 2), full) <= 1e-12


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alpha=0.8, beta=1.3),
        dict(alpha=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1),
             beta=torch.tensor(0.9, dtype=torch.float64)),
        dict(temperature=1.7),
        dict(constants="head_dim"),
    ],
    ids=["floats", "tensors", "temperature", "head_dim"],
)
def test_step_path_options_equal_one_call(op, kwargs):
    q, k, v = make_qkv(2, 3, 40, 8, 4, sigma=1.0, seed=4)
    full = OPS[op](q, k, v, is_causal=True, **kwargs)
    head, state = OPS[op](q[:, :, :20], k[:, :, :20], v[:, :, :20], is_causal=True,
                          output_final_state=True, **kwargs)
    with step_path_only():
        tail, _ = decode(OPS[op], *(t[:, :, 20:] for t in (q, k, v)), block=3, state=state,
                         **kwargs)
    assert rel_err(torch.cat([head, tail], 2), full) <= 1e-12


@pytest.mark.parametrize("op", list(OPS))
def test_longer_blocks_take_the_chunked_path(op):
    q, k, v = make_qkv(1, 1, STEP_MAX_TOKENS + 1, 4)
    state = first_state(op, q, k, v)
    with step_path_only(), pytest.raises(AssertionError, match="the chunked path ran"):
        OPS[op](q, k, v, is_causal=True, initial_state=state)


@pytest.mark.parametrize("op", list(OPS))
def test_states_own_their_memory_in_a_buffer_reusing_loop(op):
    """Decode loops refill one set of input buffers with ``copy_`` (static buffers, CUDA
    graphs): the state must not alias them, or earlier tokens change under it."""
    q, k, v = make_qkv(1, 2, 40, 8, 4, sigma=1.0, seed=6)
    full = OPS[op](q, k, v, is_causal=True, block_size=5) if op == "lln_diag" else OPS[op](
        q, k, v, is_causal=True)
    kwargs = dict(block_size=5) if op == "lln_diag" else {}
    bq, bk, bv = (torch.empty_like(t[:, :, :1]) for t in (q, k, v))
    state, outs = first_state(op, q, k, v), []
    inputs = {bq.untyped_storage().data_ptr(), bk.untyped_storage().data_ptr(),
              bv.untyped_storage().data_ptr()}
    for t in range(40):
        bq.copy_(q[:, :, t:t + 1])
        bk.copy_(k[:, :, t:t + 1])
        bv.copy_(v[:, :, t:t + 1])
        out, state = OPS[op](bq, bk, bv, is_causal=True, initial_state=state,
                             output_final_state=True, **kwargs)
        outs.append(out.clone())
        held = [x for x in (state.kv, state.k_sum, state.k_max, state.block_k, state.block_v)
                if x is not None and x.numel()]
        assert not inputs & {x.untyped_storage().data_ptr() for x in held}
    assert rel_err(torch.cat(outs, 2), full) <= 1e-12


@pytest.mark.parametrize("op", list(OPS))
def test_step_path_gradients_equal_the_chunked_path(op):
    """Gradients through a prefill + 3 decoded tokens + a block of 4 equal those of one
    call (the offsets carry no gradient on either path)."""
    q, k, v = make_qkv(2, 2, 27, 6, 5, sigma=1.0, seed=7)
    alpha = torch.tensor([0.7, 1.2], dtype=torch.float64).view(1, 2, 1, 1)
    weight = torch.tensor(0.3, dtype=torch.float64)
    extra = dict(lln_weight=weight, block_size=4) if op == "lln_diag" else {}
    mask = padding_mask(2, 27)

    def grads(split: bool):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, alpha)]
        if op == "lln_diag":
            leaves.append(weight.clone().requires_grad_(True))
            extra["lln_weight"] = leaves[-1]
        qq, kk, vv, aa = leaves[:4]
        kwargs = dict(alpha=aa, beta=1.1, **extra)
        if not split:
            out = OPS[op](qq, kk, vv, is_causal=True, key_padding_mask=mask, **kwargs)
        else:
            outs, state = [], None
            for s, e in ((0, 20), (20, 21), (21, 22), (22, 23), (23, 27)):
                o, state = OPS[op](qq[:, :, s:e], kk[:, :, s:e], vv[:, :, s:e],
                                   is_causal=True, key_padding_mask=mask[:, s:e],
                                   initial_state=state, output_final_state=True, **kwargs)
                outs.append(o)
            out = torch.cat(outs, 2)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return [t.grad for t in leaves]

    for a, b in zip(grads(False), grads(True), strict=True):
        assert rel_err(b, a) <= 1e-12


@pytest.mark.parametrize("op", list(OPS))
def test_half_precision_inputs_decode_like_one_call(op):
    q, k, v = make_qkv(1, 2, 64, 16, sigma=1.0, dtype=torch.bfloat16, seed=8)
    full = OPS[op](q, k, v, is_causal=True)
    with step_path_only():
        out, state = decode(OPS[op], q, k, v, state=first_state(op, q, k, v))
    assert out.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    assert rel_err(out, full) <= 2e-2  # one bf16 rounding of the output, plus the inputs'


def test_a_sequence_with_no_real_key_yet_gives_zeros():
    """Left padding: rows before the first real key see nothing and are 0, not NaN."""
    q, k, v = make_qkv(1, 1, 6, 4)
    mask = torch.tensor([[False, False, False, True, True, True]])
    with step_path_only():
        out, state = decode(lln.lln_attention, q, k, v, mask, state=first_state(None, q, k, v))
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isfinite(out).all() and out[:, :, 3:].abs().sum() > 0


@pytest.mark.parametrize("stats", ["head", "sequence"])
@pytest.mark.parametrize("dim", [1, 4, 16])
def test_step_scales_equal_chunked_scales_with_few_entries(dim, stats):
    """Token by token, the step path's scales are the chunked path's, including the rule for
    statistics over fewer than MIN_COUNT entries (head dims below 16)."""
    from lln.ops.recurrent import step_moments

    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 3, 12, dim, generator=g, dtype=torch.float64) + 0.5
    k = torch.randn(2, 3, 12, dim, generator=g, dtype=torch.float64) - 0.3
    alpha, beta = lln.moment_match(q, k, is_causal=True, stats=stats, temperature=1.5)
    moments = None
    for t in range(12):
        a_t, b_t, moments = step_moments(
            q[:, :, t:t + 1], k[:, :, t:t + 1], None, moments, stats=stats, temperature=1.5,
            constants="paper",
        )
        torch.testing.assert_close(a_t, alpha[:, :, t:t + 1], rtol=1e-12, atol=0)
        torch.testing.assert_close(b_t, beta[:, :, t:t + 1], rtol=1e-12, atol=0)
