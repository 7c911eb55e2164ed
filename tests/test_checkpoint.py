"""``checkpoint=True``: activation checkpointing inside the causal LLN / LLN+Diag ops.

Since the causal kernels became autograd Functions with a hand-derived backward
(``lln.ops.lln_function``), ``checkpoint`` has no effect on the default path (tested at the
end); the checkpointing itself lives on in the autograd-through-ops reference path, which
every test here runs inside ``lln.ops.lln.reference_kernel()`` (autouse fixture).

The checkpointed ops must give the outputs and gradients of the plain ones (float64 to
1e-12; the recompute repeats the same operations), on lengths spanning several segments /
pieces and not multiples of any chunk, segment, block or piece size, with padding, with a
continued state, with gradients into alpha/beta and the mixing weights; checkpoint only
while autograd records; warn once about underflowed rows, not again in the recompute.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils.checkpoint
from conftest import make_qkv, padding_mask, rel_err
from torch.autograd import gradcheck

import lln
import lln.ops.lln_diag

OPS = {"lln": lln.lln_attention, "lln_diag": lln.lln_diag_attention}
CHUNK = 4  # segments of 16 * 4 = 64 tokens
PIECE = 50  # LLN+Diag pieces (1024 tokens in the library), patched small to stay fast


@pytest.fixture(autouse=True)
def reference_path(request):
    """The reference kernel (where checkpointing happens), except for tests marked
    ``default_path``."""
    if "default_path" in request.keywords:
        yield
        return
    with lln.ops.lln.reference_kernel():
        yield


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(lln.ops.lln_diag, "PIECE_TOKENS", PIECE)


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts the calls of ``torch.utils.checkpoint.checkpoint`` (the op uses it by module)."""
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


def _run(op, leaves, extra, *, checkpoint, chained):
    """Causal output over the whole sequence: one call, or two chained through the state."""
    fn = OPS[op]
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    options = {name: t for name, t in leaves.items() if name not in "qkv"}
    options.update(extra, is_causal=True, chunk_size=CHUNK, checkpoint=checkpoint)
    if not chained:
        return fn(q, k, v, **options)
    mask = options.pop("key_padding_mask", None)
    outs, state = [], None
    for part in (slice(0, 70), slice(70, None)):  # cut mid-segment, mid-piece, mid-block
        out, state = fn(
            q[:, :, part], k[:, :, part], v[:, :, part], initial_state=state,
            output_final_state=True, key_padding_mask=None if mask is None else mask[:, part],
            **options,
        )
        outs.append(out)
    return torch.cat(outs, 2)


def _leaves(op, q, k, v, scales):
    """q, k, v and the tensor options that receive gradients, as fresh leaves."""
    leaves = {"q": q, "k": k, "v": v}
    if scales == "tensors":
        leaves["alpha"] = torch.tensor([[[[0.9]], [[1.3]]]], dtype=q.dtype)
        leaves["beta"] = torch.full((1, 1, 1, 1), 0.7, dtype=q.dtype)
    if op == "lln_diag":
        leaves["lln_weight"] = torch.linspace(0.2, 0.8, v.shape[-1], dtype=q.dtype)
    return {name: t.detach().clone().requires_grad_(True) for name, t in leaves.items()}


def _outputs_and_grads(op, q, k, v, *, scales="moment_matched", masked=False,
                       chained=False):
    """``[(out, {name: grad}) for checkpoint in (False, True)]`` for a fixed output grad."""
    n = q.shape[2]
    extra = {"key_padding_mask": padding_mask(q.shape[0], n)} if masked else {}
    if op == "lln_diag":
        extra["block_size"] = 6
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).to(v.dtype)
    results = []
    for checkpoint in (False, True):
        leaves = _leaves(op, q, k, v, scales)
        out = _run(op, leaves, extra, checkpoint=checkpoint, chained=chained)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
        results.append((out, dict(zip(leaves, grads, strict=True))))
    return results


@pytest.mark.parametrize("chained", [False, True], ids=["one_call", "initial_state"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("scales", ["moment_matched", "tensors"])
@pytest.mark.parametrize("op", list(OPS))
def test_checkpoint_equals_plain(op, scales, masked, chained, small_pieces, checkpoint_calls):
    n = 203  # 3.2 segments of 64, 4.1 pieces of 50, 33.8 blocks of 6
    q, k, v = make_qkv(2, 2, n, 8, 5, sigma=1.5, seed=1)
    (out, grads), (out_ckpt, grads_ckpt) = _outputs_and_grads(
        op, q, k, v, scales=scales, masked=masked, chained=chained
    )
    # one checkpoint per segment (LLN) or piece (LLN+Diag), per call
    per_call = [-(-m // (16 * CHUNK if op == "lln" else PIECE)) for m in (70, n - 70)]
    assert len(checkpoint_calls) == (sum(per_call) if chained else -(-n // (
        16 * CHUNK if op == "lln" else PIECE)))
    assert all(call["use_reentrant"] is False for call in checkpoint_calls)
    assert rel_err(out_ckpt, out) <= 1e-12
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        assert rel_err(grads_ckpt[name], grad) <= 1e-12, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_checkpoint_in_low_precision(op, dtype, small_pieces):
    """float32 and bfloat16 inputs (float32 compute): the same outputs and gradients."""
    q, k, v = make_qkv(1, 2, 150, 8, sigma=1.0, dtype=dtype, seed=2)
    (out, grads), (out_ckpt, grads_ckpt) = _outputs_and_grads(
        op, q, k, v, scales="tensors", masked=True
    )
    assert out_ckpt.dtype == dtype and grads_ckpt["q"].dtype == dtype
    assert rel_err(out_ckpt, out) <= 1e-6
    for name, grad in grads.items():
        assert rel_err(grads_ckpt[name], grad) <= 1e-6, name


@pytest.mark.parametrize("op", list(OPS))
def test_checkpoint_single_token(op):
    q, k, v = make_qkv(1, 2, 1, 8, seed=3)
    (out, grads), (out_ckpt, grads_ckpt) = _outputs_and_grads(op, q, k, v, scales="tensors")
    assert out_ckpt.shape == (1, 2, 1, 8)
    assert rel_err(out_ckpt, out) <= 1e-12
    for name, grad in grads.items():
        assert rel_err(grads_ckpt[name], grad) <= 1e-12, name


def test_gradcheck_with_checkpoint(monkeypatch):
    """Every input of both ops, through several segments / pieces with padding and a state
    (chunks of 1 token: segments of 16; pieces of 8). fast_mode: random projections of the
    Jacobian instead of every row (each backward recomputes every segment)."""
    monkeypatch.setattr(lln.ops.lln_diag, "PIECE_TOKENS", 8)
    n, cut = 35, 19
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 1, n, 3, 2, seed=4))
    mask = padding_mask(1, n)
    alpha = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    weight = torch.full((1, 1, 1, 2), 0.3, dtype=torch.float64, requires_grad=True)
    common = dict(is_causal=True, alpha=alpha, beta=0.9, chunk_size=1, checkpoint=True)

    def f(q, k, v, alpha, weight):
        common.update(alpha=alpha)
        diag = dict(common, block_size=5, lln_weight=weight, diag_weight=1 - weight)
        a = lln.lln_attention(q, k, v, key_padding_mask=mask, **common)
        b, state = lln.lln_diag_attention(
            q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], key_padding_mask=mask[:, :cut],
            output_final_state=True, **diag,
        )
        c = lln.lln_diag_attention(
            q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], key_padding_mask=mask[:, cut:],
            initial_state=state, **diag,
        )
        return torch.cat([a, b, c], 2)

    assert gradcheck(f, (q, k, v, alpha, weight), fast_mode=True)


@pytest.mark.parametrize("op", list(OPS))
def test_underflow_warns_once_not_again_in_the_recompute(op, small_pieces):
    """Rows lost to underflow (alpha = beta = 300) are reported by one warning per call,
    pointing at the caller, and backward (which recomputes every piece) adds none."""
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 200, 16, seed=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = OPS[op](q, k, v, is_causal=True, alpha=300.0, beta=300.0, checkpoint=True)
        assert len(caught) == 1
        out.sum().backward()
    assert len(caught) == 1
    assert issubclass(caught[0].category, RuntimeWarning)
    assert "underflowed" in str(caught[0].message) and caught[0].filename == __file__
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


@pytest.mark.parametrize("op", list(OPS))
def test_no_checkpoint_without_a_graph(op, checkpoint_calls):
    """Inference (no_grad, or nothing requiring grad) and non-causal calls run as is."""
    q, k, v = make_qkv(1, 2, 150, 8, seed=6)
    plain = OPS[op](q, k, v, is_causal=True, chunk_size=CHUNK)
    with torch.no_grad():
        out = OPS[op](q.requires_grad_(True), k, v, is_causal=True, chunk_size=CHUNK,
                      checkpoint=True)
    assert out.grad_fn is None and torch.equal(out, plain)
    out = OPS[op](q.detach(), k, v, is_causal=True, chunk_size=CHUNK, checkpoint=True)
    assert torch.equal(out, plain)
    full = OPS[op](q, k, v, checkpoint=True)
    assert full.requires_grad and torch.equal(full, OPS[op](q, k, v))
    assert checkpoint_calls == []


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bad", [1, None, torch.tensor(True), "yes"])
def test_checkpoint_must_be_a_bool(op, bad):
    q, k, v = make_qkv(1, 1, 5, 4)
    with pytest.raises(TypeError, match="checkpoint must be a bool"):
        OPS[op](q, k, v, is_causal=True, checkpoint=bad)


def test_layer_and_registry_pass_checkpoint_on(checkpoint_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 90, 16, dtype=torch.float64)
    layers = [lln.LLNAttention(16, 2, is_causal=True, chunk_size=CHUNK, combine="scale",
                               checkpoint=flag, dtype=torch.float64) for flag in (False, True)]
    layers[1].load_state_dict(layers[0].state_dict())
    grads = []
    for layer in layers:
        layer(x)[0].square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    assert checkpoint_calls and len(grads[1]) == len(grads[0]) > 4
    for a, b in zip(*grads, strict=True):
        assert rel_err(b, a) <= 1e-12
    with pytest.raises(TypeError, match="checkpoint must be a bool"):
        lln.LLNAttention(16, 2, checkpoint=1)
    calls = len(checkpoint_calls)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 40, 8))
    lln.get_attention("lln").fn(q, k, v, is_causal=True, checkpoint=True, chunk_size=CHUNK)
    assert len(checkpoint_calls) == calls + 1


@pytest.mark.default_path
@pytest.mark.parametrize("op", list(OPS))
def test_checkpoint_is_a_no_op_on_the_default_path(op, checkpoint_calls):
    """The autograd Function already recomputes segment by segment: ``checkpoint=True``
    gives the very same outputs and gradients and checkpoints nothing."""
    q, k, v = make_qkv(1, 2, 150, 8, 5, sigma=1.5, seed=7)
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).to(v.dtype)
    results = []
    for flag in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = OPS[op](*leaves, is_causal=True, chunk_size=CHUNK, checkpoint=flag)
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
    assert checkpoint_calls == []
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)
