"""LLNCache: decoding through the LLN state equals the no-cache forward, at O(1) state size.

Oracle: the full forward of the same model over the whole sequence (float64, 1e-10).
Prefill lengths are not multiples of the chunk (4) or block (5) sizes set below.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lln.hf  # noqa: E402

TOL = 1e-10
VOCAB = 53


@pytest.fixture(autouse=True, scope="module")
def _registered():
    torch.set_num_threads(1)
    lln.hf.register()


def llama(impl: str, *, calibrated: bool = False, seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    model = model.to(torch.float64).eval()
    model.generation_config.eos_token_id = None  # generate a fixed number of tokens
    lln.hf.attach(model, options={"chunk_size": 4, "block_size": 5})
    if calibrated:
        lln.hf.calibrate(model, [ids(2, 12, seed=7)], progress=False)
    return model


def ids(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def cache_kwarg(fn) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (forward and generate)."""
    if "cache" in inspect.signature(fn).parameters:
        return "cache"
    major = int(transformers.__version__.split(".")[0])
    return "cache" if major >= 5 else "past_key_values"


@pytest.mark.parametrize("impl", ["lln", "lln_diag"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_stepwise_decoding_logits_equal_full_forward(impl, calibrated):
    model = llama(impl, calibrated=calibrated)
    x = ids(2, 17)
    prefill = 7
    cache = lln.hf.LLNCache()
    kw = cache_kwarg(model.forward)
    with torch.no_grad():
        full = model(x).logits
        steps = [model(x[:, :prefill], **{kw: cache}).logits]
        for t in range(prefill, 17):
            steps.append(model(x[:, t:t + 1], **{kw: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=TOL, atol=TOL)
    assert cache.get_seq_length() == 17


@pytest.mark.parametrize("impl", ["lln", "lln_diag"])
def test_generate_with_cache_equals_greedy_without(impl):
    model = llama(impl)
    x = ids(1, 9, seed=3)
    kw = cache_kwarg(model.generate)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=10, do_sample=False,
                             **{kw: lln.hf.LLNCache()})
        seq = x
        for _ in range(10):  # greedy decoding with full forwards, no cache at all
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("impl", ["lln", "lln_diag"])
def test_left_padded_batch_generate_equals_per_sample(impl):
    model = llama(impl, calibrated=True)
    x = ids(2, 11, seed=4)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0
    kw = cache_kwarg(model.generate)
    with torch.no_grad():
        batch = model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=0, **{kw: lln.hf.LLNCache()})
        alone = model.generate(x[1:, 4:], max_new_tokens=8, do_sample=False, pad_token_id=0,
                               **{kw: lln.hf.LLNCache()})
    assert torch.equal(batch[1, 4:], alone[0])


def test_state_size_does_not_grow_with_context():
    model = llama("lln_diag")
    cache = lln.hf.LLNCache()
    kw = cache_kwarg(model.forward)
    sizes = []
    with torch.no_grad():
        model(ids(1, 6), **{kw: cache})
        for t in range(30):
            model(ids(1, 1, seed=t), **{kw: cache})
            layer = cache.layers[0]
            numel = sum(x.numel() for x in (layer.state.kv, layer.state.k_sum, layer.state.k_max,
                                            layer.window.k, layer.window.v))
            sizes.append(numel)
    assert len(set(sizes)) == 1
    assert cache.layers[0].state.position == 36


def test_dynamic_cache_fallback_equals_lln_cache_when_calibrated():
    model = llama("lln_diag", calibrated=True)
    x = ids(1, 8, seed=5)
    kw = cache_kwarg(model.generate)
    with torch.no_grad():
        fast = model.generate(x, max_new_tokens=6, do_sample=False, **{kw: lln.hf.LLNCache()})
        slow = model.generate(x, max_new_tokens=6, do_sample=False)  # DynamicCache
    assert torch.equal(fast, slow)


def test_reorder_cache_selects_batch_entries():
    model = llama("lln_diag")
    cache = lln.hf.LLNCache()
    with torch.no_grad():
        model(ids(3, 7), **{cache_kwarg(model.forward): cache})
    before = cache.layers[1].state.kv.clone(), cache.layers[1].window.count.clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.layers[1].state.kv, before[0][[2, 2, 0]])
    assert torch.equal(cache.layers[1].window.count, before[1][[2, 2, 0]])
    with pytest.raises(NotImplementedError):
        cache.crop(1)


def test_cache_with_non_lln_attention_raises():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    cache = lln.hf.LLNCache()
    kw = cache_kwarg(model.forward)
    with torch.no_grad(), pytest.raises(Exception, match="LLN"):
        model(ids(1, 3), **{kw: cache})
        model(ids(1, 1), **{kw: cache})


def test_beam_search_with_cache_equals_dynamic_cache():
    model = llama("lln_diag", calibrated=True)
    x = ids(2, 9, seed=6)
    kw = cache_kwarg(model.generate)
    with torch.no_grad():
        fast = model.generate(x, num_beams=3, max_new_tokens=6, do_sample=False,
                              **{kw: lln.hf.LLNCache()})
        slow = model.generate(x, num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_window_decode_step_equals_the_compacting_path(dtype):
    """The one-token window step (no sort/gather, no copy) equals the general aligned path
    on random windows: per-sample counts including 0 and block_size - 1, real and padded
    tokens."""
    from lln.hf import local

    g = torch.Generator().manual_seed(3)
    b, h, w, d = 5, 2, 4, 6
    window = local.DiagWindow(
        torch.randn(b, h, w, d, generator=g, dtype=torch.float64).to(dtype),
        torch.randn(b, h, w, d, generator=g, dtype=torch.float64).to(dtype),
        torch.tensor([0, 1, 3, 3, 2]),
    )
    q, k, v = (torch.randn(b, h, 1, d, generator=g, dtype=torch.float64).to(dtype)
               for _ in range(3))
    mask = torch.tensor([[True], [False], [True], [False], [True]])
    for m in (None, mask):
        given = window.map(torch.clone)  # the step writes into the window it is given
        fast, fast_window = local._window_step(q, k, v, m, given, block_size=w, scale=0.4,
                                               output_window=True)
        assert fast_window.k is given.k  # in place: no copy of the window per token
        # the general path, forced by a second (padded) token that is dropped afterwards
        pad = torch.zeros(b, 1, dtype=torch.bool)
        real = torch.ones(b, 1, dtype=torch.bool) if m is None else m
        slow, slow_window = local.aligned_block_diag(
            torch.cat([q, q], 2), torch.cat([k, k], 2), torch.cat([v, v], 2),
            torch.cat([real, pad], 1), block_size=w, scale=0.4, is_causal=True,
            window=window, output_window=True,
        )
        assert rel_err_max(fast, slow[:, :, :1]) <= (1e-12 if dtype == torch.float64 else 1e-6)
        assert torch.equal(fast_window.count, slow_window.count)
        for i in range(b):  # the kept slots agree (slots past count are free)
            c = int(fast_window.count[i])
            assert torch.equal(fast_window.k[i, :, :c], slow_window.k[i, :, :c])
            assert torch.equal(fast_window.v[i, :, :c], slow_window.v[i, :, :c])


def rel_err_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_calibrated_scales_are_cached_for_inference_and_follow_updates():
    """Decoding reuses the scales (no per-token recompute or host read of `calibrated`);
    an in-place update of a parameter (an optimizer step, a load) is seen at once."""
    model = llama("lln", calibrated=True)
    params = next(iter(lln.hf.attach(model).values()))
    with torch.no_grad():
        first = params.scales()
        assert params.scales()[0] is first[0]  # cached
        params.log_temperature.add_(0.5)
        updated = params.scales()
    assert updated[0] is not first[0]
    torch.testing.assert_close(updated[0], first[0] * torch.exp(torch.tensor(-0.5)))
    assert params.scales()[0].requires_grad  # grad mode: computed, with the graph
