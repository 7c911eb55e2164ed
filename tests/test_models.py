"""Models with a pluggable attention: padding, causality, parameter counts, random features.

Exactness checks run the models in float64 with a relative tolerance of 1e-9 (the ops are
exact up to rounding in float64; the quadratic oracles of each op are tested in the ops'
own test files).
"""

from __future__ import annotations

import pytest
import torch

from lln.models import DecoderLM, EncoderClassifier, SelfAttention, parameter_counts
from lln.models.transformer import ShortConv
from lln.ops.registry import get_attention

# lln_reference is left out: no padding, and its causal mode looks ahead (not trainable).
TRAINABLE = ["softmax", "lln", "lln_diag", "block_diag", "elu", "performer", "cosformer",
             "nystrom"]
CAUSAL = [a for a in TRAINABLE if get_attention(a).supports_causal]
SIZES = dict(dim=32, depth=2, num_heads=2, mlp_ratio=2)
# small options so that sequences of 13 tokens cross block / landmark boundaries
OPTIONS = {"lln_diag": {"block_size": 4}, "block_diag": {"block_size": 4},
           "nystrom": {"num_landmarks": 4}, "performer": {"num_features": 24}}


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def ids(b: int, n: int, vocab: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", TRAINABLE)
def test_encoder_padding_equals_unpadded(attn):
    """Logits of a right-padded batch equal each sequence run alone (mean pool over real)."""
    torch.manual_seed(0)
    model = EncoderClassifier(20, 16, 5, attention=attn, options=OPTIONS.get(attn), **SIZES)
    model = model.double().eval()
    lengths = [13, 7, 1]
    x = ids(3, 13)
    mask = torch.arange(13) < torch.tensor(lengths).unsqueeze(1)
    batched = model(x.masked_fill(~mask, 0), mask)
    assert batched.shape == (3, 5)
    for i, n in enumerate(lengths):
        alone = model(x[i : i + 1, :n])
        assert rel(batched[i], alone[0]) < 1e-9, (attn, n)


@pytest.mark.parametrize("attn", CAUSAL)
def test_decoder_is_causal(attn):
    """Changing tokens after position t leaves the logits at positions <= t unchanged."""
    torch.manual_seed(0)
    model = DecoderLM(20, 16, attention=attn, options=OPTIONS.get(attn), **SIZES)
    model = model.double().eval()
    x = ids(2, 13)
    y = x.clone()
    y[:, 9:] = ids(2, 4, seed=1)
    a, b = model(x), model(y)
    assert a.shape == (2, 13, 20)
    assert rel(a[:, :9], b[:, :9]) < 1e-9
    assert rel(a[:, 9:], b[:, 9:]) > 1e-3  # the later positions did change


def test_same_parameter_count_across_attentions():
    counts = {
        a: parameter_counts(EncoderClassifier(20, 16, 5, attention=a, **SIZES)) for a in TRAINABLE
    }
    assert len({c["total"] for c in counts.values()}) == 1, counts
    assert all(c["attention_extra"] == 0 for c in counts.values())
    scaled = parameter_counts(EncoderClassifier(
        20, 16, 5, attention="lln_diag", options={"combine": "scale"}, **SIZES))
    # r and p of shape (1, H, 1, head_dim) per layer: 2 * dim per layer
    assert scaled["attention_extra"] == 2 * SIZES["dim"] * SIZES["depth"]
    assert scaled["total"] == counts["lln"]["total"] + scaled["attention_extra"]


def test_lln_diag_scale_weights_are_trained():
    torch.manual_seed(0)
    model = DecoderLM(20, 16, attention="lln_diag",
                      options={"combine": "scale", "block_size": 4}, **SIZES)
    model(ids(2, 13)).logsumexp(-1).sum().backward()
    attn = model.trunk.blocks[0].attn
    assert attn.lln_weight.grad is not None and attn.lln_weight.grad.abs().sum() > 0
    assert attn.diag_weight.grad is not None and attn.diag_weight.grad.abs().sum() > 0


def test_random_features_redraw_schedule():
    """The projection is a seeded buffer; it changes every redraw_every training forwards,
    never in eval; equal seeds give equal draws, and the state dict carries the schedule."""
    x = torch.randn(2, 9, 32)

    def make(seed: int = 0) -> SelfAttention:
        return SelfAttention(32, 2, attention="performer", options={"num_features": 16},
                             redraw_every=2, seed=seed, layer=1)

    module = make()
    first = module.projection.clone()
    assert first.shape == (16, 16)
    assert torch.equal(first, make().projection)
    assert not torch.equal(first, make(seed=1).projection)
    module.eval()
    for _ in range(3):
        module(x)
    assert torch.equal(module.projection, first)
    module.train()
    module(x)
    module(x)
    assert torch.equal(module.projection, first)  # forwards 0 and 1 use draw 0
    module(x)
    second = module.projection.clone()
    assert not torch.equal(second, first)  # forward 2 redraws
    copy = make()
    copy.load_state_dict(module.state_dict())
    assert torch.equal(copy.projection, second) and int(copy.training_forwards) == 3
    module(x), copy(x)
    module(x), copy(x)
    assert torch.equal(module.projection, copy.projection)
    assert not torch.equal(module.projection, second)


def test_non_random_attentions_have_no_buffers():
    module = SelfAttention(32, 2, attention="lln")
    assert dict(module.named_buffers()) == {}


def test_errors():
    with pytest.raises(ValueError, match="unknown attention"):
        SelfAttention(32, 2, attention="nope")
    with pytest.raises(ValueError, match="is_causal"):
        SelfAttention(32, 2, attention="nystrom", is_causal=True)
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(30, 4)
    with pytest.raises(ValueError, match="lln_diag only"):
        SelfAttention(32, 2, attention="lln", options={"combine": "scale"})
    with pytest.raises(ValueError, match="combine must be one of"):
        SelfAttention(32, 2, attention="lln_diag", options={"combine": "ratio?"})
    with pytest.raises(ValueError, match="redraw_every"):
        SelfAttention(32, 2, attention="performer", redraw_every=0)
    module = SelfAttention(32, 2, attention="lln_reference")
    mask = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="does not support padding"):
        module(torch.randn(1, 3, 32), mask)
    module(torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))  # no padding: fine
    model = EncoderClassifier(20, 8, 3, **SIZES)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(ids(1, 9))
    with pytest.raises(ValueError, match="long tensor"):
        model(ids(1, 4).float())
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(ids(1, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="is_causal"):
        EncoderClassifier(20, 8, 3, is_causal=True)
    with pytest.raises(ValueError, match="is_causal"):
        DecoderLM(20, 8, is_causal=False)
    with pytest.raises(ValueError, match="dropout"):
        DecoderLM(20, 8, dropout=1.0)


@pytest.mark.parametrize("attn", ["softmax", "lln_diag"])
def test_short_conv_keeps_padding_exact_and_causality(attn):
    """The causal depthwise convolution neither leaks padding (either side) nor the future."""
    torch.manual_seed(0)
    kw = dict(SIZES, short_conv=3, attention=attn, options=OPTIONS.get(attn))
    encoder = EncoderClassifier(20, 16, 5, **kw).double().eval()
    assert parameter_counts(encoder)["total"] == parameter_counts(
        EncoderClassifier(20, 16, 5, **dict(kw, short_conv=0)))["total"] + 3 * 32 * 2
    x = ids(2, 10)
    right = torch.arange(10) < torch.tensor([[10], [6]])
    out = encoder(x.masked_fill(~right, 0), right)
    assert rel(out[1], encoder(x[1:, :6])[0]) < 1e-9
    # left padding (absolute positions shift, so test the convolution itself)
    conv = ShortConv(32, 3).double()
    h = torch.randn(2, 10, 32, dtype=torch.float64)
    left = right.flip(1)
    out = conv(h, left)
    assert rel(out[1, 4:], conv(h[1:, 4:], None)[0]) < 1e-9
    decoder = DecoderLM(20, 16, **kw).double().eval()
    y = x.clone()
    y[:, 7:] = ids(2, 3, seed=2)
    assert rel(decoder(x)[:, :7], decoder(y)[:, :7]) < 1e-9
