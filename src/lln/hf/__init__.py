"""Hugging Face transformers integration (``pip install lln[hf]``, transformers >= 4.56).

::

    import lln.hf
    lln.hf.register()                                   # once; importing does NOT register
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lln")   # or "lln_diag"
    lln.hf.calibrate(model, batches)                    # freeze per-layer/per-head alpha, beta
    params = lln.hf.lln_parameters(model)               # trainable LLN parameters
    model.generate(ids, past_key_values=lln.hf.LLNCache())   # O(1) per decoded token

Modules: :mod:`~lln.hf.attention` (the attention functions), :mod:`~lln.hf.masks` (the mask
function), :mod:`~lln.hf.params` (per-layer parameters and their saving),
:mod:`~lln.hf.stats` (calibration), :mod:`~lln.hf.cache` (``LLNCache``),
:mod:`~lln.hf.local` (per-sequence diagonal blocks).
"""

from __future__ import annotations

from ._requirements import MIN_TRANSFORMERS  # first: fails clearly on an old transformers
from .attention import (
    lln_diag_hf_attention,
    lln_hf_attention,
    registry_hf_attention,
)
from .cache import LLNCache, LLNCacheLayer
from .masks import padding_mask
from .params import (
    LLNAttentionParams,
    attach,
    attention_modules,
    lln_parameters,
    named_lln_parameters,
)
from .stats import calibrate

#: attn_implementation names of the LLN family.
LLN_IMPLEMENTATIONS = ("lln", "lln_diag")


def register(baselines: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Register LLN with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Afterwards ``attn_implementation="lln"`` / ``"lln_diag"`` work in
    ``from_pretrained`` / ``from_config``. ``baselines`` adds registry attentions (see
    :mod:`lln.ops.registry`), e.g. ``("elu", "performer")``, as ``"lln_elu"``,
    ``"lln_performer"`` — for conversion baselines; they have no cache and no calibration.

    Returns:
        The registered ``attn_implementation`` names.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    functions = {"lln": lln_hf_attention, "lln_diag": lln_diag_hf_attention}
    if baselines:
        from ..ops.registry import attention_names

        known = attention_names()
        for name in baselines:
            if name not in known or name in LLN_IMPLEMENTATIONS:
                raise ValueError(
                    f"baseline {name!r} is not a registry attention other than lln/lln_diag; "
                    f"known: {known}"
                )
            functions[f"lln_{name}"] = registry_hf_attention(name)
    for key, fn in functions.items():
        AttentionInterface.register(key, fn)
        AttentionMaskInterface.register(key, padding_mask)
    return list(functions)


__all__ = [
    "MIN_TRANSFORMERS",
    "LLNAttentionParams",
    "LLNCache",
    "LLNCacheLayer",
    "LLN_IMPLEMENTATIONS",
    "attach",
    "attention_modules",
    "calibrate",
    "lln_diag_hf_attention",
    "lln_hf_attention",
    "lln_parameters",
    "named_lln_parameters",
    "padding_mask",
    "register",
    "registry_hf_attention",
]
