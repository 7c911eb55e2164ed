"""Calibration (frozen per-layer/per-head alpha, beta), trainable LLN parameters, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lln  # noqa: E402
import lln.hf  # noqa: E402
from lln.ops.moment_matching import moment_constants  # noqa: E402

VOCAB = 47


def written_out_scales(var_q, var_k, *, temperature=1.0, a=0.14855178144710912,
                       b=-0.35487039130661086):
    """The moment-matching formula written out here (independent of the library)."""
    sigma_tilde = torch.sqrt((var_q * var_k - b) / (2 * a)) / temperature
    return sigma_tilde / var_q.sqrt(), sigma_tilde / var_k.sqrt()


@pytest.fixture(autouse=True, scope="module")
def _registered():
    torch.set_num_threads(1)
    lln.hf.register()


def llama(impl: str = "lln_diag", seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    return model.to(torch.float64).eval()


def ids(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def test_record_and_freeze_match_explicit_moments():
    """sigma over real entries only (unbiased), then SPEC section 3 moment matching."""
    params = lln.hf.LLNAttentionParams(3)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 3, 7, 5, generator=g, dtype=torch.float64) + 1
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False
    params.start_calibration()
    params.record(q[:, :, :4], k[:, :, :4], mask[:, :4])  # two batches
    params.record(q[:, :, 4:], k[:, :, 4:], mask[:, 4:])
    sig = params.finish_calibration(temperature=2.0)
    for h in range(3):
        qs = torch.cat([q[0, h].flatten(), q[1, h, 3:].flatten()])
        ks = torch.cat([k[0, h].flatten(), k[1, h, 3:].flatten()])
        assert math.isclose(sig["sigma_q"][h].item(), qs.std().item(), rel_tol=1e-6)
        assert math.isclose(sig["sigma_k"][h].item(), ks.std().item(), rel_tol=1e-6)
        a, b = written_out_scales(qs.var(), ks.var(), temperature=2.0)
        alpha, beta = params.scales()
        assert math.isclose(alpha.flatten()[h].item(), a.item(), rel_tol=1e-5)
        assert math.isclose(beta.flatten()[h].item(), b.item(), rel_tol=1e-5)
    assert bool(params.calibrated) and not params.recording


def test_finish_calibration_head_dim_constants():
    """constants="head_dim" freezes the scales with the constants of the recorded head dim."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 32, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(2, 3, 7, 32, generator=g, dtype=torch.float64) + 1
    scales = {}
    for constants in ("paper", "head_dim"):
        params = lln.hf.LLNAttentionParams(3)
        params.start_calibration()
        params.record(q, k, None)
        params.finish_calibration(constants=constants)
        scales[constants] = [s.detach().flatten() for s in params.scales()]
    var_q, var_k = q.var((0, 2, 3)), k.var((0, 2, 3))
    a32, b32 = moment_constants(32)
    for constants, ab in (("paper", {}), ("head_dim", {"a": a32, "b": b32})):
        want = written_out_scales(var_q, var_k, **ab)
        for got, expected in zip(scales[constants], want, strict=True):
            torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=0)
    assert not torch.allclose(scales["paper"][0], scales["head_dim"][0], rtol=1e-3)
    params = lln.hf.LLNAttentionParams(3)
    params.start_calibration()
    params.record(q, k, None)
    with pytest.raises(ValueError, match=r"\bconstants must be one of"):
        params.finish_calibration(constants="D")
    assert params.recording  # a bad mode is refused before the statistics are consumed
    with pytest.raises(ValueError, match="not both"):
        params.finish_calibration(constants="head_dim", a=0.2)


def test_calibration_misuse_raises():
    params = lln.hf.LLNAttentionParams(2)
    with pytest.raises(RuntimeError):
        params.finish_calibration()
    params.start_calibration()
    with pytest.raises(ValueError, match="fewer than 2"):
        params.finish_calibration()
    with pytest.raises(ValueError, match="num_heads"):
        lln.hf.LLNAttentionParams(0)
    with pytest.raises(ValueError, match="forward"):
        params.start_calibration(forward="exact")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation"):
        lln.hf.calibrate(eager, [ids(1, 4)], progress=False)


def test_softmax_teacher_forward_while_recording_equals_sdpa_model():
    model = llama("lln")
    sdpa = llama("sdpa")  # (eager computes its softmax in float32)
    x = ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    for params in lln.hf.attach(model).values():
        params.start_calibration(forward="softmax")
    with torch.no_grad():
        teacher = model(x, attention_mask=mask).logits
        reference = sdpa(x, attention_mask=mask).logits
    torch.testing.assert_close(teacher[0], reference[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(teacher[1, 3:], reference[1, 3:], rtol=1e-10, atol=1e-10)


def test_calibrated_model_is_independent_of_batch_composition():
    model = llama("lln_diag")
    stats = lln.hf.calibrate(model, [ids(2, 12, seed=3), (ids(1, 8), torch.ones(1, 8))],
                             progress=False)
    assert len(stats) == 2
    for s in stats.values():
        assert s["alpha"].shape == (4,) and bool((s["alpha"] > 0).all())
        assert bool(torch.isfinite(s["beta"]).all())
    x = ids(3, 10, seed=4)
    with torch.no_grad():
        together = model(x).logits
        alone = model(x[1:2]).logits
    torch.testing.assert_close(together[1], alone[0], rtol=1e-10, atol=1e-10)
    # frozen scales: the output of token t no longer depends on the statistics of 0..t
    layer = next(iter(lln.hf.attach(model).values()))
    assert layer.scales()[0].shape == (1, 4, 1, 1)


def test_lln_parameters_receive_gradients():
    model = llama("lln_diag")
    lln.hf.calibrate(model, [ids(2, 10)], progress=False)
    named = dict(lln.hf.named_lln_parameters(model))
    assert len(named) == 2 * 5
    assert "model.layers.1.self_attn.lln.log_temperature" in named
    model.requires_grad_(False)
    for p in named.values():
        p.requires_grad_(True)
    loss = model(ids(2, 10, seed=2), labels=ids(2, 10, seed=2)).loss
    loss.backward()
    for name, p in named.items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_save_pretrained_round_trip(tmp_path):
    model = llama("lln_diag")
    lln.hf.attach(model, options={"chunk_size": 8, "block_size": 3})
    lln.hf.calibrate(model, [ids(2, 11)], temperature=1.5, progress=False)
    with torch.no_grad():  # pretend attention transfer trained these
        for params in lln.hf.attach(model).values():
            params.lln_weight.add_(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64))
    x = ids(2, 13, seed=8)
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lln"]["options"]["block_size"] == 3
    layer0 = saved["lln"]["layers"]["0"]
    assert layer0["calibrated"] is True
    assert math.isclose(layer0["lln_weight"][1], 0.3, rel_tol=1e-6)
    assert math.isclose(math.exp(layer0["log_temperature"][0]), 1.5, rel_tol=1e-6)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [key for key in f.keys() if ".lln." in key]  # values live in config.json
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="lln_diag"
    ).to(torch.float64).eval()
    with torch.no_grad():
        after = loaded(x).logits
    # the parameters are float32 in config.json; logits agree to float32 rounding
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    reloaded = dict(lln.hf.named_lln_parameters(loaded))
    original = dict(lln.hf.named_lln_parameters(model))
    for name, p in original.items():
        torch.testing.assert_close(reloaded[name].double(), p.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("constants", ["paper", "head_dim"])
def test_uncalibrated_model_moment_matches_per_sequence(constants):
    """Before calibration the layer equals the op with run-time (prefix) moment matching, with
    the constants of config.lln["options"] (default "paper")."""
    model = llama("lln")
    if constants != "paper":
        lln.hf.attach(model, options={"constants": constants})
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64)
    out, _ = lln.hf.lln_hf_attention(attn, q, k, k, None, scaling=attn.scaling)
    ke = k.repeat_interleave(2, 1)
    expected = lln.lln_attention(q, ke, ke, is_causal=True, constants=constants)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-12, atol=1e-12)
    if constants != "paper":
        paper = lln.lln_attention(q, ke, ke, is_causal=True)
        assert not torch.allclose(out.transpose(1, 2), paper, rtol=1e-6, atol=0)


def test_head_dim_constants_in_calibrate_and_options():
    """calibrate(constants=...) freezes scales from the chosen constants; bad values fail
    before any recording."""
    scales = {}
    for constants in ("paper", "head_dim"):
        model = llama("lln")
        lln.hf.calibrate(model, [ids(2, 9)], constants=constants, progress=False)
        scales[constants] = model.model.layers[0].self_attn.lln.scales()[0].detach()
    assert not torch.allclose(scales["paper"], scales["head_dim"])
    with pytest.raises(ValueError, match="constants"):
        lln.hf.calibrate(llama("lln"), [ids(2, 9)], constants="d64", progress=False)
    with pytest.raises(ValueError, match="constants"):
        lln.hf.attach(llama("lln"), options={"constants": "d64"})


def test_checkpoint_option_gives_the_same_gradients(monkeypatch):
    """options checkpoint=True is accepted and changes no value or gradient (it no longer
    checkpoints anything: the LLN kernels' backward recomputes segment by segment itself);
    chunk_size 2 makes the 41 tokens span two 32-token segments."""
    import torch.utils.checkpoint as ckpt

    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    grads = {}
    for checkpoint in (False, True):
        model = llama("lln_diag")
        lln.hf.attach(model, options={"chunk_size": 2, "checkpoint": checkpoint})
        lln.hf.calibrate(model, [ids(2, 9)], progress=False)
        model.model.layers[0].self_attn.lln.log_alpha.data += 0.1  # not at a special point
        logits = model(ids(2, 41)).logits
        logits.square().mean().backward()
        grads[checkpoint] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert len(grads[checkpoint]) > 10
        assert not calls
    for plain, recomputed in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-12)
