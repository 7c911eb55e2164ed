"""Convert a pretrained softmax model to LLN / LLN+Diag, measure it, save it.

The pipeline (:func:`convert`), for a model loaded with any attention implementation::

    lln.hf.register(("elu", "performer"))
    data = capture(model, train_batches)          # the softmax teacher, once
    convert(model, method="lln_diag", calibration=calib_batches, data=data,
            steps=100, adapters=False)            # switch, calibrate, transfer
    save_converted(model, tokenizer, "out/")      # a normal transformers folder
    model = load_converted("out/")                # from_pretrained with attention registered

Measurements: :func:`embedding_cosine` (sentence encoders), :func:`perplexity` (causal LMs),
:func:`decode_latency` (per-token decoding time against context length).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .transfer import Capture, transfer

#: ``config`` attribute naming the attention implementation a converted model was made for.
METHOD_KEY = "lln_attn_implementation"
#: Conversion methods: the LLN family, and registry baselines (attn_implementation lln_<name>).
LLN_METHODS = ("lln", "lln_diag")
BASELINES = ("elu", "performer")


def implementation_name(method: str) -> str:
    """The ``attn_implementation`` of a conversion method ("elu" -> "lln_elu")."""
    if method in LLN_METHODS:
        return method
    if method in BASELINES:
        return f"lln_{method}"
    raise ValueError(f"method must be one of {LLN_METHODS + BASELINES}, got {method!r}")


# ------------------------------------------------------------------------------ data
def text_batches(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128
) -> list[dict[str, Tensor]]:
    """Right-padded tokenizer batches ``{"input_ids", "attention_mask", ...}`` of ``texts``."""
    if not texts:
        raise ValueError("texts is empty")
    return [
        dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), batch_size)
    ]


def read_texts(paths: Sequence[str | os.PathLike], flag: str = "--text") -> list[str]:
    """Texts of plain-text files (one text per paragraph: blocks separated by a blank line,
    whitespace collapsed), ``.jsonl`` files (the ``"text"`` field of each line) or folders
    (their ``*.txt`` files, recursively, sorted). Order: as given.

    Raises:
        FileNotFoundError: a path does not exist. ValueError: a JSONL line without a string
            ``"text"``, or no text at all.
    """
    import re

    from ..data.own import text_files

    texts: list[str] = []
    for path in text_files(list(paths), flag):
        content = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{flag}: {path} line {number} is not a JSON object with "
                                     "a string 'text' field")
                texts.append(row["text"])
        else:
            texts += [" ".join(block.split()) for block in re.split(r"\n\s*\n", content)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{flag}: {list(map(str, paths))} hold no text")
    return texts


def token_windows(tokenizer: Any, text: str, *, length: int, count: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows of ``length`` tokens of ``text``: ``(W, length)``.

    Args:
        count: keep the first ``count`` windows (all full windows when None).
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // length
    if count is not None:
        n = min(n, count)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}")
    return ids[: n * length].view(n, length)


# ------------------------------------------------------------------------ conversion
def set_attention(model: nn.Module, method: str) -> str:
    """Switch ``model`` to the conversion ``method`` (registering it); returns the
    ``attn_implementation`` name and records it in ``config.lln_attn_implementation``."""
    from . import register

    impl = implementation_name(method)
    register(tuple(m for m in BASELINES if m == method))
    for c in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        c._attn_implementation = impl
    setattr(model.config, METHOD_KEY, impl)
    return impl


def convert(
    model: nn.Module,
    *,
    method: str = "lln_diag",
    calibration: Sequence | None = None,
    data: Capture | None = None,
    steps: int = 100,
    adapters: bool = False,
    lr: float = 0.05,
    adapter_lr: float = 0.01,
    constants: str = "paper",
    progress: bool = True,
) -> dict[str, Any]:
    """Convert ``model`` in place: switch the attention, calibrate, run attention transfer.

    Args:
        model: a pretrained transformers model (weights stay frozen).
        method: "lln", "lln_diag", or a baseline "elu" / "performer".
        calibration: batches for :func:`lln.hf.calibrate` (LLN family; skipped when None, in
            which case alpha/beta are moment-matched per sequence at run time).
        data: :func:`capture` of the *original* model on transfer text (None: no transfer).
        steps, adapters, lr, adapter_lr: see :func:`lln.hf.transfer.transfer`.
        constants: moment-matching constants for calibration, ``"paper"`` or ``"head_dim"``
            (see :func:`lln.hf.calibrate`).
        progress: tqdm bars.

    Returns:
        ``{"method", "calibration": {...sigma per layer...}, "transfer": {layer: losses}}``.
    """
    from .stats import calibrate

    impl = set_attention(model, method)
    report: dict[str, Any] = {"method": method, "attn_implementation": impl}
    if calibration is not None and method in LLN_METHODS:
        stats = calibrate(model, calibration, constants=constants, progress=progress)
        report["calibration"] = {
            name: {key: [round(float(x), 5) for x in value] for key, value in s.items()}
            for name, s in stats.items()
        }
    if data is not None and (adapters or method in LLN_METHODS):
        report["transfer"] = transfer(
            model, data, train=None if method in LLN_METHODS else (), adapters=adapters,
            steps=steps, lr=lr, adapter_lr=adapter_lr, progress=progress,
        )
    return report


def save_converted(model: nn.Module, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save a converted model (and tokenizer) as a normal transformers folder.

    The LLN parameters go to ``config.json`` (``config.lln``, see :mod:`lln.hf.params`); a
    GGUF origin's ``quantization_config`` is dropped (the saved weights are dequantised).
    """
    path = Path(path)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, None if attr == "quantization_method" else False)
                except AttributeError:
                    pass
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_converted(
    path: str | os.PathLike, *, causal_lm: bool | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """Load a folder written by :func:`save_converted`, with its attention registered.

    Returns ``(model, tokenizer)`` (tokenizer None when the folder has none).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from . import register

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    impl = getattr(config, METHOD_KEY, None)
    if impl is None:
        raise ValueError(f"{path} has no config.{METHOD_KEY}: not saved by save_converted()")
    register(tuple(m for m in BASELINES if impl == f"lln_{m}"))
    if causal_lm is None:
        causal_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or ()))
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(path, attn_implementation=impl, dtype=dtype,
                                local_files_only=True)
    # only a saved tokenizer: without one, transformers 4.x tries to build a model's default
    # tokenizer from nothing (and fails with ImportError or AttributeError, not OSError)
    tokenizer = None
    if (Path(path) / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------- measurements
@torch.no_grad()
def embedding_cosine(model: nn.Module, tokenizer: Any, texts: Sequence[str], reference: Tensor,
                     *, max_length: int = 128, seed: int = 0) -> dict[str, float]:
    """Cosine similarity of ``model``'s sentence embeddings to ``reference (N, E)``.

    Embeddings as in :func:`lln.pretrained.minilm.embed`. ``seed`` fixes the global RNG
    (Performer draws its random features from it). Returns mean, min, 5th percentile.
    """
    from ..pretrained.minilm import embed

    torch.manual_seed(seed)
    emb = embed(model, tokenizer, texts, max_length=max_length)
    cos = (emb * reference).sum(-1)
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            "p05": float(cos.quantile(0.05))}


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 4,
               progress: bool = False) -> float:
    """Perplexity of a causal LM on token ``windows (W, T)``: exp of the mean next-token NLL
    over all ``W * (T - 1)`` predictions (each window starts from an empty context)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity",
                      disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1]
        if logits.dtype != torch.float64:
            logits = logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def decode_latency(
    model: nn.Module,
    contexts: Sequence[int],
    *,
    new_tokens: int = 16,
    cache: str = "dynamic",
    repeats: int = 3,
    vocab_high: int = 1000,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Seconds per decoded token after a prefill of each context length (batch 1, greedy).

    Args:
        contexts: prefill lengths in tokens.
        new_tokens: decode steps timed after each prefill.
        cache: "dynamic" (transformers' key/value cache, for the original model) or "lln"
            (:class:`lln.hf.LLNCache`, O(1) per token for a converted causal LM).
        repeats: the best of this many timed runs of the decode steps is reported.
        vocab_high: prompt tokens are drawn uniformly below this id.

    Returns:
        ``[{"context", "seconds_per_token", "prefill_seconds"}]``.
    """
    from transformers import DynamicCache

    from .cache import LLNCache

    if cache not in ("dynamic", "lln"):
        raise ValueError(f"cache must be 'dynamic' or 'lln', got {cache!r}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    # transformers 5 names the cache argument `cache`; 4.x calls it `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for n in contexts:
        prompt = torch.randint(0, vocab_high, (1, n), generator=gen).to(device)
        best = float("inf")
        prefill = float("inf")
        for _ in range(repeats):
            past = LLNCache() if cache == "lln" else DynamicCache()
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, **{key: past})
            prefill = min(prefill, time.perf_counter() - t0)
            token = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{key: past})
                token = out.logits[:, -1:].argmax(-1)
            best = min(best, (time.perf_counter() - t0) / new_tokens)
        rows.append({"context": int(n), "seconds_per_token": best, "prefill_seconds": prefill})
    return rows


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
