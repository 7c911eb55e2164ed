"""``torch.compile``: the ops trace into one graph (``fullgraph=True``: any graph break
raises) and the compiled ops equal eager.

The default run traces with the ``"eager"`` backend (Dynamo only: seconds); the Inductor
comparisons compile real kernels (a minute or more on 2 cores) and are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err
from torch._dynamo.testing import CompileCounter

import lln

OPS = {"lln": lln.lln_attention, "lln_diag": lln.lln_diag_attention}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def decode_steps(fn, state, steps: int, *, seed: int = 0, **kwargs):
    """``steps`` single-token calls of ``fn`` continuing ``state``; returns outputs, state."""
    b, h, d, dv = state.shape
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        q, k = (torch.randn(b, h, 1, d, generator=g) for _ in range(2))
        v = torch.randn(b, h, 1, dv, generator=g)
        out, state = fn(q, k, v, is_causal=True, initial_state=state, output_final_state=True,
                        **kwargs)
        outs.append(out)
    return torch.cat(outs, 2), state


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("scales", ["moments", pytest.param("given", marks=pytest.mark.slow)])
def test_decode_step_is_one_graph_and_recompiles_a_bounded_number_of_times(op, scales):
    """fullgraph=True raises on any graph break. The position (and for LLN+Diag the length
    of the unfinished block) change every step: after the first recompile they are traced
    as dynamic sizes, so 2 * block_size steps need only a few graphs."""
    kwargs = dict(alpha=0.9, beta=1.1) if scales == "given" else {}
    if op == "lln_diag":
        kwargs["block_size"] = 6
    q, k, v = make_qkv(2, 3, 20, 8, dtype=torch.float32)
    with torch.no_grad():
        _, state = OPS[op](q, k, v, is_causal=True, output_final_state=True, **kwargs)
        counter = CompileCounter()
        compiled = torch.compile(OPS[op], fullgraph=True, backend=counter)
        out, end = decode_steps(compiled, state, 12, **kwargs)
        ref, ref_end = decode_steps(OPS[op], state, 12, **kwargs)
    assert 1 <= counter.frame_count <= 4
    assert rel_err(out, ref) <= 1e-6 and rel_err(end.kv, ref_end.kv) <= 1e-6


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_whole_sequence_call_is_one_graph(op, is_causal):
    """Inference: the prefill (several segments of the causal kernel) and the non-causal
    op, padded: one graph each."""
    q, k, v = (t.float() for t in make_qkv(2, 2, 300, 8))
    mask = padding_mask(2, 300)
    counter = CompileCounter()
    compiled = torch.compile(OPS[op], fullgraph=True, backend=counter)
    with torch.no_grad():
        out = compiled(q, k, v, is_causal=is_causal, key_padding_mask=mask, chunk_size=16)
        ref = OPS[op](q, k, v, is_causal=is_causal, key_padding_mask=mask, chunk_size=16)
    assert counter.frame_count == 1
    assert rel_err(out, ref) <= 1e-6


_BACKWARD_BREAK = pytest.mark.xfail(
    strict=True, raises=torch._dynamo.exc.Unsupported,
    reason="the kernel's autograd Functions break the training graph: causal backward "
    "writes into a non-contiguous out= tensor, the non-causal LLN+Diag backward calls "
    "torch.autograd.grad (lln/ops/lln_function.py)",
)


@pytest.mark.parametrize(("op", "is_causal"), [
    ("lln", False),
    pytest.param("lln", True, marks=_BACKWARD_BREAK),
    pytest.param("lln_diag", False, marks=_BACKWARD_BREAK),
    pytest.param("lln_diag", True, marks=_BACKWARD_BREAK),
])
def test_training_call_is_one_graph(op, is_causal):
    """Forward and backward under fullgraph=True (gradients equal eager)."""
    q, k, v = (t.float().requires_grad_(True) for t in make_qkv(2, 2, 300, 8))
    mask = padding_mask(2, 300)
    counter = CompileCounter()
    compiled = torch.compile(OPS[op], fullgraph=True, backend=counter)
    out = compiled(q, k, v, is_causal=is_causal, key_padding_mask=mask, chunk_size=16)
    out.sum().backward()
    grad = q.grad.clone()
    q.grad = None
    ref = OPS[op](q, k, v, is_causal=is_causal, key_padding_mask=mask, chunk_size=16)
    ref.sum().backward()
    assert counter.frame_count == 1
    assert rel_err(out, ref) <= 1e-6 and rel_err(grad, q.grad) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
def test_inductor_decode_step_equals_eager(op):
    q, k, v = make_qkv(1, 4, 100, 16, dtype=torch.float32)
    with torch.no_grad():
        _, state = OPS[op](q, k, v, is_causal=True, output_final_state=True)
        compiled = torch.compile(OPS[op], fullgraph=True)
        out, end = decode_steps(compiled, state, 70)
        ref, ref_end = decode_steps(OPS[op], state, 70)
    assert (out - ref).abs().max().item() <= 1e-5
    assert rel_err(end.kv, ref_end.kv) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_inductor_whole_sequence_equals_eager(op, is_causal):
    q, k, v = make_qkv(2, 2, 500, 16, dtype=torch.float32)
    mask = padding_mask(2, 500)
    compiled = torch.compile(OPS[op], fullgraph=True)
    out = compiled(q, k, v, is_causal=is_causal, key_padding_mask=mask)
    ref = OPS[op](q, k, v, is_causal=is_causal, key_padding_mask=mask)
    assert (out - ref).abs().max().item() <= 1e-5
