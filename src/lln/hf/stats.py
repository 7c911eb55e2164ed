"""Calibration: freeze per-layer, per-head alpha and beta from real text.

Run-time moment matching makes alpha/beta functions of the tokens in the call: prefix
statistics when causal (so the first tokens of a sequence get noisy scales), and scales that
change with what else is in the sequence. :func:`calibrate` instead runs the model on
calibration text, records sigma_q and sigma_k of every layer and head over all real tokens
(padding excluded), and freezes ``alpha = sigma_tilde / sigma_q``, ``beta = sigma_tilde /
sigma_k`` (SPEC section 3) in each layer's :class:`lln.hf.LLNAttentionParams`. A calibrated
model is then strictly causal with constant scales, and every sample's output is independent
of the rest of its batch. The values are saved with ``save_pretrained`` (``config.lln``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..ops.moment_matching import MOMENT_A, MOMENT_B, check_constants_mode
from .params import attach


def _as_kwargs(batch) -> dict:
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, Tensor):
        return {"input_ids": batch}
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return {"input_ids": batch[0], "attention_mask": batch[1]}
    raise TypeError(
        "each calibration batch must be a dict of model inputs, an input_ids tensor or an "
        f"(input_ids, attention_mask) pair; got {type(batch).__name__}"
    )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    temperature: float = 1.0,
    forward: str = "softmax",
    a: float = MOMENT_A,
    b: float = MOMENT_B,
    constants: str = "paper",
    progress: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Record sigma_q, sigma_k per layer and head on ``batches`` and freeze alpha, beta.

    Args:
        model: a transformers model loaded with ``attn_implementation="lln"`` or
            ``"lln_diag"`` (after :func:`lln.hf.register`).
        batches: iterable of model inputs: dicts (``input_ids``, ``attention_mask``, ...),
            ``input_ids`` tensors, or ``(input_ids, attention_mask)`` pairs.
        temperature: stored as ``log_temperature`` (divides both scales; > 1 = flatter).
        forward: what the attention layers output while recording: ``"softmax"`` (default:
            exact softmax, so every layer sees the pretrained model's activations — the
            statistics of the model being converted) or ``"lln"`` (the converted model's own).
        a, b: the moment-matching fit ``Var(log P) = a * sigma^2 + b`` (defaults: D = 64).
        constants: ``"paper"`` (use ``a``, ``b``) or ``"head_dim"`` (the constants calibrated
            for the model's head dim, :func:`lln.ops.moment_matching.moment_constants`).
        progress: show a tqdm progress bar.

    Returns:
        ``{attention module name: {"sigma_q", "sigma_k", "alpha", "beta"}}``, tensors (H,).
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in ("lln", "lln_diag"):
        raise ValueError(
            f"calibrate() needs a model using attn_implementation 'lln' or 'lln_diag', got "
            f"{impl!r}: call lln.hf.register() and load the model with attn_implementation='lln'"
        )
    check_constants_mode(constants)  # before the (long) recording pass
    attached = attach(model)
    for params in attached.values():
        params.start_calibration(forward=forward)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            model(**_as_kwargs(batch))
            seen += 1
        if seen == 0:
            raise ValueError("calibrate() got no batches")
        out = {}
        for name, params in attached.items():
            sigmas = params.finish_calibration(temperature=temperature, a=a, b=b,
                                               constants=constants)
            alpha, beta = params.scales()
            out[name] = {**sigmas, "alpha": alpha.detach().flatten().clone(),
                         "beta": beta.detach().flatten().clone()}
    finally:
        for params in attached.values():
            params._sums = None
        model.train(was_training)
    return out
