"""Input checks shared by every op.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, size or range) with a message that names the argument and says what
was expected, so bad input never turns into a silent NaN deep inside a kernel.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_DEBUG = False


def set_debug(enabled: bool) -> None:
    """Turn the ops' data-dependent checks on or off (default: off).

    The ops never read tensor values on the host by default, so they add no host-device
    synchronisation and compile without graph breaks. With debug on they also check:

    * tensor ``alpha`` / ``beta`` are > 0 and finite, tensor mixing weights are finite
      (Python floats are always checked: that costs nothing);
    * causal rows whose every term underflowed are reported with a ``RuntimeWarning`` on
      every device (without debug: on CPU only, where reading the count needs no device
      sync, and not inside ``torch.compile``).

    Each check reads a tensor on the host, so debug mode synchronises once per check.
    """
    global _DEBUG
    _DEBUG = check_bool(enabled, "enabled")


def debug_enabled() -> bool:
    """Whether :func:`set_debug` turned the data-dependent checks on."""
    return _DEBUG


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool) -> None:
    """Check ``q (B, H, L, D)``, ``k (B, H, S, D)``, ``v (B, H, S, Dv)``.

    ``same_length=True`` additionally requires ``L == S`` (causal and block-diagonal ops).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must have a floating dtype (float64, float32, float16 or bfloat16), "
                f"got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, dim), got shape {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, h, n_q, d), (bk, hk, n_k, dk) = q.shape, k.shape
    if (bk, hk) != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(
            "q, k, v must agree on (batch, heads): got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if dk != d:
        raise ValueError(f"k must have the head dim of q ({d}), got k {tuple(k.shape)}")
    if v.shape[2] != n_k:
        raise ValueError(
            f"v must have as many tokens as k ({n_k}), got v {tuple(v.shape)}"
        )
    if n_q == 0 or n_k == 0:
        raise ValueError(
            f"sequence length must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if d == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if same_length and n_q != n_k:
        raise ValueError(
            f"this op needs as many queries as keys (self-attention), got q length {n_q} "
            f"and k length {n_k}"
        )


def check_key_padding_mask(mask: Tensor | None, k: Tensor) -> Tensor | None:
    """Check a ``(B, S)`` bool mask (True = real token) against ``k (B, H, S, D)``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must have dtype torch.bool (True = real token), got {mask.dtype}"
        )
    expected = (k.shape[0], k.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"key_padding_mask must have shape (batch, seq) = {expected}, got {tuple(mask.shape)}"
        )
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask must be on {k.device}, got {mask.device}")
    return mask


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return value


def check_nonnegative_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    value = float(value)
    if not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return value


def check_param(
    value: float | Tensor,
    name: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    positive: bool,
) -> float | Tensor:
    """A checked scale or weight: a Python float as a ``float``, a tensor broadcastable to
    ``shape`` in ``dtype`` with that rank (gradients flow through it).

    Python floats must be finite (and > 0 when ``positive``); the values of a tensor are
    checked only in debug mode (:func:`set_debug`), since reading them would synchronise
    with the device on every call. Shape, dtype and device are always checked.
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating tensor, got dtype {value.dtype}")
        # (pure Python: torch.broadcast_shapes costs tens of microseconds per call)
        dims = value.shape
        if len(dims) > len(shape) or any(
            a != 1 and a != b for a, b in zip(reversed(dims), reversed(shape), strict=False)
        ):
            raise ValueError(
                f"{name} must be broadcastable to {shape}, got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")
        if _DEBUG:
            if positive and not bool((value > 0).all()):
                raise ValueError(f"{name} must be > 0 everywhere, got min {value.min().item()!r}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite")
        if value.dtype != dtype:
            value = value.to(dtype)
        if value.dim() < len(shape):
            value = value.reshape((1,) * (len(shape) - value.dim()) + tuple(value.shape))
        return value
    if positive:
        return check_positive_float(value, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {float(value)!r}")
    return float(value)


def broadcast_param(
    value: float | Tensor,
    name: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    positive: bool,
) -> Tensor:
    """:func:`check_param` as a tensor of the rank of ``shape`` (floats become one-element
    tensors)."""
    value = check_param(value, name, shape, dtype=dtype, device=device, positive=positive)
    if isinstance(value, Tensor):
        return value
    return torch.full((1,) * len(shape), value, dtype=dtype, device=device)


def check_is_causal(is_causal: object) -> bool:
    """``is_causal`` itself, after checking that it is a bool (not a truthy tensor or int)."""
    return check_bool(is_causal, "is_causal")


def check_bool(value: object, name: str) -> bool:
    """``value`` itself, after checking that it is a bool (not a truthy tensor or int)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return value
