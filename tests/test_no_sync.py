"""No host synchronisation on the hot path: every op runs forward and backward on ``meta``
tensors, which have shapes and dtypes but no data, so any ``.item()``, ``int(t)``,
``bool(t)`` or data-dependent Python branch raises. (On an accelerator each of those would
stall the host once per call.) Debug mode (``lln.set_debug``) is the documented exception.
"""

from __future__ import annotations

import pytest
import torch

import lln
from lln.ops.registry import ATTENTIONS

META = torch.device("meta")
B, H, N, D = 2, 3, 40, 8


def meta_qkv(n: int = N, *, grad: bool = True, dtype=torch.float32):
    q, k, v = (torch.empty(B, H, n, D, device=META, dtype=dtype) for _ in range(3))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def meta_mask(n: int = N) -> torch.Tensor:
    return torch.empty(B, n, dtype=torch.bool, device=META)


def run_backward(out: torch.Tensor, *leaves: torch.Tensor) -> None:
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.device == META


def test_meta_tensors_do_fail_on_a_host_read():
    """The check can fail: reading a meta tensor's value raises."""
    x = torch.empty(3, device=META)
    for read in (lambda: bool((x > 0).all()), lambda: int(x.sum()), lambda: x.max().item()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def test_debug_mode_reads_values_so_it_fails_on_meta():
    q, k, v = meta_qkv(grad=False)
    alpha = torch.ones(1, H, 1, 1, device=META)
    lln.set_debug(True)
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            lln.lln_attention(q, k, v, alpha=alpha, beta=alpha)
    finally:
        lln.set_debug(False)


REGISTRY = [
    pytest.param(name, causal, masked, id=f"{name}-{'causal' if causal else 'full'}"
                 f"{'-masked' if masked else ''}")
    for name, spec in ATTENTIONS.items()
    for causal in (False, True)
    for masked in (False, True)
    if (spec.supports_causal or not causal) and (spec.supports_padding or not masked)
]


@pytest.mark.parametrize(("name", "causal", "masked"), REGISTRY)
def test_registry_op_forward_backward_on_meta(name, causal, masked):
    q, k, v = meta_qkv()
    mask = meta_mask() if masked else None
    out = ATTENTIONS[name].fn(q, k, v, is_causal=causal, key_padding_mask=mask)
    assert out.shape == (B, H, N, D) and out.device == META
    run_backward(out, q, k, v)


LLN_OPS = {"lln": lln.lln_attention, "lln_diag": lln.lln_diag_attention}


@pytest.mark.parametrize("op", list(LLN_OPS))
@pytest.mark.parametrize("new_tokens", [1, 5, 100], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("scales", ["moments", "tensors"])
def test_chained_lln_ops_on_meta(op, new_tokens, masked, scales):
    """Prefill then continue with 1 (decode), 5 (step block) or 100 (chunked) tokens;
    tensor alpha, beta and mixing weights (whose values are not read outside debug mode);
    chunk and piece sizes small enough to run several segments."""
    q, k, v = meta_qkv(70)
    kwargs: dict = {"chunk_size": 8}
    leaves = [q, k, v]
    if scales == "tensors":
        alpha = torch.empty(1, H, 1, 1, device=META, requires_grad=True)
        kwargs.update(alpha=alpha, beta=1.5)
        leaves.append(alpha)
        if op == "lln_diag":
            weight = torch.empty(1, H, 1, 1, device=META, requires_grad=True)
            kwargs.update(lln_weight=weight, diag_weight=weight)
            leaves.append(weight)
    mask = meta_mask(70) if masked else None
    out, state = LLN_OPS[op](q, k, v, is_causal=True, key_padding_mask=mask,
                             output_final_state=True, **kwargs)
    q2, k2, v2 = meta_qkv(new_tokens)
    mask2 = meta_mask(new_tokens) if masked else None
    out2, state2 = LLN_OPS[op](q2, k2, v2, is_causal=True, key_padding_mask=mask2,
                               initial_state=state, output_final_state=True, **kwargs)
    assert out2.shape == (B, H, new_tokens, D) and state2.position == 70 + new_tokens
    run_backward(out.sum() + out2.sum() + state2.kv.sum(), *leaves, q2, k2, v2)


@pytest.mark.parametrize("op", list(LLN_OPS))
def test_checkpointed_and_non_causal_lln_ops_on_meta(op):
    q, k, v = meta_qkv(1100)
    run_backward(LLN_OPS[op](q, k, v, is_causal=True, checkpoint=True, chunk_size=16), q, k, v)
    for stats in ("head", "sequence", "tensor"):
        q, k, v = meta_qkv()
        run_backward(LLN_OPS[op](q, k, v, stats=stats, key_padding_mask=meta_mask()), q, k, v)


def test_moment_match_on_meta():
    q, k, _ = meta_qkv(grad=False)
    for causal in (False, True):
        alpha, beta = lln.moment_match(q, k, is_causal=causal, key_padding_mask=meta_mask())
        assert alpha.device == META
