"""Baseline attentions (softmax, ELU+1, Performer, cosFormer, Nystromformer) against their
quadratic definitions, plus causality, padding, gradients, statistics and errors.

Tolerances (relative, ``max |out - ref| / max |ref|``, see ``conftest.rel_err``):

* float64 op vs float64 explicit matrix: 1e-12 (1e-10 for Nystrom, which inverts a matrix).
* float32 op vs float64 oracle on the same (float32) inputs: 2e-6 (measured 6e-8 .. 2e-7);
  Nystrom 2e-4 (measured 2e-5: the pseudo-inverse amplifies float32 rounding by the
  landmark matrix's condition number).
* bfloat16 op vs float64 oracle on the same (bf16) inputs: 1e-2 (measured 2e-3: the bf16
  output rounding is 2^-9 relative; softmax runs in bf16 throughout, as SDPA does).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv, padding_mask, rel_err

import lln
from lln.ops.elu import linear_attention
from lln.ops.nystrom import iterative_pinv, segment_means
from lln.ops.performer import default_num_features, draw_orthogonal_projection, performer_features

#: name -> (op, matrix, options used by both) for the methods tested against their matrix.
BASELINES = {
    "softmax": (lln.softmax_attention, lln.softmax_attention_matrix, {}),
    "elu": (lln.elu_attention, lln.elu_attention_matrix, {}),
    "performer": (
        lln.performer_attention, lln.performer_attention_matrix, {"seed": 7, "num_features": 24}
    ),
    "cosformer": (lln.cosformer_attention, lln.cosformer_attention_matrix, {"max_len": 64}),
    "nystrom": (
        lln.nystrom_attention, lln.nystrom_attention_matrix, {"num_landmarks": 6},
    ),
}
CAUSAL = ["softmax", "elu", "performer", "cosformer"]
CHUNKED = {"elu", "performer", "cosformer"}  # methods with a chunk_size knob
NAMES = list(BASELINES)
TOL64 = {"nystrom": 1e-10}


def run(name: str, q, k, v, *, chunk_size: int | None = 8, **kwargs):
    op, _, options = BASELINES[name]
    extra = {"chunk_size": chunk_size} if name in CHUNKED and chunk_size else {}
    return op(q, k, v, **options, **extra, **kwargs)


def oracle(name: str, q, k, v, **kwargs):
    _, matrix, options = BASELINES[name]
    return matrix(q, k, **options, **kwargs) @ v.to(torch.float64 if q.dtype == torch.float64
                                                    else torch.float32)


def cases():
    for name in NAMES:
        for causal in (False, True):
            if causal and name not in CAUSAL:
                continue
            for padded in (False, True):
                yield pytest.param(name, causal, padded, id=f"{name}-{causal=}-{padded=}")


# ---------------------------------------------------------------- quadratic definition


@pytest.mark.parametrize("name, causal, padded", list(cases()))
def test_matches_matrix_float64(name, causal, padded):
    q, k, v = make_qkv(2, 3, 37, 8, 5)  # 37: not a multiple of the chunk size 8
    mask = padding_mask(2, 37) if padded else None
    out = run(name, q, k, v, is_causal=causal, key_padding_mask=mask)
    ref = oracle(name, q, k, v, is_causal=causal, key_padding_mask=mask)
    assert out.dtype == torch.float64 and out.shape == (2, 3, 37, 5)
    assert rel_err(out, ref) < TOL64.get(name, 1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_low_precision_against_float64(name, dtype, tol):
    causal = name in CAUSAL
    q, k, v = make_qkv(2, 2, 45, 16, sigma=0.8, dtype=dtype, seed=1)
    options = {"pinv_iterations": 30} if name == "nystrom" else {}
    out = run(name, q, k, v, is_causal=causal, **options)
    ref = oracle(name, q.double(), k.double(), v.double(), is_causal=causal, **options)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < (2e-4 if name == "nystrom" and dtype == torch.float32 else tol)


@pytest.mark.parametrize("name", NAMES)
def test_single_token(name):
    q, k, v = make_qkv(2, 2, 1, 3, 4, seed=2)
    for causal in (False, True) if name in CAUSAL else (False,):
        out = run(name, q, k, v, is_causal=causal)
        assert out.shape == (2, 2, 1, 4)
        assert rel_err(out, oracle(name, q, k, v, is_causal=causal)) < 1e-12
        if name != "cosformer":  # ReLU features may give a zero weight
            assert rel_err(out, v) < 1e-12  # one key: attention copies its value


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_chunk_size_does_not_change_the_result(name):
    q, k, v = make_qkv(1, 2, 50, 8, seed=3)
    ref = run(name, q, k, v, is_causal=True, chunk_size=50)
    for chunk in (1, 7, 64):
        assert rel_err(run(name, q, k, v, is_causal=True, chunk_size=chunk), ref) < 1e-12


def test_cross_attention_lengths():
    """Non-causal ops accept L != S (queries vs keys)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 29, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 29, 3, generator=g, dtype=torch.float64)
    mask = padding_mask(2, 29)
    for name in NAMES:
        out = run(name, q, k, v, key_padding_mask=mask)
        assert out.shape == (2, 2, 11, 3)
        assert rel_err(out, oracle(name, q, k, v, key_padding_mask=mask)) < TOL64.get(name, 1e-12)


# ---------------------------------------------------------------- causality and padding


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_is_strict(name):
    """Huge changes to tokens after t leave outputs <= t unchanged (stabilisers included)."""
    q, k, v = make_qkv(1, 2, 37, 8, seed=5)
    t = 20
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t + 1 :] = q2[:, :, t + 1 :] * 30 + 5
    k2[:, :, t + 1 :] = k2[:, :, t + 1 :] * 30 + 5
    v2[:, :, t + 1 :] = 1e6
    out = run(name, q, k, v, is_causal=True)
    out2 = run(name, q2, k2, v2, is_causal=True)
    assert torch.isfinite(out2).all()
    assert rel_err(out2[:, :, : t + 1], out[:, :, : t + 1]) < 1e-12
    assert rel_err(out2[:, :, t + 1 :], out[:, :, t + 1 :]) > 1e-3  # the future did change


@pytest.mark.parametrize("name, causal", [(n, c) for n in NAMES for c in (False, True)
                                          if not c or n in CAUSAL])
def test_padding_equals_unpadded_runs(name, causal):
    lengths = [37, 23, 1, 6]
    q, k, v = make_qkv(len(lengths), 2, 37, 8, seed=6)
    mask = torch.arange(37)[None, :] < torch.tensor(lengths)[:, None]
    out = run(name, q, k, v, is_causal=causal, key_padding_mask=mask)
    for b, n in enumerate(lengths):
        alone = run(name, q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n],
                    is_causal=causal)
        assert rel_err(out[b : b + 1, :, :n], alone) < 1e-10, (b, n)


@pytest.mark.parametrize("name", NAMES)
def test_fully_padded_sequence_gives_zero_not_nan(name):
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 9, 4, seed=7))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out = run(name, q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_softmax_causal_with_padded_first_token():
    q, k, v = make_qkv(1, 1, 6, 4, seed=8)
    mask = torch.tensor([[False, True, True, True, True, False]])
    out = lln.softmax_attention(q, k, v, is_causal=True, key_padding_mask=mask)
    assert out[0, 0, 0].abs().max() == 0  # token 0 sees only itself, which is padding
    ref = lln.softmax_attention_matrix(q, k, is_causal=True, key_padding_mask=mask) @ v
    assert rel_err(out, ref) < 1e-12


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name, causal", [(n, c) for n in NAMES for c in (False, True)
                                          if not c or n in CAUSAL])
def test_gradcheck(name, causal):
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 5, 3, seed=9))
    mask = torch.tensor([[True, True, False, True, True]])
    options = {"chunk_size": 2} if name in CHUNKED else {}
    if name == "performer":  # a fixed projection makes it deterministic
        options["projection"] = draw_orthogonal_projection(
            6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
    op = BASELINES[name][0]
    if name == "nystrom":
        options.update(num_landmarks=2)
    fn = lambda q, k, v: op(q, k, v, is_causal=causal, key_padding_mask=mask, **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------- linear_attention engine


def test_linear_attention_log_scale_is_a_key_factor():
    g = torch.Generator().manual_seed(10)
    qf = torch.rand(2, 2, 30, 5, generator=g, dtype=torch.float64)
    kf = torch.rand(2, 2, 30, 5, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 30, 3, generator=g, dtype=torch.float64)
    r = torch.randn(2, 2, 30, generator=g, dtype=torch.float64) * 3
    mask = padding_mask(2, 30)
    for causal in (False, True):
        ref = linear_attention(qf, kf * r.exp().unsqueeze(-1), v, is_causal=causal,
                               key_padding_mask=mask)
        out = linear_attention(qf, kf, v, is_causal=causal, key_padding_mask=mask,
                               k_log_scale=r, chunk_size=4)
        assert rel_err(out, ref) < 1e-12
    with pytest.raises(ValueError, match="k_log_scale"):
        linear_attention(qf, kf, v, k_log_scale=r[:, :, :5])


# ---------------------------------------------------------------- Performer statistics


@pytest.mark.parametrize("orthogonal", [True, False])
def test_performer_kernel_is_unbiased(orthogonal):
    """Averaged over many projections, phi(q).phi(k) estimates exp(q.k / sqrt(D)): every
    entry's mean lies within 5 standard errors of the exact kernel."""
    d, draws = 8, 2000
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 1, 5, d, generator=g, dtype=torch.float64) * 0.7
    k = torch.randn(1, 1, 5, d, generator=g, dtype=torch.float64) * 0.7
    exact = torch.exp(q @ k.mT / d**0.5)
    estimates = []
    for _ in range(draws):
        w = draw_orthogonal_projection(16, d, generator=g, orthogonal=orthogonal,
                                       dtype=torch.float64)
        estimates.append(performer_features(q, w) @ performer_features(k, w).mT)
    estimates = torch.stack(estimates)
    z = (estimates.mean(0) - exact) / (estimates.std(0) / draws**0.5)
    assert z.abs().max() < 5


def test_performer_error_shrinks_with_features():
    """Mean L1 row error against softmax, averaged over 4 draws, falls as M grows (about as
    1/sqrt(M) once M is large enough)."""
    q, k, _ = make_qkv(1, 2, 48, 16, sigma=0.6, seed=12)
    exact = lln.softmax_attention_matrix(q, k)
    errors = []
    for m in (16, 128, 1024):
        errors.append(sum(
            (lln.performer_attention_matrix(q, k, num_features=m, seed=s) - exact)
            .abs().sum(-1).mean().item() for s in range(4)
        ) / 4)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 3


def test_orthogonal_projection_blocks():
    w = draw_orthogonal_projection(20, 8, generator=torch.Generator().manual_seed(13),
                                   dtype=torch.float64)
    assert w.shape == (20, 8)
    for block in (w[:8], w[8:16], w[16:]):
        gram = block @ block.T
        assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-12
    assert default_num_features(64) == 266 and default_num_features(1) == 1


def test_performer_redraw_and_seed():
    q, k, v = make_qkv(1, 2, 10, 8, seed=14)
    a = lln.performer_attention(q, k, v, seed=1)
    assert torch.equal(a, lln.performer_attention(q, k, v, seed=1))
    assert rel_err(a, lln.performer_attention(q, k, v, seed=2)) > 1e-6
    assert rel_err(lln.performer_attention(q, k, v), lln.performer_attention(q, k, v)) > 1e-6
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(lln.performer_attention(q, k, v, generator=g1),
                       lln.performer_attention(q, k, v, generator=g2))


def test_performer_per_head_projection():
    q, k, v = make_qkv(2, 3, 12, 4, seed=15)
    g = torch.Generator().manual_seed(0)
    w = torch.stack([draw_orthogonal_projection(10, 4, generator=g, dtype=torch.float64)
                     for _ in range(3)])
    out = lln.performer_attention(q, k, v, projection=w, is_causal=True)
    for h in range(3):
        alone = lln.performer_attention(q[:, h : h + 1], k[:, h : h + 1], v[:, h : h + 1],
                                        projection=w[h], is_causal=True)
        assert rel_err(out[:, h : h + 1], alone) < 1e-12


def test_performer_causal_offsets_do_not_look_ahead():
    """Long past keys (feature logits ~ -150) followed by ordinary keys (logits ~ +4): an
    offset taken over all keys would underflow every past key in float32 and zero the past
    outputs; per-key offsets give the prefix-only result."""
    q, k, v = make_qkv(1, 2, 30, 16, dtype=torch.float32, seed=21)
    k[:, :, :20] *= 10
    w = draw_orthogonal_projection(32, 16, generator=torch.Generator().manual_seed(2))
    full = lln.performer_attention(q, k, v, projection=w, is_causal=True, chunk_size=8)
    prefix = lln.performer_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], projection=w,
                                     is_causal=True, chunk_size=8)
    ref = lln.performer_attention_matrix(q.double(), k.double(), projection=w.double(),
                                         is_causal=True) @ v.double()
    assert rel_err(full[:, :, :20], prefix) < 1e-6
    assert rel_err(full, ref) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_performer_large_logits_stay_exact_in_float32(causal):
    """sigma = 3 at D = 16: feature exponents span hundreds; the per-row / per-key offsets
    keep float32 exact to rounding (a global max would underflow most keys)."""
    q, k, v = make_qkv(1, 2, 40, 16, sigma=3.0, dtype=torch.float32, seed=16)
    w = draw_orthogonal_projection(32, 16, generator=torch.Generator().manual_seed(1))
    out = lln.performer_attention(q, k, v, projection=w, is_causal=causal)
    ref = lln.performer_attention_matrix(q.double(), k.double(), projection=w.double(),
                                         is_causal=causal) @ v.double()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-4


# ---------------------------------------------------------------- Nystrom


def test_nystrom_is_softmax_when_every_token_is_a_landmark():
    q, k, v = make_qkv(2, 2, 12, 8, seed=17)
    mask = padding_mask(2, 12)
    for m in (None, mask):
        out = lln.nystrom_attention(q, k, v, num_landmarks=16, pinv_iterations=None,
                                    key_padding_mask=m)
        assert rel_err(out, lln.softmax_attention(q, k, v, key_padding_mask=m)) < 1e-9


def test_nystrom_iterative_pinv_converges_to_exact():
    q, k, v = make_qkv(2, 2, 40, 8, sigma=3.0, seed=18)  # landmark matrix cond ~ 40 .. 200
    exact = lln.nystrom_attention(q, k, v, num_landmarks=8, pinv_iterations=None)
    errors = [rel_err(lln.nystrom_attention(q, k, v, num_landmarks=8, pinv_iterations=it),
                      exact) for it in (6, 25)]
    assert errors[1] < 1e-10 < errors[0]
    a = torch.randn(3, 5, 4, dtype=torch.float64)  # rectangular, full rank
    assert rel_err(iterative_pinv(a, 30), torch.linalg.pinv(a)) < 1e-10
    assert iterative_pinv(torch.zeros(2, 3, 3), 4).abs().max() == 0


def test_segment_means():
    x = torch.arange(10, dtype=torch.float64).reshape(1, 1, 10, 1)
    land, present = segment_means(x, None, 4)  # 10 tokens, 4 segments: sizes 3, 2, 3, 2
    assert land.flatten().tolist() == [1.0, 3.5, 6.0, 8.5] and present.all()
    real = torch.tensor([[True, False, True, True, False, False, False, False, False, True]])
    land, present = segment_means(x, real, 6)  # 4 real tokens -> 4 landmarks
    assert land.flatten().tolist() == [0.0, 2.0, 3.0, 9.0, 0.0, 0.0]
    assert present.flatten().tolist() == [True] * 4 + [False] * 2


# ---------------------------------------------------------------- cosFormer


def test_cosformer_fixed_max_len_streams():
    """With a fixed max_len a causal prefix run equals the prefix of the full run."""
    q, k, v = make_qkv(1, 2, 30, 8, seed=19)
    full = lln.cosformer_attention(q, k, v, is_causal=True, max_len=64)
    head = lln.cosformer_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17], is_causal=True,
                                   max_len=64)
    assert rel_err(head, full[:, :, :17]) < 1e-12
    # the default M = sequence length makes the weights depend on the length
    assert rel_err(lln.cosformer_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17]),
                   lln.cosformer_attention(q, k, v)[:, :, :17]) > 1e-6


def test_cosformer_reweighting_favours_near_tokens():
    """Equal ReLU scores: the cos re-weighting alone makes weights fall with distance."""
    q = torch.ones(1, 1, 8, 2, dtype=torch.float64)
    p = lln.cosformer_attention_matrix(q, q)
    assert (p[0, 0, 0, :-1] > p[0, 0, 0, 1:]).all()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k, v: lln.nystrom_attention(q, k, v, is_causal=True), ValueError, "is_causal"),
        (lambda q, k, v: lln.nystrom_attention_matrix(q, k, is_causal=True), ValueError,
         "is_causal"),
        (lambda q, k, v: lln.nystrom_attention(q, k, v, num_landmarks=0), ValueError,
         "num_landmarks"),
        (lambda q, k, v: lln.nystrom_attention(q, k, v, pinv_iterations=-1), ValueError,
         "pinv_iterations"),
        (lambda q, k, v: lln.cosformer_attention(q, k, v, max_len=5), ValueError, "max_len"),
        (lambda q, k, v: lln.performer_attention(q, k, v, num_features=0), ValueError,
         "num_features"),
        (lambda q, k, v: lln.performer_attention(q, k, v, projection=torch.ones(4, 5)),
         ValueError, "projection"),
        (lambda q, k, v: lln.performer_attention(q, k, v, projection=torch.ones(4, 8), seed=1),
         ValueError, "projection"),
        (lambda q, k, v: lln.performer_attention(q, k, v, seed="a"), TypeError, "seed"),
        (lambda q, k, v: lln.performer_attention(q, k, v, seed=1, generator=torch.Generator()),
         ValueError, "generator"),
        (lambda q, k, v: lln.softmax_attention(q, k, v, scale=-1.0), ValueError, "scale"),
        (lambda q, k, v: lln.softmax_attention(q, k, v, is_causal=1), TypeError, "is_causal"),
        (lambda q, k, v: lln.elu_attention(q, k, v, eps=-1.0), ValueError, "eps"),
        (lambda q, k, v: lln.elu_attention(q, k, v, chunk_size=0), ValueError, "chunk_size"),
        (lambda q, k, v: lln.elu_attention(q, k, v, key_padding_mask=torch.ones(2, 10)),
         TypeError, "key_padding_mask"),
        (lambda q, k, v: lln.cosformer_attention(q, k[:, :, :5], v[:, :, :5], is_causal=True),
         ValueError, "queries as keys"),
        (lambda q, k, v: lln.elu_attention(q[0], k, v), ValueError, "4-D"),
        (lambda q, k, v: lln.performer_attention(q.int(), k, v), TypeError, "floating"),
    ],
)
def test_clear_errors(call, error, match):
    q, k, v = make_qkv(2, 2, 10, 8, seed=20)
    with pytest.raises(error, match=match):
        call(q, k, v)
