"""Concentration of a pretrained encoder's attention, and what LLN does to it (no training).

:func:`analyze_encoder` runs a Hugging Face BERT-like encoder (e.g. MiniLM from
:func:`lln.pretrained.minilm.load_minilm`) on tokenised sentences once per attention method.
For a method other than the model's own, every self-attention layer keeps its own query, key
and value projections and replaces only the attention weights: softmax(q k^T / sqrt(D)) by
the explicit matrix of the method (:func:`lln.analysis.attention_matrix`) — moment-matched
LLN, LLN+Diag, ... — computed per layer from that layer's q and k. The swap goes through
transformers' ``AttentionInterface`` (registered as ``"lln_analysis"``), so the rest of the
model runs unchanged. For every (layer, head, sentence) matrix it records the concentration
instruments, and per sentence the cosine similarity of the final mean-pooled embedding to the
original model's.

Sentences run one at a time (batch 1, no padding): each matrix is exactly the sentence's
``L x L`` attention and no padding mask is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .instruments import log_normality, mean_entropy, spectral_gap
from .matrices import analysis_methods, attention_matrix

#: Name under which the analysis attention is registered with transformers.
INTERFACE_NAME = "lln_analysis"
#: Default methods: the model's softmax, moment-matched LLN, LLN with head-dim constants,
#: LLN+Diag.
DEFAULT_METHODS = ("softmax", "lln", "lln_dim", "lln_diag")
#: Per-matrix metrics.
METRICS = ("norm_entropy", "gap", "var_log_p", "skewness", "excess_kurtosis", "k2", "p_value")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the encoder analysis needs transformers: pip install lln[hf]") from err
    return transformers


class _Recorder:
    """The attention function handed to transformers: applies ``method``, records metrics."""

    def __init__(self, method: str, sample_size: int):
        self.method = method
        self.sample_size = sample_size
        self.layers: dict[int, int] = {}
        self.records: dict[int, list[dict[str, np.ndarray]]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        if query.shape[0] != 1:
            raise ValueError("the encoder analysis runs one sentence at a time (batch 1)")
        layer = self.layers.setdefault(id(module), len(self.layers))
        options = {"scale": scaling} if self.method == "softmax" else {}
        p = attention_matrix(self.method, query, key, **options)
        with torch.no_grad():
            p64 = p.detach()[0]  # (H, L, L); instruments work in float64
            stats = log_normality(p64, sample_size=self.sample_size)
            record = {
                "norm_entropy": mean_entropy(p64, normalize=True).numpy(),
                "gap": spectral_gap(p64).numpy(),
                "var_log_p": stats.var.numpy(), "skewness": stats.skewness.numpy(),
                "excess_kurtosis": stats.excess_kurtosis.numpy(), "k2": stats.k2.numpy(),
                "p_value": stats.p_value.numpy(),
            }
        self.records.setdefault(layer, []).append(record)
        out = p.to(value.dtype) @ value
        return out.transpose(1, 2).contiguous(), p


def _sentence_embedding(hidden: Tensor) -> Tensor:
    """Mean over tokens of ``(1, L, E)`` then L2-normalised: ``(E,)``, float64."""
    pooled = hidden[0].double().mean(0)
    return pooled / pooled.norm().clamp_min(1e-12)


@torch.no_grad()
def analyze_encoder(
    model: Any,
    input_ids: Sequence[Tensor],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    sample_size: int = 2000,
    progress: bool = False,
) -> dict:
    """Per layer and head concentration of each method inside ``model``, and embedding drift.

    Args:
        model: a transformers encoder whose self-attention uses the attention interface
            (BERT, MiniLM, ...), in eval mode; returns ``last_hidden_state``.
        input_ids: one ``(1, L)`` or ``(L,)`` long tensor per sentence (no padding).
        methods: names from :func:`lln.analysis.analysis_methods` (all non-causal).
        sample_size: subsample for the K^2 normality statistic.
        progress: tqdm bar.

    Returns:
        A JSON-ready dict: ``config``; per method, ``per_head`` (metric -> ``layers x heads``
        mean over sentences), ``per_layer`` (metric -> mean over heads and sentences),
        ``normal_fraction`` (share of (sentence, head) matrices per layer whose K^2 test does
        not reject normality of log P at 5%) and ``cosine`` (mean, min, std of the per-sentence
        cosine similarity of the mean-pooled, normalised final embedding to the original
        model's).
    """
    transformers = _require_transformers()
    from tqdm.auto import tqdm

    known = analysis_methods()
    for name in methods:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; valid names: {', '.join(known)}")
    ids = [t.reshape(1, -1) if t.dim() == 1 else t for t in input_ids]
    if not ids or any(t.dim() != 2 or t.shape[0] != 1 or t.shape[1] < 2 for t in ids):
        raise ValueError("input_ids must be a non-empty list of (1, L) tensors with L >= 2")
    original = model.config._attn_implementation
    device = next(model.parameters()).device

    reference = [_sentence_embedding(model(input_ids=t.to(device)).last_hidden_state)
                 for t in tqdm(ids, desc="original", disable=not progress)]
    result: dict = {
        "config": {
            "sentences": len(ids), "tokens_min": min(t.shape[1] for t in ids),
            "tokens_max": max(t.shape[1] for t in ids),
            "tokens_mean": float(np.mean([t.shape[1] for t in ids])),
            "layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads,
            "head_dim": model.config.hidden_size // model.config.num_attention_heads,
            "original_attention": original, "sample_size": sample_size,
        },
        "methods": {},
    }
    try:
        for method in methods:
            recorder = _Recorder(method, sample_size)
            transformers.AttentionInterface.register(INTERFACE_NAME, recorder)
            model.set_attn_implementation(INTERFACE_NAME)
            cosines = []
            for t in tqdm(ids, desc=method, disable=not progress):
                hidden = model(input_ids=t.to(device)).last_hidden_state
                cosines.append(float(_sentence_embedding(hidden) @ reference[len(cosines)]))
            result["methods"][method] = _summarise(recorder.records, cosines)
    finally:
        model.set_attn_implementation(original)
    return result


def _summarise(records: dict[int, list[dict[str, np.ndarray]]], cosines: list[float]) -> dict:
    layers = sorted(records)
    per_head = {
        key: [np.nanmean(np.stack([r[key] for r in records[layer]]), 0).tolist()
              for layer in layers]
        for key in METRICS
    }
    per_layer = {key: [float(np.nanmean(row)) for row in per_head[key]] for key in METRICS}
    normal = []
    for layer in layers:
        p_values = np.concatenate([r["p_value"] for r in records[layer]])
        p_values = p_values[np.isfinite(p_values)]  # NaN: too few entries for the test
        normal.append(float(np.mean(p_values > 0.05)) if p_values.size else float("nan"))
    c = np.asarray(cosines)
    return {
        "per_head": per_head,
        "per_layer": per_layer,
        "normal_fraction": normal,
        "cosine": {"mean": float(c.mean()), "min": float(c.min()), "std": float(c.std())},
    }
