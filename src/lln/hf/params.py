"""The per-layer LLN parameters of a Hugging Face model, and how they are saved.

Every attention module of a converted model carries an :class:`LLNAttentionParams` as the
submodule ``lln`` (``model.model.layers[3].self_attn.lln``). It holds, per head:

==================  =====  =================================================================
``log_alpha``       (H,)   log of the query feature scale (set by calibration)
``log_beta``        (H,)   log of the key feature scale (set by calibration)
``log_temperature`` (H,)   divides both scales: ``alpha = exp(log_alpha - log_temperature)``
``lln_weight``      (H,)   weight of the LLN part (``lln_diag`` only)
``diag_weight``     (H,)   weight of the block-diagonal softmax part (``lln_diag`` only)
``calibrated``      ()     buffer: True once alpha/beta are frozen
==================  =====  =================================================================

All five are ``nn.Parameter`` s (float32), so attention transfer can train any subset
(:func:`lln_parameters` lists them). Before calibration the attention moment-matches per
sequence and head at run time (prefix statistics when causal) and ignores ``log_alpha``,
``log_beta`` and ``log_temperature``; after calibration alpha/beta are these fixed per-head
numbers, which keeps a causal model strictly causal and every sample independent of the
rest of its batch.

Saving: ``model.config.lln`` is a JSON-serialisable dict (``{"version", "options",
"layers": {"<layer_idx>": {"log_alpha": [...], ...}}}``) that always reflects the live
parameter values when the config is written, so ``save_pretrained`` stores them in
``config.json``; the parameters are left out of the weights file. ``from_pretrained`` gives
a config with that dict, and :func:`attach` (run by :func:`lln_parameters`, or lazily by the
first forward) rebuilds the modules from it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..ops.moment_matching import (
    MOMENT_A,
    MOMENT_B,
    check_constants_mode,
    resolve_constants,
    scales_from_variances,
)

#: Attribute of ``model.config`` holding the saved LLN settings and values.
CONFIG_KEY = "lln"
#: Version of the ``config.lln`` layout.
FORMAT_VERSION = 1
#: Name of the submodule attached to each attention module.
MODULE_NAME = "lln"
#: Parameter names saved per layer in ``config.lln["layers"]``.
PARAM_NAMES = ("log_alpha", "log_beta", "log_temperature", "lln_weight", "diag_weight")
#: Defaults of ``config.lln["options"]`` (op keyword options; None = the op's default).
#: ``constants`` ("paper" | "head_dim") applies to the run-time moment matching of layers
#: that were not calibrated; ``checkpoint`` (bool) to the causal LLN kernel in training.
DEFAULT_OPTIONS = {"chunk_size": 64, "block_size": None, "eps": 0.0, "constants": "paper",
                   "checkpoint": False}


class LLNAttentionParams(nn.Module):
    """Trainable LLN parameters of one attention module with ``num_heads`` (query) heads.

    See the module docstring for the fields. ``scales()`` gives the feature scales the
    attention uses; calibration fills them through :meth:`start_calibration`,
    :meth:`record` and :meth:`finish_calibration` (driven by :func:`lln.hf.calibrate`).
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.num_heads = num_heads
        self.log_alpha = nn.Parameter(torch.zeros(num_heads))
        self.log_beta = nn.Parameter(torch.zeros(num_heads))
        self.log_temperature = nn.Parameter(torch.zeros(num_heads))
        self.lln_weight = nn.Parameter(torch.full((num_heads,), 0.5))
        self.diag_weight = nn.Parameter(torch.full((num_heads,), 0.5))
        self.register_buffer("calibrated", torch.tensor(False))
        self._sums: dict[str, Tensor] | None = None
        self._scales_cache: tuple | None = None  # (key, scales) for inference, see scales()
        self._head_dim: int | None = None  # of the recorded q (for constants="head_dim")
        #: What the layer outputs while recording: "softmax" (the teacher) or "lln".
        self.record_forward = "softmax"

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, calibrated={bool(self.calibrated)}"

    # ------------------------------------------------------------------ use
    def scales(self) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """``(alpha, beta)`` of shape ``(1, H, 1, 1)`` (with gradient), or ``(None, None)``
        before calibration (= moment matching at run time).

        Without grad mode (inference, decoding) the result is computed once and reused
        until a parameter or ``calibrated`` changes (tracked by their in-place version
        counters and storage), so a decoded token neither recomputes the scales nor reads
        ``calibrated`` on the host (which would synchronise with the device)."""
        tensors = (self.calibrated, self.log_alpha, self.log_beta, self.log_temperature)
        key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        cached = self._scales_cache
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        if not bool(self.calibrated):
            scales: tuple = (None, None)
        else:
            shape = (1, self.num_heads, 1, 1)
            alpha = torch.exp(self.log_alpha - self.log_temperature).view(shape)
            beta = torch.exp(self.log_beta - self.log_temperature).view(shape)
            scales = (alpha, beta)
        self._scales_cache = None if torch.is_grad_enabled() else (key, scales)
        return scales

    def mixing_weights(self) -> tuple[Tensor, Tensor]:
        """``(lln_weight, diag_weight)``, each of shape ``(1, H, 1, 1)``."""
        shape = (1, self.num_heads, 1, 1)
        return self.lln_weight.view(shape), self.diag_weight.view(shape)

    # ----------------------------------------------------------- calibration
    @property
    def recording(self) -> bool:
        """Whether :meth:`record` is collecting statistics."""
        return self._sums is not None

    def start_calibration(self, *, forward: str = "softmax") -> None:
        """Reset the statistics and start recording (see :meth:`record`).

        ``forward``: what the attention outputs meanwhile — ``"softmax"`` (exact softmax
        attention, so deeper layers see the pretrained model's activations) or ``"lln"``.
        """
        if forward not in ("softmax", "lln"):
            raise ValueError(f"forward must be 'softmax' or 'lln', got {forward!r}")
        self.record_forward = forward
        z = torch.zeros(self.num_heads, dtype=torch.float64, device=self.log_alpha.device)
        self._sums = {name: z.clone() for name in ("count", "q", "q2", "k", "k2")}
        self._head_dim = None

    @torch.no_grad()
    def record(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> None:
        """Add the entries of ``q, k (B, H, N, D)`` at real tokens to the per-head sums.

        ``key_padding_mask (B, N)`` bool, True = real token (None = all real).
        """
        if self._sums is None:
            raise RuntimeError("record() needs start_calibration() first")
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_heads:
            raise ValueError(
                f"q and k must have {self.num_heads} heads, got {tuple(q.shape)}, {tuple(k.shape)}"
            )
        if q.shape[2] != k.shape[2]:
            raise ValueError("calibration needs self-attention inputs (as many queries as keys)")
        w = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
        for name, x in (("q", q), ("k", k)):
            x = x.to(torch.float64)
            if w is not None:
                x = torch.where(w, x, 0.0)
            self._sums[name] += x.sum((0, 2, 3))
            self._sums[name + "2"] += x.square().sum((0, 2, 3))
        real = q.shape[0] * q.shape[2] if w is None else int(key_padding_mask.sum())
        self._sums["count"] += real * q.shape[3]
        self._head_dim = q.shape[3]

    @torch.no_grad()
    def finish_calibration(
        self,
        *,
        temperature: float = 1.0,
        a: float = MOMENT_A,
        b: float = MOMENT_B,
        constants: str = "paper",
    ) -> dict[str, Tensor]:
        """Freeze alpha, beta from the recorded statistics (SPEC section 3 moment matching).

        ``constants``: ``"paper"`` (use ``a``, ``b``; default) or ``"head_dim"`` (the
        constants calibrated for the recorded head dim; ``a``, ``b`` left at their defaults),
        as in :func:`lln.moment_match`. Sets ``log_alpha``, ``log_beta`` (at temperature 1),
        ``log_temperature = log(temperature)`` and ``calibrated``. Returns ``{"sigma_q",
        "sigma_k"}`` (H,).
        """
        if self._sums is None:
            raise RuntimeError("finish_calibration() needs start_calibration() first")
        check_constants_mode(constants)
        s, self._sums = self._sums, None
        if bool((s["count"] < 2).any()):
            raise ValueError(
                "calibration saw fewer than 2 real entries for some head of this layer; "
                "run calibrate() on some real (non-padding) tokens"
            )
        if not (isinstance(temperature, int | float) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
        n = s["count"]
        var_q = (s["q2"] - s["q"].square() / n) / (n - 1)
        var_k = (s["k2"] - s["k"].square() / n) / (n - 1)
        a, b = resolve_constants(constants, self._head_dim, a=a, b=b)
        alpha, beta = scales_from_variances(var_q, var_k, a=a, b=b)
        self.log_alpha.copy_(alpha.log())
        self.log_beta.copy_(beta.log())
        self.log_temperature.fill_(math.log(temperature))
        self.calibrated.fill_(True)
        return {"sigma_q": var_q.clamp_min(0).sqrt().float(),
                "sigma_k": var_k.clamp_min(0).sqrt().float()}

    # ---------------------------------------------------------- serialising
    def to_dict(self) -> dict:
        """JSON-ready values: ``{"num_heads", "calibrated", "log_alpha": [...], ...}``."""
        out: dict = {"num_heads": self.num_heads, "calibrated": bool(self.calibrated)}
        for name in PARAM_NAMES:
            out[name] = [float(x) for x in getattr(self, name).detach().float().cpu()]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LLNAttentionParams:
        """Inverse of :meth:`to_dict`."""
        try:
            params = cls(int(data["num_heads"]))
            with torch.no_grad():
                for name in PARAM_NAMES:
                    getattr(params, name).copy_(torch.tensor(data[name], dtype=torch.float32))
                params.calibrated.fill_(bool(data["calibrated"]))
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"malformed config.lln layer entry {data!r}: {err}") from err
        return params


# ---------------------------------------------------------------- discovery
def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers attention module that LLN can drive.

    Recognised by the attributes the attention interface relies on: ``config``,
    ``is_causal``, ``scaling`` and an integer ``layer_idx``.
    """
    return (
        not isinstance(module, LLNAttentionParams)
        and hasattr(module, "config")
        and hasattr(module, "is_causal")
        and hasattr(module, "scaling")
        and isinstance(getattr(module, "layer_idx", None), int)
    )


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every attention module of ``model``, in order."""
    for name, module in model.named_modules():
        if is_attention_module(module):
            yield name, module


def num_query_heads(module: nn.Module) -> int:
    """The number of query heads of an attention module."""
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return int(module.config.num_attention_heads)


def _config_lln(config) -> dict | None:
    value = getattr(config, CONFIG_KEY, None)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"config.{CONFIG_KEY} must be a dict, got {type(value).__name__}")
    return value


def lln_options(config) -> dict:
    """The op options of ``config.lln["options"]`` merged over :data:`DEFAULT_OPTIONS`."""
    saved = _config_lln(config)
    options = dict(DEFAULT_OPTIONS)
    if saved is not None:
        options.update(saved.get("options", {}))
    return options


def params_for(module: nn.Module) -> LLNAttentionParams | None:
    """The :class:`LLNAttentionParams` of an attention module: the attached one, else one
    rebuilt from ``config.lln`` (and attached), else None (nothing calibrated or trained)."""
    params = getattr(module, MODULE_NAME, None)
    if isinstance(params, LLNAttentionParams):
        return params
    saved = _config_lln(module.config)
    if saved is None:
        return None
    entry = saved.get("layers", {}).get(str(module.layer_idx))
    if entry is None:
        return None
    ref = next(iter(p for p in module.parameters()), None)
    params = LLNAttentionParams.from_dict(entry)
    if ref is not None:
        params = params.to(ref.device)
    module.add_module(MODULE_NAME, params)
    return params


class _LiveConfig(dict):
    """``config.lln`` of a model with attached params: a dict whose copies (what
    ``config.to_dict()`` and so ``save_pretrained`` write) hold the current values."""

    def __init__(self, data: dict, model: nn.Module) -> None:
        super().__init__(data)
        self._model = weakref.ref(model)

    def snapshot(self) -> dict:
        model = self._model()
        data = dict(self)
        if model is not None:
            data["layers"] = {
                str(module.layer_idx): getattr(module, MODULE_NAME).to_dict()
                for _, module in attention_modules(model)
                if isinstance(getattr(module, MODULE_NAME, None), LLNAttentionParams)
            }
        return data

    def __deepcopy__(self, memo) -> dict:
        import copy

        return copy.deepcopy(self.snapshot(), memo)

    def __reduce__(self):
        return (dict, (self.snapshot(),))


def attach(model: nn.Module, *, options: dict | None = None) -> dict[str, LLNAttentionParams]:
    """Give every attention module of ``model`` its :class:`LLNAttentionParams` (idempotent).

    Values come from ``model.config.lln`` when present (a loaded converted model), else the
    defaults (uncalibrated). ``options`` updates ``config.lln["options"]`` (``chunk_size``,
    ``block_size``, ``eps``, ``constants``, ``checkpoint``). Afterwards ``model.config.lln``
    tracks the live values and the parameters are excluded from the weights file of
    ``save_pretrained`` (they are saved in ``config.json``).

    Returns:
        ``{qualified module name: params}``.
    """
    found = list(attention_modules(model))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module with config, is_causal, scaling "
            "and layer_idx attributes: LLN needs a model that calls its attention through "
            "transformers' AttentionInterface (BERT-family encoders do so from transformers 5 on)"
        )
    config = found[0][1].config
    saved = _config_lln(config) or {}
    if options is not None:
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
        if "constants" in options:
            check_constants_mode(options["constants"])
    merged = {**DEFAULT_OPTIONS, **saved.get("options", {}), **(options or {})}
    out = {}
    for name, module in found:
        params = params_for(module)
        if params is None:
            ref = next(iter(module.parameters()), None)
            params = LLNAttentionParams(num_query_heads(module))
            if ref is not None:
                params = params.to(ref.device)
            module.add_module(MODULE_NAME, params)
        out[name] = params
    live = _LiveConfig(
        {"version": FORMAT_VERSION, "options": merged, "layers": saved.get("layers", {})}, model
    )
    for _, module in found:  # one shared config object normally; set it on each to be sure
        setattr(module.config, CONFIG_KEY, live)
    if hasattr(model, "config") and model.config is not config:
        setattr(model.config, CONFIG_KEY, live)
    _exclude_from_weights(model, out)
    return out


def _exclude_from_weights(model: nn.Module, attached: dict[str, LLNAttentionParams]) -> None:
    """Keep the params out of ``save_pretrained``'s weights file (config.json has them)."""
    keys = {
        f"{prefix}.{MODULE_NAME}.{name}" if prefix else f"{MODULE_NAME}.{name}"
        for prefix in attached
        for name in (*PARAM_NAMES, "calibrated")
    }
    ignored = getattr(model, "_keys_to_ignore_on_save", None)
    model._keys_to_ignore_on_save = set(ignored or ()) | keys


def lln_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LLN parameter of ``model`` (attaching the modules first), for an optimizer.

    Five per attention module (see :class:`LLNAttentionParams`); select a subset by name
    with :func:`named_lln_parameters`.
    """
    return [p for _, p in named_lln_parameters(model)]


def named_lln_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of every LLN parameter, e.g.
    ``("model.layers.0.self_attn.lln.log_temperature", p)``."""
    out = []
    for prefix, params in attach(model).items():
        for name, p in params.named_parameters():
            out.append((f"{prefix}.{MODULE_NAME}.{name}" if prefix else name, p))
    return out
