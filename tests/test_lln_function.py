"""The causal kernels as autograd Functions with a hand-derived backward (lln.ops.lln_function).

Checked against the autograd-through-ops kernel (``lln.ops.lln.reference_kernel()``, the
previous implementation): float64 gradients to 1e-10 with masks, odd N, N = 1, chained
states (gradients into the initial state and from the final state), tensor alpha/beta and
mixing weights; float64 ``gradcheck``; float32 / bfloat16 at their tolerances; double
backward raises. Plus the regression tests of issue 17 bugs 1, 2, 4 (NaN gradients from a
subnormal denominator, states aliasing the inputs, eps depending on the chunking) and
strict causality for non-finite inputs (NaN / +-Inf in q or k at token t leaves every row
before t bit for bit unchanged).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err
from torch.autograd import gradcheck

import lln
from lln.ops.lln import reference_kernel

OPS = {"lln": lln.lln_attention, "lln_diag": lln.lln_diag_attention}


def _leaves(op, q, k, v, scales, weights):
    leaves = {"q": q, "k": k, "v": v}
    if scales == "tensors":  # per (batch, head) and per head
        leaves["alpha"] = torch.tensor([[[[0.9]], [[1.3]]]], dtype=q.dtype).expand(
            q.shape[0], 2, 1, 1
        ) + torch.arange(q.shape[0], dtype=q.dtype).view(-1, 1, 1, 1) * 0.1
        leaves["beta"] = torch.full((1, 2, 1, 1), 0.7, dtype=q.dtype)
    if op == "lln_diag" and weights:
        leaves["lln_weight"] = torch.linspace(0.2, 0.8, v.shape[-1], dtype=q.dtype)
        leaves["diag_weight"] = torch.tensor([[[[0.6]], [[0.3]]]], dtype=q.dtype)
    return {name: t.detach().clone().requires_grad_(True) for name, t in leaves.items()}


def _loss(op, leaves, *, mask, chunk, cuts, reference, extra_state_loss=True):
    """Output (and a loss using the final state) over the whole sequence, cut into calls
    at ``cuts`` and chained through the state."""
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    options = {name: t for name, t in leaves.items() if name not in "qkv"}
    options.update(is_causal=True, chunk_size=chunk)
    if op == "lln_diag":
        options["block_size"] = 6
    n = q.shape[2]
    bounds = [0, *cuts, n]
    outs, state = [], None
    with reference_kernel() if reference else contextlib.nullcontext():
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = slice(lo, hi)
            out, state = OPS[op](
                q[:, :, part], k[:, :, part], v[:, :, part], initial_state=state,
                output_final_state=True,
                key_padding_mask=None if mask is None else mask[:, part], **options,
            )
            outs.append(out)
    out = torch.cat(outs, 2)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    loss = (out * grad_out).sum()
    if extra_state_loss:  # gradients FROM the final state (the context-parallel helper)
        loss = loss + (state.kv.square().sum() * 0.3 + state.k_sum.sum() * 0.7).to(out.dtype)
        if op == "lln_diag" and state.block_k.shape[2]:
            loss = loss + (state.block_k.square().sum() + state.block_v.sum()).to(out.dtype)
    return out, loss


def _grads(op, q, k, v, *, scales, weights=True, mask=None, chunk=4, cuts=(), reference):
    leaves = _leaves(op, q, k, v, scales, weights)
    out, loss = _loss(op, leaves, mask=mask, chunk=chunk, cuts=cuts, reference=reference)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, dict(zip(leaves, grads, strict=True))


CASES = {
    "plain": dict(n=203),
    "mask": dict(n=203, masked=True),
    "chained": dict(n=203, cuts=(70, 71, 150)),
    "chained_mask": dict(n=203, masked=True, cuts=(3, 130)),
    "odd_short": dict(n=7, cuts=(2,)),
    "one_token": dict(n=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scales", ["moment_matched", "tensors"])
@pytest.mark.parametrize("op", list(OPS))
def test_gradients_equal_the_reference_float64(op, scales, case):
    cfg = CASES[case]
    q, k, v = make_qkv(2, 2, cfg["n"], 8, 5, sigma=1.5, seed=1)
    mask = padding_mask(2, cfg["n"]) if cfg.get("masked") else None
    kw = dict(scales=scales, mask=mask, cuts=cfg.get("cuts", ()))
    out_ref, ref = _grads(op, q, k, v, reference=True, **kw)
    out, got = _grads(op, q, k, v, reference=False, **kw)
    assert rel_err(out, out_ref) <= 1e-12
    assert got.keys() == ref.keys()
    for name in ref:
        # (absolute, scaled by max(1, |ref|): with one token the exact q gradient is 0)
        assert (got[name] - ref[name]).abs().max() <= 1e-10 * max(1.0, ref[name].abs().max())


def test_gradients_into_the_initial_state_equal_the_reference():
    """A state that requires grad (as the context-parallel helper passes between ranks):
    the gradient reaching its kv and k_sum equals the reference path's."""
    q, k, v = make_qkv(1, 2, 90, 6, 4, sigma=1.2, seed=3)
    grads = []
    for reference in (True, False):
        _, state = lln.lln_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], is_causal=True,
                                     output_final_state=True)
        kv = state.kv.detach().requires_grad_(True)
        k_sum = state.k_sum.detach().requires_grad_(True)
        state.kv, state.k_sum = kv, k_sum
        with reference_kernel() if reference else contextlib.nullcontext():
            out, final = lln.lln_attention(
                q[:, :, 40:], k[:, :, 40:], v[:, :, 40:], is_causal=True, chunk_size=8,
                initial_state=state, output_final_state=True,
            )
        loss = out.sin().sum() + final.kv.sum() * 0.5 - final.k_sum.square().sum()
        grads.append(torch.autograd.grad(loss, (kv, k_sum)))
    for ref, got in zip(*grads, strict=True):
        assert ref.abs().max() > 0
        assert rel_err(got, ref) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_gradients_in_low_precision(op, dtype):
    """float32 / bfloat16 inputs (float32 compute): the Function's gradients agree with the
    reference path's, both measured against float64 gradients."""
    q, k, v = make_qkv(1, 2, 150, 8, sigma=1.0, seed=2)
    mask = padding_mask(1, 150)
    _, exact = _grads(op, q, k, v, scales="tensors", mask=mask, cuts=(61,), reference=False)
    low = [t.to(dtype) for t in (q, k, v)]
    _, ref = _grads(op, *low, scales="tensors", mask=mask, cuts=(61,), reference=True)
    _, got = _grads(op, *low, scales="tensors", mask=mask, cuts=(61,), reference=False)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for name in exact:
        assert got[name].dtype == dtype
        err_ref, err_got = rel_err(ref[name], exact[name]), rel_err(got[name], exact[name])
        assert err_got <= max(tol, 2 * err_ref), name


def test_gradcheck_float64():
    """Every differentiable input: q, k, v, alpha, beta, the mixing weights and the initial
    state's sums, through several segments (chunks of 1 token: segments of 16) with padding,
    a continued state and a loss on the final state."""
    n, cut = 37, 19
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 1, n, 3, 2, seed=4))
    mask = padding_mask(1, n)
    alpha = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    beta = torch.full((1, 1, 1, 1), 0.8, dtype=torch.float64, requires_grad=True)
    weight = torch.full((1, 1, 1, 2), 0.3, dtype=torch.float64, requires_grad=True)
    _, s0 = lln.lln_attention(*(t.detach() for t in (q, k, v)), is_causal=True, alpha=1.0,
                              beta=1.0, output_final_state=True)
    kv0 = s0.kv.clone().requires_grad_(True)
    ks0 = s0.k_sum.clone().requires_grad_(True)

    def f(q, k, v, alpha, beta, weight, kv0, ks0):
        common = dict(is_causal=True, alpha=alpha, beta=beta, chunk_size=1)
        diag = dict(common, block_size=5, lln_weight=weight, diag_weight=1 - weight)
        state = lln.LLNState(kv=kv0, k_sum=ks0, k_max=s0.k_max, position=n)
        a, final = lln.lln_attention(q, k, v, key_padding_mask=mask, initial_state=state,
                                     output_final_state=True, **common)
        outs, state = [a], None
        for part in (slice(0, cut), slice(cut, None)):  # LLN+Diag chained through its state
            out, state = lln.lln_diag_attention(
                q[:, :, part], k[:, :, part], v[:, :, part], key_padding_mask=mask[:, part],
                initial_state=state, output_final_state=True, **diag,
            )
            outs.append(out)
        return torch.cat(outs, 2), final.kv, final.k_sum

    assert gradcheck(f, (q, k, v, alpha, beta, weight, kv0, ks0), fast_mode=True)


@pytest.mark.parametrize("op", list(OPS))
def test_double_backward_raises(op):
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 1, 20, 4, seed=5))
    out = OPS[op](q, k, v, is_causal=True, alpha=1.0, beta=1.0)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


# --- issue 17, bug 1: gradients finite wherever the forward is ---------------------------


def test_subnormal_denominator_gives_exact_finite_gradients():
    """alpha = beta = 1, q = [[92, 0]] * 2, k = [[0, 92]] * 2: the normalised denominator is
    subnormal in float32; the output is the running mean of v and the gradients (of the
    sum) are q: 0, k: [[-0.5, -0.5], [0.5, 0.5]], v: [[1.5, 1.5], [0.5, 0.5]] (previously
    NaN / inf)."""
    a = 92.0
    q = torch.tensor([[[[a, 0.0], [a, 0.0]]]], requires_grad=True)
    k = torch.tensor([[[[0.0, a], [0.0, a]]]], requires_grad=True)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    out = lln.lln_attention(q, k, v, is_causal=True, alpha=1.0, beta=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 2.0], [2.0, 3.0]]]]))
    out.sum().backward()
    # (precision: that of float32 subnormals, ~1e-5 relative, as in the forward)
    torch.testing.assert_close(q.grad, torch.zeros_like(q), atol=1e-4, rtol=0)
    torch.testing.assert_close(k.grad, torch.tensor([[[[-0.5, -0.5], [0.5, 0.5]]]]), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(v.grad, torch.tensor([[[[1.5, 1.5], [0.5, 0.5]]]]), atol=1e-4,
                               rtol=0)


@pytest.mark.parametrize(("op", "sigma"), [("lln", 4.0), ("lln_diag", 4.5)])
def test_large_inputs_give_finite_gradients_close_to_float64(op, sigma):
    """Default moment matching at sigma = 4 (4,160 non-finite gradient entries before the
    fix) and 4.5 for LLN+Diag: every gradient finite and as close to the float64 gradient as
    the forward is to the float64 output (at sigma = 4.5 the float32 forward itself is only
    good to 2.5e-3: its offsets are at the end of float32's range)."""
    q, k, v = make_qkv(1, 4, 256, 64, sigma=sigma, seed=2)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = OPS[op](*leaves, is_causal=True)
        assert bool(torch.isfinite(out).all())
        grads[dtype] = out, torch.autograd.grad(out.sum(), leaves)
    forward_err = rel_err(grads[torch.float32][0], grads[torch.float64][0])
    for low, exact in zip(grads[torch.float32][1], grads[torch.float64][1], strict=True):
        assert bool(torch.isfinite(low).all())
        assert rel_err(low, exact) <= max(1e-4, 3 * forward_err)


@pytest.mark.parametrize("op", list(OPS))
def test_rows_set_to_zero_get_zero_gradient(op):
    """Rows whose every term underflows (alpha = beta = 300, a RuntimeWarning) and rows that
    see no real key (left padding) are 0 in the output and pass no gradient: q's gradient
    is exactly 0 there and every gradient is finite."""
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 200, 16, dtype=torch.float32))
    with pytest.warns(RuntimeWarning, match="underflowed"):
        out = lln.lln_attention(q, k, v, is_causal=True, alpha=300.0, beta=300.0)
    lost = (out == 0).all(-1)
    assert bool(lost.any())
    out.sum().backward()
    for t in (q, k, v):
        assert bool(torch.isfinite(t.grad).all())
    assert bool((q.grad[lost] == 0).all())

    mask = torch.ones(1, 50, dtype=torch.bool)
    mask[:, :7] = False
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 50, 8))
    OPS[op](q, k, v, is_causal=True, key_padding_mask=mask).square().sum().backward()
    assert bool((q.grad[:, :, :7] == 0).all()) and bool((k.grad[:, :, :7] == 0).all())
    assert bool(torch.isfinite(q.grad).all())


# --- issue 17, bug 4: eps on the true denominator ----------------------------------------


def test_eps_is_added_to_the_true_denominator():
    """eps > 0: the same result for every chunk size and split, equal to the float64
    oracle sum_j w_ij v_j / (eps + sum_j w_ij) (causal and non-causal)."""
    q, k, v = make_qkv(1, 1, 200, 16, sigma=2.0)
    eps = 1e-6
    qs, ks = 0.5 * q, 0.5 * k
    weights = torch.exp(qs.unsqueeze(3) + ks.unsqueeze(2)).sum(-1)  # (B, H, N, N)
    for is_causal in (True, False):
        weights_c = weights.tril() if is_causal else weights
        oracle = (weights_c @ v) / (weights_c.sum(-1, keepdim=True) + eps)
        for chunk in (1, 7, 64):
            out = lln.lln_attention(q, k, v, is_causal=is_causal, alpha=0.5, beta=0.5, eps=eps,
                                    chunk_size=chunk)
            assert rel_err(out, oracle) <= 1e-12
    one = lln.lln_attention(q, k, v, is_causal=True, eps=eps, chunk_size=64)
    assert rel_err(lln.lln_attention(q, k, v, is_causal=True, eps=eps, chunk_size=1), one) <= 1e-12
    o1, s = lln.lln_attention(q[:, :, :100], k[:, :, :100], v[:, :, :100], is_causal=True,
                              eps=eps, output_final_state=True)
    o2 = lln.lln_attention(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:], is_causal=True,
                           eps=eps, initial_state=s)
    assert rel_err(torch.cat([o1, o2], 2), one) <= 1e-12
    # eps now means something: it shrinks rows with a small true denominator
    assert rel_err(one, lln.lln_attention(q, k, v, is_causal=True)) > 0


# --- issue 17, bug 2: states own their memory --------------------------------------------


def test_state_does_not_alias_the_inputs():
    """A decode loop refilling one-token buffers (copy_) equals the one-call result."""
    q, k, v = make_qkv(1, 1, 10, 4)
    ref = lln.lln_diag_attention(q, k, v, is_causal=True, block_size=4)
    kbuf = k[:, :, :5].clone()
    _, state = lln.lln_diag_attention(q[:, :, :5], kbuf, v[:, :, :5], is_causal=True,
                                      block_size=4, output_final_state=True)
    snapshot = state.block_k.clone()
    kbuf.zero_()
    assert torch.equal(state.block_k, snapshot)
    buffers = [torch.empty(1, 1, 1, 4, dtype=torch.float64) for _ in range(3)]
    state, outs = None, []
    for t in range(10):
        for buf, src in zip(buffers, (q, k, v), strict=True):
            buf.copy_(src[:, :, t : t + 1])
        out, state = lln.lln_diag_attention(*buffers, is_causal=True, block_size=4,
                                            initial_state=state, output_final_state=True)
        outs.append(out.clone())
    assert (torch.cat(outs, 2) - ref).abs().max() <= 1e-12


# --- issue 16: NaN / Inf locality in causal mode -----------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("scales", ["moment_matched", "explicit"])
@pytest.mark.parametrize("op", list(OPS))
def test_non_finite_token_leaves_earlier_rows_unchanged(op, scales, where, value):
    """A NaN / +-Inf in q or k at token t (mid-chunk, mid-block) leaves every output before t
    bit for bit as without it — as causal SDPA does. (Masked future keys are removed with
    masked_fill, not multiplied by a zero weight.)"""
    q, k, v = make_qkv(1, 2, 300, 8, dtype=torch.float32, seed=9)
    kw = dict(is_causal=True) if scales == "moment_matched" else dict(
        is_causal=True, alpha=1.0, beta=1.0)
    clean = OPS[op](q, k, v, **kw)
    t = 200  # chunk of 64: rows 192..199 share its chunk
    bad = {"q": q.clone(), "k": k.clone()}
    bad[where][:, :, t, 3] = value
    out = OPS[op](bad["q"], bad["k"], v, **kw)
    assert torch.equal(out[:, :, :t], clean[:, :, :t])


@pytest.mark.parametrize("op", list(OPS))
def test_nan_in_v_stays_inside_its_chunk(op):
    """A NaN in v at token t reaches the rows of t's chunk (it enters the chunk's matmul,
    0 * NaN = NaN) but no row of an earlier chunk. (Causal SDPA on CPU spreads it to every
    row.) Documented in docs/benchmarks.md."""
    q, k, v = make_qkv(1, 2, 300, 8, dtype=torch.float32, seed=9)
    clean = OPS[op](q, k, v, is_causal=True, chunk_size=64)
    v2 = v.clone()
    v2[:, :, 200, 0] = float("nan")
    out = OPS[op](q, k, v2, is_causal=True, chunk_size=64)
    assert torch.equal(out[:, :, :192], clean[:, :, :192])


@pytest.mark.parametrize("op", list(OPS))
def test_nan_in_v_reaches_every_later_row(op):
    """The carried state is a batched matmul over the chunks with the non-finite entries
    kept out of it: they must still reach every later row (NaN, not a silently finite
    output), in the value dim they came from only (as a sequential scan would)."""
    q, k, v = make_qkv(1, 2, 300, 8, dtype=torch.float32, seed=9)
    v2 = v.clone()
    v2[:, :, 200, 0] = float("nan")
    out = OPS[op](q, k, v2, is_causal=True, chunk_size=16)
    assert bool(torch.isnan(out[:, :, 200:, 0]).all())
    if op == "lln":  # (LLN+Diag's block softmax spreads it over its block's rows)
        assert bool(torch.isfinite(out[:, :, :, 1:]).all())


# --- the non-causal Function -------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "n_q", "n_k", "masked", "scales"),
    [("lln", 50, 50, False, "moment_matched"), ("lln", 70, 2100, True, "tensors"),
     ("lln", 2100, 40, True, "moment_matched"), ("lln", 1, 1, False, "tensors"),
     ("lln_diag", 203, 203, True, "tensors"), ("lln_diag", 2100, 2100, False, "tensors"),
     ("lln_diag", 1, 1, False, "moment_matched")],
)
def test_noncausal_gradients_equal_the_reference_float64(op, n_q, n_k, masked, scales):
    """Self- and cross-attention shapes spanning several segments of 1024 tokens; LLN+Diag
    with its mixing weights."""
    results = []
    for reference in (True, False):
        q, _, _ = make_qkv(2, 2, n_q, 8, 5, sigma=1.5, seed=1)
        _, k, v = make_qkv(2, 2, n_k, 8, 5, sigma=1.5, seed=2)
        leaves = _leaves(op, q, k, v, scales, weights=True)
        options = {name: t for name, t in leaves.items() if name not in "qkv"}
        if op == "lln_diag":
            options["block_size"] = 6
        if masked:
            options["key_padding_mask"] = padding_mask(2, n_k)
        with reference_kernel() if reference else contextlib.nullcontext():
            out = OPS[op](leaves["q"], leaves["k"], leaves["v"], **options)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5),
                               dtype=out.dtype)
        results.append((out, torch.autograd.grad(out, list(leaves.values()), grad_out)))
    (out_ref, ref), (out, got) = results
    assert rel_err(out, out_ref) <= 1e-12
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max())


def test_noncausal_gradcheck_float64():
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 9, 3, 2, seed=4))
    alpha = torch.tensor(1.1, dtype=torch.float64, requires_grad=True)
    beta = torch.full((1, 2, 1, 1), 0.8, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(1, 9)
    assert gradcheck(
        lambda *a: lln.lln_attention(*a[:3], alpha=a[3], beta=a[4], key_padding_mask=mask),
        (q, k, v, alpha, beta),
    )
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (g,) = torch.autograd.grad(lln.lln_attention(q, k, v).square().sum(), q,
                                   create_graph=True)
        g.sum().backward()
