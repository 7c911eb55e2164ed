"""attn_implementation="lln" / "lln_diag" in transformers models built from tiny random configs.

Oracles: the explicit (B, H, L, S) matrices of lln.ops.naive (float64, tolerance 1e-10) and
per-sample runs of the same model (a padded batch must reproduce them: float64, 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lln  # noqa: E402
import lln.hf  # noqa: E402
from lln.hf.attention import hf_attention  # noqa: E402

TOL = 1e-10
VOCAB = 61
#: BERT calls its attention through AttentionInterface from transformers 5 on (4.x: fixed classes)
bert_interface = pytest.mark.skipif(
    not transformers.BertModel._supports_attention_backend,
    reason=f"BERT does not use AttentionInterface in transformers {transformers.__version__}",
)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    torch.set_num_threads(1)
    lln.hf.register()


def llama(impl: str, *, seed: int = 0, kv_heads: int = 2) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    return model.to(torch.float64).eval()


def bert(impl: str, *, seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(cfg, attn_implementation=impl)
    return model.to(torch.float64).eval()


def ids(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


class FakeAttention(nn.Module):
    """The attributes transformers' attention modules expose to the attention function."""

    def __init__(self, config, *, is_causal: bool, groups: int, scaling: float) -> None:
        super().__init__()
        self.config, self.is_causal, self.layer_idx = config, is_causal, 0
        self.num_key_value_groups, self.scaling = groups, scaling


def _fake(is_causal: bool, groups: int = 1, d: int = 8, scaling: float | None = None):
    cfg = transformers.LlamaConfig(num_attention_heads=4, _attn_implementation="lln")
    return FakeAttention(cfg, is_causal=is_causal, groups=groups,
                         scaling=d ** -0.5 if scaling is None else scaling)


def test_register_is_idempotent_and_fills_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert lln.hf.register() == lln.hf.register() == ["lln", "lln_diag"]
    for name in ("lln", "lln_diag"):
        assert name in AttentionInterface._global_mapping
        assert AttentionMaskInterface._global_mapping[name] is lln.hf.padding_mask


def test_too_old_transformers_is_refused_by_name(monkeypatch):
    """Importing lln.hf with transformers older than the bound names both versions."""
    import importlib

    import lln.hf._requirements as requirements

    monkeypatch.setattr("transformers.__version__", "4.55.4")  # the module lln.hf imports
    with pytest.raises(ImportError, match=r"transformers >= 4\.56, found 4\.55\.4"):
        importlib.reload(requirements)
    monkeypatch.undo()
    importlib.reload(requirements)  # the real version passes


@pytest.mark.parametrize("n", [1, 13])
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_function_matches_oracle_with_gqa(n, is_causal):
    """(B, L, H, D) output = the explicit LLN matrix on GQA-expanded k, v."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64)
    out, weights = lln.hf.lln_hf_attention(_fake(is_causal, groups=2), q, k, v, None,
                                           scaling=8 ** -0.5)
    assert weights is None and out.shape == (2, n, 4, 8)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expected = lln.lln_attention_matrix(q, ke, is_causal=is_causal) @ ve
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=TOL, atol=TOL)


def test_scaling_is_applied_to_the_queries():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    scaling = 0.2
    out, _ = lln.hf.lln_diag_hf_attention(_fake(True, scaling=scaling), q, k, v, None,
                                          scaling=scaling)
    q_eff = q * scaling * math.sqrt(8)
    expected = lln.lln_diag_attention_matrix(q_eff, k, is_causal=True) @ v
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_lln_diag_padded_rows_equal_per_sample_oracle(side):
    """Diagonal blocks start at each sequence's first real token, whatever the padding."""
    g = torch.Generator().manual_seed(5)
    n, real = 11, 7
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, n, dtype=torch.bool)
    rows = slice(n - real, n) if side == "left" else slice(0, real)
    mask[1] = False
    mask[1, rows] = True
    out, _ = lln.hf.lln_diag_hf_attention(_fake(True), q, k, v, mask)
    alone = lln.lln_diag_attention_matrix(q[1:, :, rows], k[1:, :, rows], is_causal=True)
    expected = alone @ v[1:, :, rows]
    torch.testing.assert_close(out[1:, rows].transpose(1, 2), expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("impl", ["lln", "lln_diag"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_padded_batch_equals_per_sample(impl, side):
    model = llama(impl)
    n, lengths = 12, (12, 7, 1)
    x = ids(3, n)
    mask = torch.zeros(3, n, dtype=torch.long)
    for i, m in enumerate(lengths):
        mask[i, n - m:] = 1 if side == "left" else 0
        mask[i, :m] = 1 if side == "right" else mask[i, :m]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(x, attention_mask=mask, position_ids=pos).logits
        unmasked = model(x, position_ids=pos).logits
        for i, m in enumerate(lengths):
            rows = slice(n - m, n) if side == "left" else slice(0, m)
            alone = model(x[i:i + 1, rows]).logits[0]
            torch.testing.assert_close(batch[i, rows], alone, rtol=TOL, atol=TOL)
    # the mask really reaches the attention: ignoring it changes the padded samples
    rows = slice(n - 7, n) if side == "left" else slice(0, 7)
    if side == "left":
        assert (unmasked[1, rows] - batch[1, rows]).abs().max() > 1e-3


@bert_interface
@pytest.mark.parametrize("impl", ["lln", "lln_diag"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_bert_padded_batch_equals_per_sample(impl, side):
    model = bert(impl)
    n, m = 10, 6
    x = ids(2, n, seed=2)
    mask = torch.ones(2, n, dtype=torch.long)
    rows = slice(n - m, n) if side == "left" else slice(0, m)
    mask[1] = 0
    mask[1, rows] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # BERT positions are absolute: match them
    with torch.no_grad():
        batch = model(x, attention_mask=mask, position_ids=pos).last_hidden_state
        alone = model(x[1:, rows]).last_hidden_state[0]
        full = model(x[:1]).last_hidden_state[0]
        ignored = model(x, position_ids=pos).last_hidden_state
    torch.testing.assert_close(batch[1, rows], alone, rtol=TOL, atol=TOL)
    torch.testing.assert_close(batch[0], full, rtol=TOL, atol=TOL)
    assert (ignored[1, rows] - batch[1, rows]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["lln", "lln_diag"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_llama_is_strictly_causal(impl, calibrated):
    model = llama(impl)
    if calibrated:
        lln.hf.calibrate(model, [ids(2, 16, seed=9)], progress=False)
    x = ids(1, 14)
    y = x.clone()
    y[0, 9:] = (y[0, 9:] + 5) % VOCAB
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[0, :9], b[0, :9], rtol=0, atol=1e-12)
    assert (a[0, 9:] - b[0, 9:]).abs().max() > 1e-3


def test_gqa_model_equals_model_with_repeated_kv_heads():
    """kv_heads=2 (GQA) = the same weights with k/v projections repeated to 4 heads (MHA)."""
    gqa, mha = llama("lln", kv_heads=2), llama("lln", kv_heads=4)
    state = gqa.state_dict()
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(2, 8, -1).repeat_interleave(2, 0).reshape(32, -1)
    mha.load_state_dict(state)
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=TOL, atol=TOL)


def test_dropout_acts_in_training_only():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    module = _fake(False)
    module.eval()
    a, _ = lln.hf.lln_hf_attention(module, q, k, v, None, dropout=0.5)
    b, _ = lln.hf.lln_hf_attention(module, q, k, v, None, dropout=0.0)
    torch.testing.assert_close(a, b)
    module.train()
    torch.manual_seed(0)
    c, _ = lln.hf.lln_hf_attention(module, q, k, v, None, dropout=0.5)
    assert (c - b).abs().max() > 1e-3


def test_bad_masks_and_heads_raise():
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        lln.hf.lln_hf_attention(_fake(True), q, k, k, None)
    k = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match="2-D"):
        lln.hf.lln_hf_attention(_fake(True), q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        lln.hf.lln_hf_attention(_fake(True), q, k, k, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_key_value_groups"):
        lln.hf.lln_hf_attention(_fake(True, groups=2), q, k, k, None)


def test_dynamic_cache_without_calibration_raises():
    """Moment matching needs past query statistics, which a k/v cache does not keep."""
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="LLNCache"):
        hf_attention("lln", _fake(True), q, k, k, None)


def test_packed_or_sliding_mask_patterns_raise():
    with pytest.raises(ValueError, match="plain causal or bidirectional"):
        lln.hf.padding_mask(1, kv_length=3, mask_function=lambda b, h, q, kv: True,
                            attention_mask=torch.ones(1, 3))


def test_registry_baseline_through_transformers():
    names = lln.hf.register(baselines=("elu",))
    assert "lln_elu" in names
    model = llama("lln_elu")
    n, m = 10, 6
    x = ids(2, n)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, : n - m] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = model(x, attention_mask=mask, position_ids=pos).logits
        alone = model(x[1:, n - m:]).logits[0]
    torch.testing.assert_close(batch[1, n - m:], alone, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="registry attention"):
        lln.hf.register(baselines=("no_such_attention",))
