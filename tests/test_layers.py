"""``lln.LLNAttention``: the nn.Module over the functional ops.

It should be a drop-in for ``nn.MultiheadAttention(batch_first=True)`` in self-attention
(same call forms, same key padding convention: True = padding), compute exactly what its
docstring says (projections + ``lln_diag_attention`` / ``lln_attention`` + out projection),
respect padding and causality, chain causal state, and handle its combine / stats /
temperature options like the documentation describes.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import padding_mask
from torch import Tensor, nn

import lln
from lln import LLNAttention
from lln.ops.moment_matching import moment_constants, scales_from_variances

E, H = 16, 2
HD = E // H
F64 = torch.float64


def make_x(b: int = 3, n: int = 20, e: int = E, *, dtype=F64, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, e, generator=g, dtype=F64).to(dtype)


def pad_mask(b: int = 3, n: int = 20, *, seed: int = 0) -> Tensor:
    """MHA convention: True = padding (left padding, right padding and holes)."""
    return ~padding_mask(b, n, seed=seed)


def make_module(*, seed: int = 0, dtype=F64, **kw) -> LLNAttention:
    torch.manual_seed(seed)
    return LLNAttention(E, H, dtype=dtype, **kw)


def split_heads(t: Tensor) -> Tensor:
    b, n, _ = t.shape
    return t.view(b, n, H, HD).transpose(1, 2)


def manual_forward(
    m: LLNAttention,
    x: Tensor,
    pad: Tensor | None = None,
    *,
    causal: bool = False,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
    lln_weight: float | Tensor = 0.5,
    diag_weight: float | Tensor = 0.5,
) -> Tensor:
    """What ``m(x, key_padding_mask=pad)`` should compute, written out with the public ops."""
    b, n, e = x.shape
    q, k, v = split_heads(m.q_proj(x)), split_heads(m.k_proj(x)), split_heads(m.v_proj(x))
    kw = dict(
        is_causal=causal,
        key_padding_mask=None if pad is None else ~pad,
        alpha=alpha,
        beta=beta,
        temperature=m.temperature,
        constants=m.constants if alpha is None else "paper",  # buffer scales carry them
        chunk_size=m.chunk_size,
    )
    if m.diag:
        out = lln.lln_diag_attention(
            q, k, v, block_size=m.block_size, lln_weight=lln_weight, diag_weight=diag_weight,
            **kw,
        )
    else:
        out = lln.lln_attention(q, k, v, **kw)
    return m.out_proj(out.transpose(1, 2).reshape(b, n, e))


def buffer_scales(m: LLNAttention) -> tuple[Tensor, Tensor]:
    shape = (1, H, 1, 1)
    ab = {} if m.constants == "paper" else dict(zip("ab", moment_constants(HD), strict=True))
    return scales_from_variances(
        m.running_var_q.view(shape), m.running_var_k.view(shape), temperature=m.temperature,
        **ab,
    )


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


# --------------------------------------------------------------------------------------
# Drop-in for nn.MultiheadAttention(batch_first=True)
# --------------------------------------------------------------------------------------


def test_call_forms_match_multihead_attention():
    m = make_module()
    mha = nn.MultiheadAttention(E, H, batch_first=True, dtype=F64)
    x, pad = make_x(), pad_mask()
    assert m.batch_first is True

    res = m(x, x, x)
    ref = mha(x, x, x, need_weights=False)
    assert isinstance(res, tuple) and len(res) == 2 and res[1] is None
    assert res[0].shape == ref[0].shape == x.shape and ref[1] is None
    assert res[0].dtype == x.dtype

    assert torch.equal(m(x)[0], res[0])
    assert m(x)[1] is None
    masked = m(x, key_padding_mask=pad)
    assert masked[0].shape == x.shape and masked[1] is None
    # MHA's positional order: (query, key, value, key_padding_mask, need_weights, attn_mask)
    assert torch.equal(m(x, x, x, pad)[0], masked[0])
    assert torch.equal(m(x, x, x, pad, False)[0], masked[0])
    # the mask really is applied, with True = padding
    assert not torch.allclose(masked[0], res[0])
    all_real = torch.zeros_like(pad)
    assert_close(m(x, key_padding_mask=all_real)[0], res[0])


class PreNormBlock(nn.Module):
    """The pre-norm half of ``nn.TransformerEncoderLayer(norm_first=True)``, written out."""

    def __init__(self, attn: nn.Module, e: int = E) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.self_attn = attn
        self.ff = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


@pytest.mark.parametrize(
    "make_attn",
    [
        lambda: LLNAttention(E, H),
        lambda: LLNAttention(E, H, diag=False),
        lambda: LLNAttention(E, H, combine="ratio", stats="running"),
        lambda: nn.MultiheadAttention(E, H, batch_first=True),  # the same code runs MHA
    ],
    ids=["lln_diag", "lln", "ratio_running", "mha"],
)
def test_replaces_mha_in_a_prenorm_block_and_trains(make_attn):
    """Toy regression that needs attention: every token predicts a projection of the mean
    of the real tokens of its sequence. 20 AdamW steps must reduce the loss."""
    torch.manual_seed(0)
    model = PreNormBlock(make_attn())
    head = nn.Linear(E, 1)
    x = torch.randn(8, 12, E)
    pad = torch.zeros(8, 12, dtype=torch.bool)
    pad[::2, 9:] = True
    real = (~pad).unsqueeze(-1).float()
    w = torch.randn(E, 1)
    target = ((x * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)) @ w  # (B, 1, 1)
    target = target.expand(-1, 12, -1)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)

    def loss_fn() -> Tensor:
        err = (head(model(x, key_padding_mask=pad)) - target).square()
        return (err * real).sum() / real.sum()

    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = loss_fn().item()
    assert all(math.isfinite(v) for v in losses)
    assert final < 0.5 * losses[0], (losses[0], final)


def test_replaces_self_attn_of_transformer_encoder_layer_in_training():
    """Swapped into a real nn.TransformerEncoderLayer (training mode, no padding mask), the
    layer runs, its output depends on the LLN module and gradients reach it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        E, H, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True
    )
    layer.self_attn = LLNAttention(E, H)
    x = torch.randn(2, 10, E)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert layer.self_attn.q_proj.weight.grad is not None
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    causal_mask = nn.Transformer.generate_square_subsequent_mask(10)
    y_causal = layer(x, src_mask=causal_mask, is_causal=True)
    x2 = x.clone()
    x2[:, 6:] += 5.0
    y2_causal = layer(x2, src_mask=causal_mask, is_causal=True)
    torch.testing.assert_close(y_causal[:, :6], y2_causal[:, :6], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# Exactly the documented computation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_output_equals_manual_computation(diag, causal, masked):
    m = make_module(diag=diag, is_causal=causal, temperature=1.3, chunk_size=8)
    x = make_x()
    pad = pad_mask() if masked else None
    out, _ = m(x, key_padding_mask=pad)
    ref = manual_forward(m, x, pad, causal=causal)
    assert_close(out, ref)


@pytest.mark.parametrize("block_size", [None, 5])
def test_output_equals_manual_computation_block_size(block_size):
    m = make_module(block_size=block_size)
    x, pad = make_x(), pad_mask()
    assert_close(m(x, key_padding_mask=pad)[0], manual_forward(m, x, pad))


@pytest.mark.parametrize("combine", ["scale", "ratio"])
def test_learnable_combine_equals_manual_computation(combine):
    m = make_module(combine=combine, is_causal=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (m.lln_scale, m.diag_scale) if combine == "scale" else (m.ratio,):
            p.copy_(torch.rand(p.shape, generator=g, dtype=F64))
    x, pad = make_x(), pad_mask()
    if combine == "scale":
        weights = dict(lln_weight=m.lln_scale, diag_weight=m.diag_scale)
    else:
        weights = dict(lln_weight=m.ratio, diag_weight=1 - m.ratio)
    ref = manual_forward(m, x, pad, causal=True, **weights)
    assert_close(m(x, key_padding_mask=pad)[0], ref)
    # and the weights matter: the average combination gives something else
    assert not torch.allclose(ref, manual_forward(m, x, pad, causal=True), atol=1e-6)


# --------------------------------------------------------------------------------------
# Padding and causality
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("stats", ["batch", "running", "fixed"])
def test_padded_positions_do_not_affect_real_outputs(diag, causal, stats):
    m = make_module(diag=diag, is_causal=causal, stats=stats, chunk_size=8)
    m.eval()
    x, pad = make_x(), pad_mask()
    assert pad.any() and (~pad).any()
    g = torch.Generator().manual_seed(5)
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), E, generator=g, dtype=F64) * 5
    out1, _ = m(x, key_padding_mask=pad)
    out2, _ = m(x2, key_padding_mask=pad)
    assert torch.isfinite(out2).all()
    assert_close(out1[~pad], out2[~pad], 1e-10)
    # without the mask the padded tokens would matter
    assert not torch.allclose(m(x)[0][~pad], m(x2)[0][~pad], atol=1e-3)


def test_running_update_ignores_padded_positions():
    m = make_module(stats="running", momentum=0.5)
    x, pad = make_x(), pad_mask()
    x2 = x.clone()
    x2[pad] = 100.0
    m(x, key_padding_mask=pad)
    var_q, var_k = m.running_var_q.clone(), m.running_var_k.clone()
    m.reset_running_stats()
    m(x2, key_padding_mask=pad)
    assert torch.equal(m.running_var_q, var_q) and torch.equal(m.running_var_k, var_k)


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("how", ["constructor", "forward"])
@pytest.mark.parametrize("t", [0, 6, 13])
def test_strictly_causal(diag, how, t):
    m = make_module(diag=diag, is_causal=how == "constructor", chunk_size=4)
    kw = {"is_causal": True} if how == "forward" else {}
    x = make_x()
    g = torch.Generator().manual_seed(7)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(x2[:, t + 1 :].shape, generator=g, dtype=F64) * 5
    out1, _ = m(x, **kw)
    out2, _ = m(x2, **kw)
    assert torch.isfinite(out2).all()
    assert_close(out1[:, : t + 1], out2[:, : t + 1], 1e-10)
    assert not torch.allclose(out1[:, t + 1 :], out2[:, t + 1 :], atol=1e-3)


def test_forward_is_causal_equals_constructor_is_causal():
    x = make_x()
    a = make_module(is_causal=True)(x)[0]
    b = make_module()(x, is_causal=True)[0]
    c = make_module()(x, attn_mask=nn.Transformer.generate_square_subsequent_mask(20),
                      is_causal=True)[0]
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, make_module()(x)[0], atol=1e-3)


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("stats", ["batch", "fixed"])
@pytest.mark.parametrize("split", [1, 7, 12])
@pytest.mark.parametrize("masked", [False, True])
def test_state_chaining_equals_one_call(diag, stats, split, masked):
    m = make_module(diag=diag, is_causal=True, stats=stats, chunk_size=4)
    x = make_x(n=24)
    pad = pad_mask(n=24) if masked else None
    full, _, full_state = m(x, key_padding_mask=pad, output_final_state=True)
    p1 = None if pad is None else pad[:, :split]
    p2 = None if pad is None else pad[:, split:]
    out1, w1, state = m(x[:, :split], key_padding_mask=p1, output_final_state=True)
    out2, w2, state2 = m(
        x[:, split:], key_padding_mask=p2, initial_state=state, output_final_state=True
    )
    assert w1 is None and w2 is None
    assert isinstance(state2, lln.LLNState) and state2.position == 24 == full_state.position
    assert_close(torch.cat([out1, out2], 1), full)
    # the state carried information: the second piece alone gives something else
    assert not torch.allclose(m(x[:, split:], key_padding_mask=p2)[0], out2, atol=1e-4)


def test_state_chaining_with_forward_is_causal_token_by_token():
    m = make_module()
    x = make_x(n=11)
    full = m(x, is_causal=True)[0]
    state, outs = None, []
    for t in range(11):
        out, _, state = m(
            x[:, t : t + 1], is_causal=True, initial_state=state, output_final_state=True
        )
        outs.append(out)
    assert_close(torch.cat(outs, 1), full)


# --------------------------------------------------------------------------------------
# combine modes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("combine", ["average", "scale", "ratio"])
def test_combine_parameters_and_gradients(combine):
    m = make_module(combine=combine)
    names = {"average": [], "scale": ["lln_scale", "diag_scale"], "ratio": ["ratio"]}[combine]
    for other in {"lln_scale", "diag_scale", "ratio"} - set(names):
        assert not hasattr(m, other)
    params = dict(m.named_parameters())
    x = make_x()
    g = torch.Generator().manual_seed(3)
    target = torch.randn(x.shape, generator=g, dtype=F64)
    (m(x)[0] * target).sum().backward()
    for name in names:
        p = params[name]
        assert p.shape == (1, H, 1, HD)
        assert torch.equal(p.detach(), torch.full_like(p, 0.5))
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().min() > 0  # every head and channel is used
    assert m.q_proj.weight.grad.abs().sum() > 0


def test_ratio_one_equals_plain_lln():
    m = make_module(combine="ratio", is_causal=True)
    plain = make_module(diag=False, is_causal=True)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "ratio"})
    with torch.no_grad():
        m.ratio.fill_(1.0)
    x, pad = make_x(), pad_mask()
    assert_close(m(x, key_padding_mask=pad)[0], plain(x, key_padding_mask=pad)[0])
    with torch.no_grad():
        m.ratio.fill_(0.5)
    average = make_module(is_causal=True)
    average.load_state_dict(plain.state_dict())
    assert_close(m(x, key_padding_mask=pad)[0], average(x, key_padding_mask=pad)[0])


def test_scale_and_ratio_need_diag():
    for combine in ("scale", "ratio"):
        with pytest.raises(ValueError, match="diag"):
            LLNAttention(E, H, diag=False, combine=combine)


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_need_weights_average(diag, causal):
    m = make_module(diag=diag, is_causal=causal)
    x, pad = make_x(), pad_mask()
    b, n = pad.shape
    out, w = m(x, need_weights=True)
    assert w.shape == (b, n, n) and w.dtype == x.dtype
    assert torch.equal(out, m(x)[0])  # asking for weights does not change the output
    assert_close(w.sum(-1), torch.ones(b, n, dtype=F64))
    _, w_heads = m(x, need_weights=True, average_attn_weights=False)
    assert w_heads.shape == (b, H, n, n)
    assert_close(w_heads.sum(-1), torch.ones(b, H, n, dtype=F64))
    assert_close(w_heads.mean(1), w)
    if causal:
        assert (w_heads.triu(1) == 0).all()

    # weights @ v is the attention output before out_proj, with padding too
    _, w_heads = m(x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    assert (w_heads.masked_select(pad[:, None, None, :]) == 0).all()
    v = split_heads(m.v_proj(x))
    attn = (w_heads @ v).transpose(1, 2).reshape(b, n, E)
    assert_close(m.out_proj(attn), m(x, key_padding_mask=pad)[0], 1e-10)


def test_need_weights_rejected_for_scale():
    m = make_module(combine="scale")
    with pytest.raises(ValueError, match="need_weights"):
        m(make_x(), need_weights=True)


# --------------------------------------------------------------------------------------
# stats modes
# --------------------------------------------------------------------------------------


def per_head_variance(t: Tensor, real: Tensor) -> Tensor:
    """Unbiased variance of all entries of each head over the real tokens of the batch."""
    return torch.stack([t[:, h][real].var() for h in range(t.shape[1])])


def test_batch_stats_have_no_state_to_track():
    m = make_module(stats="batch")
    x = make_x()
    m(x)
    assert torch.equal(m.running_var_q, torch.ones(H))
    assert int(m.num_batches_tracked) == 0
    m.eval()
    assert_close(m(x)[0], manual_forward(m, x))  # eval = per-sequence statistics, too


def test_running_stats_update_in_train_mode():
    momentum = 0.3
    m = make_module(stats="running", momentum=momentum)
    x, pad = make_x(), pad_mask()
    real = ~pad
    with torch.no_grad():
        q, k = split_heads(m.q_proj(x)), split_heads(m.k_proj(x))
    batch_q, batch_k = per_head_variance(q, real), per_head_variance(k, real)
    old_q, old_k = m.running_var_q.clone(), m.running_var_k.clone()
    assert m.running_var_q.dtype == torch.float32

    train_out, _ = m(x, key_padding_mask=pad)
    assert int(m.num_batches_tracked) == 1
    expected_q = (1 - momentum) * old_q.double() + momentum * batch_q
    expected_k = (1 - momentum) * old_k.double() + momentum * batch_k
    torch.testing.assert_close(m.running_var_q.double(), expected_q, rtol=1e-6, atol=0)
    torch.testing.assert_close(m.running_var_k.double(), expected_k, rtol=1e-6, atol=0)
    # train mode uses the batch's own statistics (not the buffers)
    assert_close(train_out, manual_forward(m, x, pad))

    gap_before = (m.running_var_q.double() - batch_q).abs()
    m(x, key_padding_mask=pad)
    assert int(m.num_batches_tracked) == 2
    gap_after = (m.running_var_q.double() - batch_q).abs()
    torch.testing.assert_close(gap_after, (1 - momentum) * gap_before, rtol=1e-5, atol=1e-7)


def test_running_stats_frozen_in_eval_and_used():
    m = make_module(stats="running", momentum=0.5, temperature=1.5)
    x, pad = make_x(), pad_mask()
    for seed in range(3):
        m(make_x(seed=seed + 10) * 2.0)
    assert int(m.num_batches_tracked) == 3
    m.eval()
    var_q, var_k = m.running_var_q.clone(), m.running_var_k.clone()
    out, _ = m(x, key_padding_mask=pad)
    assert torch.equal(m.running_var_q, var_q) and torch.equal(m.running_var_k, var_k)
    assert int(m.num_batches_tracked) == 3
    alpha, beta = buffer_scales(m)
    assert_close(out, manual_forward(m, x, pad, alpha=alpha, beta=beta))
    # and that is not what the per-sequence statistics give
    assert not torch.allclose(out, manual_forward(m, x, pad), atol=1e-4)
    # causal eval uses the same buffer scales
    m_causal = make_module(stats="running", is_causal=True)
    m_causal.load_state_dict(m.state_dict())
    m_causal.temperature = m.temperature
    m_causal.eval()
    ref = manual_forward(m_causal, x, pad, causal=True, alpha=alpha, beta=beta)
    assert_close(m_causal(x, key_padding_mask=pad)[0], ref)


def test_running_buffers_round_trip_through_state_dict():
    m = make_module(stats="running")
    for seed in range(2):
        m(make_x(seed=seed + 20) * 3.0)
    state = m.state_dict()
    for name in ("running_var_q", "running_var_k", "num_batches_tracked"):
        assert name in state
    assert not torch.equal(state["running_var_q"], torch.ones(H))
    fresh = make_module(stats="running", seed=99)
    x = make_x()
    fresh.eval()
    m.eval()
    assert not torch.allclose(fresh(x)[0], m(x)[0], atol=1e-4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.running_var_q, m.running_var_q)
    assert int(fresh.num_batches_tracked) == 2
    assert torch.equal(fresh(x)[0], m(x)[0])


def test_fixed_stats_never_update():
    m = make_module(stats="fixed")
    x, pad = make_x(), pad_mask()
    for _ in range(3):
        out, _ = m(x * 4.0, key_padding_mask=pad)
    assert torch.equal(m.running_var_q, torch.ones(H))
    assert torch.equal(m.running_var_k, torch.ones(H))
    assert int(m.num_batches_tracked) == 0
    alpha, beta = buffer_scales(m)
    assert_close(out, manual_forward(m, x * 4.0, pad, alpha=alpha, beta=beta))
    # calibrated buffers are used as given, in train mode too
    with torch.no_grad():
        m.running_var_q.copy_(torch.tensor([0.5, 2.0]))
        m.running_var_k.copy_(torch.tensor([3.0, 0.25]))
    alpha2, beta2 = buffer_scales(m)
    # literal values, by hand: sigma_tilde = sqrt((var_q var_k - b) / (2a)), paper (a, b)
    want_alpha = torch.tensor([3.533603791570449, 1.199447407000407], dtype=alpha2.dtype)
    want_beta = torch.tensor([1.4425877070852604, 3.392549580666435], dtype=beta2.dtype)
    torch.testing.assert_close(alpha2.flatten(), want_alpha, rtol=2e-7, atol=0)  # fp32 buffers
    torch.testing.assert_close(beta2.flatten(), want_beta, rtol=2e-7, atol=0)
    out2, _ = m(x, key_padding_mask=pad)
    assert_close(out2, manual_forward(m, x, pad, alpha=alpha2, beta=beta2))
    assert torch.equal(m.running_var_q, torch.tensor([0.5, 2.0]))


def test_reset_running_stats():
    m = make_module(stats="running")
    m(make_x() * 3)
    m.reset_running_stats()
    assert torch.equal(m.running_var_q, torch.ones(H))
    assert torch.equal(m.running_var_k, torch.ones(H))
    assert int(m.num_batches_tracked) == 0


# --------------------------------------------------------------------------------------
# temperature
# --------------------------------------------------------------------------------------


def mean_row_entropy(w: Tensor) -> float:
    return -(w * torch.log(w.clamp_min(1e-300))).sum(-1).mean().item()


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("stats", ["batch", "fixed"])
def test_higher_temperature_flattens_attention(diag, stats):
    x = make_x(n=24) * 2.0
    entropies = []
    for temperature in (0.5, 1.0, 2.0, 4.0):
        m = make_module(diag=diag, stats=stats, temperature=temperature)
        _, w = m(x, need_weights=True, average_attn_weights=False)
        entropies.append(mean_row_entropy(w))
    assert all(a < b for a, b in zip(entropies, entropies[1:], strict=False)), entropies
    assert entropies[-1] < math.log(24) + 1e-9


# --------------------------------------------------------------------------------------
# moment-matching constants
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("stats", ["batch", "fixed"])
def test_head_dim_constants_reach_the_ops(diag, causal, stats):
    """constants="head_dim" is what the module computes with, per sequence or from buffers."""
    m = make_module(diag=diag, is_causal=causal, stats=stats, constants="head_dim", chunk_size=8)
    paper = make_module(diag=diag, is_causal=causal, stats=stats)
    with torch.no_grad():
        for module in (m, paper):
            module.running_var_q.copy_(torch.tensor([0.5, 2.0]))
            module.running_var_k.copy_(torch.tensor([3.0, 0.25]))
    x, pad = make_x() * 2.0, pad_mask()
    out, _ = m(x, key_padding_mask=pad)
    alpha, beta = buffer_scales(m) if stats == "fixed" else (None, None)
    assert_close(out, manual_forward(m, x, pad, causal=causal, alpha=alpha, beta=beta))
    assert not torch.allclose(out, paper(x, key_padding_mask=pad)[0], atol=1e-4)
    # the attention matrix (need_weights) uses them too
    w = m(x, key_padding_mask=pad, need_weights=True)[1]
    w_paper = paper(x, key_padding_mask=pad, need_weights=True)[1]
    assert w.shape == w_paper.shape == (3, 20, 20)
    assert not torch.allclose(w, w_paper, atol=1e-4)


# --------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(embed_dim=10, num_heads=3), ValueError, "embed_dim"),
        (dict(combine="sum"), ValueError, "combine"),
        (dict(stats="ema"), ValueError, "stats"),
        (dict(momentum=0.0), ValueError, "momentum"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(constants="d64"), ValueError, "constants must be one of"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    kwargs = {"embed_dim": E, "num_heads": H, **kwargs}
    with pytest.raises(error, match=match):
        LLNAttention(**kwargs)


def test_forward_errors():
    m = make_module()
    x = make_x()
    with pytest.raises(ValueError, match="key .* and value .* must share"):
        m(x, x, x[:, :7])
    with pytest.raises(ValueError, match="cross-attention over 7 keys for 20 queries needs "
                                         "diag=False"):
        m(x, x[:, :7], x[:, :7])  # LLN+Diag pairs query i with key i
    with pytest.raises(ValueError, match="attn_mask is not the causal mask"):
        m(x, attn_mask=torch.zeros(20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.full((3, 20), 0.5))  # float masks: only 0 / -inf
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(3, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.zeros(3, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        m(x[0])  # unbatched
    with pytest.raises(ValueError, match="query"):
        m(make_x(e=E + 1))
    with pytest.raises(ValueError, match="output_final_state"):
        m(x, output_final_state=True)  # not causal


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("combine", ["average", "scale"])
def test_float32_matches_float64(causal, combine):
    m64 = make_module(is_causal=causal, combine=combine)
    m32 = make_module(is_causal=causal, combine=combine, dtype=torch.float32)
    m32.load_state_dict(m64.state_dict())
    x, pad = make_x(), pad_mask()
    out32, _ = m32(x.float(), key_padding_mask=pad)
    out64, _ = m64(x, key_padding_mask=pad)
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-5)


def test_float_padding_mask_like_multihead_attention():
    """nn.TransformerEncoderLayer hands MHA a float mask (-inf = padding): same result."""
    m = make_module()
    x, pad = make_x(), pad_mask()
    float_pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
    torch.testing.assert_close(m(x, key_padding_mask=float_pad)[0],
                               m(x, key_padding_mask=pad)[0])


@pytest.mark.parametrize("stats", ["batch", "fixed", "running"])
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_module(stats, causal):
    ref = make_module(is_causal=causal, stats=stats, combine="ratio", dtype=torch.float32)
    m = make_module(is_causal=causal, stats=stats, combine="ratio", dtype=torch.float32)
    m = m.to(torch.bfloat16)
    x, pad = make_x(dtype=torch.float32), pad_mask()
    out, _ = m(x.bfloat16(), key_padding_mask=pad)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    for p in m.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    expected, _ = ref(x, key_padding_mask=pad)
    # measured max error 5e-3 (outputs up to 1.1): bf16 weights and inputs round to 2^-8
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2)
    m.eval()
    out_eval, _ = m(x.bfloat16(), key_padding_mask=pad)
    assert torch.isfinite(out_eval).all()


# --------------------------------------------------------------------------------------
# nn.MultiheadAttention drop-in: views, copies, cross-attention, masks, need_weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("diag", [True, False])
def test_self_attention_by_value_not_object_identity(diag):
    """``attn(x[:1], x[:1], x[:1])`` (three view objects) and equal copies are
    self-attention: the same output as ``attn(x[:1])``."""
    m = make_module(diag=diag)
    x = make_x()
    ref = m(x[:1])[0]
    assert torch.equal(m(x[:1], x[:1], x[:1])[0], ref)
    assert torch.equal(m(x[:1], x[:1].clone(), x[:1].clone())[0], ref)


@pytest.mark.parametrize("lengths", [(5, 9), (6, 6), (1, 4)])
def test_cross_attention_matches_the_float64_oracle(lengths):
    """Non-causal LLN cross-attention: out = W_o (softmax-free LLN weights of q_proj(query)
    against k_proj(key)) v_proj(value), with the explicit matrix as oracle; padding of keys."""
    from lln import lln_attention_matrix

    n_q, n_k = lengths
    m = make_module(diag=False)
    query, kv = make_x(n=n_q, seed=1), make_x(n=n_k, seed=2) * 2.0
    value = make_x(n=n_k, seed=3)
    pad = torch.zeros(3, n_k, dtype=torch.bool)
    pad[0, n_k - 1] = True  # MHA convention: True = padding
    out, w = m(query, kv, value, key_padding_mask=pad, need_weights=True,
               average_attn_weights=False)
    q, k, v = (split_heads(p(x)) for p, x in ((m.q_proj, query), (m.k_proj, kv),
                                              (m.v_proj, value)))
    weights = lln_attention_matrix(q, k, key_padding_mask=~pad)
    expected = m.out_proj((weights @ v).transpose(1, 2).reshape(3, n_q, E))
    assert_close(out, expected, 1e-12)
    assert w.shape == (3, H, n_q, n_k) and torch.equal(w, weights)
    assert torch.equal(w[0, :, :, n_k - 1], torch.zeros(H, n_q, dtype=F64))


def test_attn_mask_must_be_the_causal_mask_and_is_never_ignored():
    m = make_module()
    x = make_x()
    causal = m(x, is_causal=True)[0]
    float_mask = nn.Transformer.generate_square_subsequent_mask(20, dtype=F64)
    bool_mask = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert torch.equal(m(x, attn_mask=float_mask)[0], causal)  # the mask alone is causal
    assert torch.equal(m(x, attn_mask=bool_mask, is_causal=True)[0], causal)
    assert torch.equal(m(x, attn_mask=bool_mask.expand(3 * H, 20, 20))[0], causal)
    window = bool_mask | torch.ones(20, 20, dtype=torch.bool).tril(-4)  # sliding window
    for mask in (window, ~bool_mask, float_mask.masked_fill(~bool_mask, -1.0),
                 bool_mask[:19, :19]):
        with pytest.raises(ValueError, match="causal mask"):
            m(x, attn_mask=mask, is_causal=True)


def test_need_weights_default_is_documented_false():
    """Unlike nn.MultiheadAttention (True), need_weights defaults to False: no N x N matrix
    unless asked; the docstring says so."""
    import inspect

    m = make_module()
    assert inspect.signature(m.forward).parameters["need_weights"].default is False
    assert m(make_x())[1] is None
    assert "need_weights`` (default **False**" in m.forward.__doc__
