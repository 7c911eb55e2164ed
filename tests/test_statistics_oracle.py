"""Moment-matching statistics against values computed without the library.

Three independent references, none of which calls ``lln.ops.moment_matching``:

* literal numbers, computed by hand (Python's ``statistics`` module and the formula below)
  for small inputs written out in this file;
* a plain loop: ``torch.var`` over the real entries of ``[:t+1]`` for every token ``t``;
* the quadratic oracle's own statistics (:func:`lln.ops.naive.oracle_scales`).

The formula, written out (SPEC section 3, paper constants)::

    sigma_tilde = sqrt(max(var_q * var_k - b, 1e-12) / (2 a)) / temperature
    alpha = sigma_tilde / sqrt(var_q),   beta = sigma_tilde / sqrt(var_k)

with the unbiased variance over >= 16 entries and the mean square about zero below that.
"""

from __future__ import annotations

import math

import pytest
import torch

import lln
from lln.ops.naive import oracle_scales

A, B = 0.14855178144710912, -0.35487039130661086


def formula(var_q: torch.Tensor, var_k: torch.Tensor, temperature: float = 1.0):
    var_q, var_k = var_q.clamp_min(1e-12), var_k.clamp_min(1e-12)
    sigma_tilde = torch.sqrt((var_q * var_k - B).clamp_min(1e-12) / (2 * A)) / temperature
    return sigma_tilde / var_q.sqrt(), sigma_tilde / var_k.sqrt()


def plain_sigma2(entries: torch.Tensor) -> torch.Tensor:
    if entries.numel() == 0:
        return torch.tensor(1.0, dtype=torch.float64)
    if entries.numel() < 16:
        return entries.square().mean()
    return entries.var()


def plain_scales(q, k, *, is_causal, stats, mask, temperature=1.0):
    """alpha, beta (B, G, N|1, 1) by torch.var over the real entries of [:t+1], one by one."""
    q, k = q.double(), k.double()
    b, h, n, _ = q.shape
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    heads = [[g] for g in range(h)] if stats == "head" else [list(range(h))]
    ends = range(1, n + 1) if is_causal else [n]
    alpha = torch.empty(b, len(heads), len(ends), 1, dtype=torch.float64)
    beta = torch.empty_like(alpha)
    for i in range(b):
        for g, hs in enumerate(heads):
            for j, end in enumerate(ends):
                sel = real[i, :end]
                var_q = plain_sigma2(q[i, hs, :end][:, sel])
                var_k = plain_sigma2(k[i, hs, :end][:, sel])
                alpha[i, g, j, 0], beta[i, g, j, 0] = formula(var_q, var_k, temperature)
    return alpha, beta


def both(q, k, **kw):
    """(fast alpha, beta) and (oracle alpha, beta)."""
    return lln.moment_match(q, k, **kw), oracle_scales(q, k, **kw)


# --- literal values (computed by hand, see the module docstring) ---------------------------


def test_literal_scales_non_causal_head():
    q = torch.tensor([2.0, -2.0] * 8, dtype=torch.float64).view(1, 1, 2, 8)
    k = torch.arange(16, dtype=torch.float64).view(1, 1, 2, 8)
    # var_q = 64/15, var_k = 16*17/12
    for alpha, beta in both(q, k):
        assert alpha.item() == pytest.approx(8.750547724625251, rel=1e-12)
        assert beta.item() == pytest.approx(3.7965206481339115, rel=1e-12)


CASE_B_Q = [
    [[0.5, 2.5, 4.5, 1.5, 3.5, 0.5, 2.5, 4.5], [4.0, 1.0, 3.0, 5.0, 2.0, 4.0, 1.0, 3.0],
     [2.5, 4.5, 1.5, 3.5, 5.5, 2.5, 4.5, 1.5]],
    [[2.0, 4.0, 1.0, 3.0, 5.0, 2.0, 4.0, 1.0], [6.0, 3.0, 5.0, 2.0, 4.0, 6.0, 3.0, 5.0],
     [5.0, 7.0, 4.0, 6.0, 3.0, 5.0, 7.0, 4.0]],
]
CASE_B_K = [
    [[97.0, 100.0, 103.0, 99.0, 102.0, 98.0, 101.0, 97.0],
     [102.0, 98.0, 101.0, 97.0, 100.0, 103.0, 99.0, 102.0],
     [100.0, 103.0, 99.0, 102.0, 98.0, 101.0, 97.0, 100.0]],
    [[99.0, 102.0, 98.0, 101.0, 97.0, 100.0, 103.0, 99.0],
     [97.0, 100.0, 103.0, 99.0, 102.0, 98.0, 101.0, 97.0],
     [102.0, 98.0, 101.0, 97.0, 100.0, 103.0, 99.0, 102.0]],
]
# per token t: statistics.variance over both heads' real entries of [:t+1] (token 1 padded)
CASE_B_SCALES = [
    (3.8879456451927497, 2.8015630121665955),
    (3.8879456451927497, 2.8015630121665955),
    (3.747774761879783, 3.3021187860802677),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_literal_scales_causal_sequence_with_padding(dtype):
    """Two heads pooled per token (16 entries a token), a padded token, keys offset by 100."""
    q = torch.tensor(CASE_B_Q, dtype=dtype)[None]
    k = torch.tensor(CASE_B_K, dtype=dtype)[None]
    mask = torch.tensor([[True, False, True]])
    want = torch.tensor(CASE_B_SCALES, dtype=torch.float64)
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    for alpha, beta in both(q, k, is_causal=True, stats="sequence", key_padding_mask=mask):
        assert alpha.shape == (1, 1, 3, 1)
        torch.testing.assert_close(alpha[0, 0, :, 0].double(), want[:, 0], rtol=rel, atol=0)
        torch.testing.assert_close(beta[0, 0, :, 0].double(), want[:, 1], rtol=rel, atol=0)


CASE_C_Q = [[1.0 + 0.25 * ((3 * t + d) % 4) for d in range(4)] for t in range(5)]
CASE_C_K = [[(-1) ** d * (t + 1) * 0.5 for d in range(4)] for t in range(5)]
# tokens 0-2 hold 4, 8, 12 < 16 entries: mean square about zero; tokens 3-4: variance
CASE_C_SCALES = [
    (1.2033925841490132, 3.377012063752603),
    (1.6463109834346417, 2.921912137737759),
    (2.129201168443301, 2.7659134524591127),
    (4.589646949114704, 0.9368577604043812),
    (4.926205466250447, 0.8303117619529305),
]


def test_literal_scales_causal_head_early_tokens():
    q = torch.tensor(CASE_C_Q, dtype=torch.float64).view(1, 1, 5, 4)
    k = torch.tensor(CASE_C_K, dtype=torch.float64).view(1, 1, 5, 4)
    want = torch.tensor(CASE_C_SCALES, dtype=torch.float64)
    for alpha, beta in both(q, k, is_causal=True):
        torch.testing.assert_close(alpha[0, 0, :, 0], want[:, 0], rtol=1e-12, atol=0)
        torch.testing.assert_close(beta[0, 0, :, 0], want[:, 1], rtol=1e-12, atol=0)


# --- plain torch.var loop ------------------------------------------------------------------

MASKS = {
    "none": None,
    "right": torch.tensor([[True] * 30 + [False] * 7, [True] * 37]),
    "left": torch.tensor([[False] * 5 + [True] * 32, [False] * 36 + [True]]),
    "holes": torch.tensor([[i % 3 != 1 for i in range(37)], [i % 4 == 0 for i in range(37)]]),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("stats", ["head", "sequence"])
@pytest.mark.parametrize("head_dim", [3, 16])
def test_causal_scales_equal_plain_torch_var(mask_name, stats, head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 3, 37, head_dim, generator=gen, dtype=torch.float64) * 2 + 5
    k = torch.randn(2, 3, 37, head_dim, generator=gen, dtype=torch.float64) * 0.5 - 40
    mask = MASKS[mask_name]
    want = plain_scales(q, k, is_causal=True, stats=stats, mask=mask, temperature=1.5)
    for got in both(q, k, is_causal=True, stats=stats, key_padding_mask=mask, temperature=1.5):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=0)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("stats", ["head", "sequence", "tensor"])
def test_non_causal_scales_equal_plain_torch_var(mask_name, stats):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 37, 8, generator=gen, dtype=torch.float64) + 1e3
    k = torch.randn(2, 3, 37, 8, generator=gen, dtype=torch.float64) * 3
    mask = MASKS[mask_name]
    if stats == "tensor":
        real = torch.ones(2, 37, dtype=torch.bool) if mask is None else mask
        pick = lambda x: x.transpose(1, 2)[real]  # noqa: E731
        want = formula(pick(q).var(), pick(k).var())
    else:
        want = plain_scales(q, k, is_causal=False, stats=stats, mask=mask)
    for got in both(q, k, stats=stats, key_padding_mask=mask):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, torch.broadcast_to(w, g.shape), rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_get_float64_exact_statistics(dtype):
    """Statistics of the rounded inputs are as exact as in float64 (per-token moments are
    accumulated in a shifted, scaled form), even with a large mean offset."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 50, 16, generator=gen) + 300).to(dtype)
    k = (torch.randn(1, 2, 50, 16, generator=gen) * 4 - 500).to(dtype)
    want = plain_scales(q, k, is_causal=True, stats="head", mask=None)
    got = lln.moment_match(q, k, is_causal=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-7, atol=0)


def test_constant_input_gives_floored_finite_scales():
    q = torch.full((1, 1, 8, 4), 3.0, dtype=torch.float64)
    k = torch.randn(1, 1, 8, 4, dtype=torch.float64)
    alpha, _ = lln.moment_match(q, k)
    # var_q = 0 -> floored to 1e-12: alpha = sigma_tilde / 1e-6
    var_k = k.var()
    want = math.sqrt((1e-12 * var_k.item() - B) / (2 * A)) / 1e-6
    assert alpha.item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_statistics_are_sync_free(is_causal, masked):
    """Moment matching runs on "meta" tensors, which fail on any host read of a value."""
    from lln.ops.moment_matching import moment_match_with_moments

    q, k = (torch.empty(2, 3, 33, 8, device="meta") for _ in range(2))
    mask = torch.ones(2, 33, dtype=torch.bool, device="meta") if masked else None
    for stats in ("head", "sequence"):
        alpha, beta, _ = moment_match_with_moments(
            q, k, stats=stats, is_causal=is_causal, key_padding_mask=mask, temperature=1.0
        )
        assert alpha.device.type == "meta" and alpha.shape[2] == (33 if is_causal else 1)


def test_state_continues_the_statistics_exactly_with_an_offset():
    """Pieces chained through the state (plain float64 sums) give the one-pass scales, even
    with a mean offset of 1e3 standard deviations and a first piece without real tokens."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 40, 8, generator=gen, dtype=torch.float64) * 3 + 3e3
    k = torch.randn(2, 3, 40, 8, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :25] = False
    from lln.ops.moment_matching import moment_match_with_moments

    kw = dict(stats="head", is_causal=True, temperature=1.0)
    a_whole, b_whole, _ = moment_match_with_moments(q, k, key_padding_mask=mask, **kw)
    alphas, state = [], None
    for lo, hi in ((0, 17), (17, 18), (18, 40)):
        a, _, state = moment_match_with_moments(q[:, :, lo:hi], k[:, :, lo:hi], moments=state,
                                                key_padding_mask=mask[:, lo:hi], **kw)
        alphas.append(a)
    torch.testing.assert_close(torch.cat(alphas, 2), a_whole, rtol=1e-9, atol=0)


def test_variance_from_sums_follows_the_ops_rule():
    from lln.ops.moment_matching import variance_from_sums

    x = torch.tensor([3.0, 5.0, 4.0, 8.0] * 5, dtype=torch.float64)  # 20 entries
    for n in (0, 1, 4, 15, 16, 20):
        e = x[:n]
        got = variance_from_sums(torch.tensor(float(n), dtype=torch.float64), e.sum(),
                                 e.square().sum())
        want = 1.0 if n == 0 else (e.var() if n >= 16 else e.square().mean())
        assert float(got) == pytest.approx(float(want), rel=1e-12)
