"""The attention registry: names, lookup errors, and that every entry honours the shared
signature and its declared capabilities (causal, padding, matrix)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err

import lln
from lln.ops.registry import ATTENTIONS, AttentionSpec, attention_names, get_attention

NAMES = [
    "softmax", "lln", "lln_diag", "block_diag", "lln_reference", "elu", "performer",
    "cosformer", "nystrom",
]
#: options that make an entry deterministic (Performer redraws its projection otherwise).
OPTIONS = {"performer": {"seed": 0}}


def test_names_and_lookup():
    assert attention_names() == NAMES
    assert list(ATTENTIONS) == NAMES
    assert lln.attention_names() == NAMES and lln.get_attention is get_attention
    for name in NAMES:
        spec = get_attention(name)
        assert isinstance(spec, AttentionSpec) and spec.name == name
        assert isinstance(spec.description, str) and spec.description
    with pytest.raises(ValueError, match="unknown attention 'flash'.*softmax.*nystrom"):
        get_attention("flash")
    with pytest.raises(TypeError, match="str"):
        get_attention(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_attention("lln").name = "x"


def test_declared_capabilities():
    assert [n for n in NAMES if ATTENTIONS[n].random_features] == ["performer"]
    assert not ATTENTIONS["softmax"].linear and ATTENTIONS["lln"].linear
    assert not ATTENTIONS["nystrom"].supports_causal
    assert not ATTENTIONS["lln_reference"].supports_padding
    assert ATTENTIONS["lln_reference"].matrix is None
    assert ATTENTIONS["lln"].matrix is lln.lln_attention_matrix


@pytest.mark.parametrize("name", NAMES)
def test_shared_signature(name):
    spec = get_attention(name)
    for fn in (spec.fn, spec.matrix):
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        for arg in ("is_causal", "key_padding_mask"):
            assert params[arg].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["is_causal"].default is False and params["key_padding_mask"].default is None


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_runs_or_refuses_clearly(name):
    spec = get_attention(name)
    options = OPTIONS.get(name, {})
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 21, 8, 5, seed=1))
    mask = padding_mask(2, 21)
    for causal in (False, True):
        for m in (None, mask):
            call = lambda: spec.fn(q, k, v, is_causal=causal, key_padding_mask=m, **options)  # noqa: B023, E731
            if causal and not spec.supports_causal:
                with pytest.raises(ValueError, match="is_causal"):
                    call()
                continue
            if m is not None and not spec.supports_padding:
                with pytest.raises(ValueError, match="key_padding_mask"):
                    call()
                continue
            out = call()
            assert out.shape == (2, 2, 21, 5) and torch.isfinite(out).all()
            q.grad = k.grad = v.grad = None
            out.square().sum().backward()
            for t in (q, k, v):
                assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("name", [n for n in NAMES if ATTENTIONS[n].matrix is not None])
def test_matrix_times_v_is_the_output(name):
    """With the same options, ``matrix(q, k) @ v`` equals ``fn(q, k, v)`` (float64)."""
    spec = get_attention(name)
    options = OPTIONS.get(name, {})
    q, k, v = make_qkv(2, 3, 19, 8, seed=2)
    mask = padding_mask(2, 19)
    for causal in (False, True) if spec.supports_causal else (False,):
        for m in (None, mask) if spec.supports_padding else (None,):
            out = spec.fn(q, k, v, is_causal=causal, key_padding_mask=m, **options)
            weights = spec.matrix(q, k, is_causal=causal, key_padding_mask=m, **options)
            assert weights.shape == (2, 3, 19, 19)
            assert rel_err(out, weights @ v) < 1e-10
