"""Non-causal LLN with a non-finite input: the documented reach (docs/method.md) — the
(batch, head) holding it, nothing else with the default per-head statistics."""

from __future__ import annotations

import pytest
import torch

import lln


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("op", [lln.lln_attention, lln.lln_diag_attention])
def test_a_non_finite_entry_poisons_only_its_batch_and_head(which, bad, op):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = op(q, k, v)
    t = {"q": q, "k": k, "v": v}[which]
    t[1, 2, 20, 3] = bad
    out = op(q, k, v)
    others = torch.ones(2, 3, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(out[others], ref[others])  # every other (batch, head): unchanged
    finite = torch.isfinite(out[1, 2])
    if which == "v":  # that channel of every row
        assert not finite[:, 3].any() and finite[:, [0, 1, 2, 4, 5, 6, 7]].all()
    else:
        assert not finite.any()
