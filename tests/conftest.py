"""Shared helpers for the tests: seeded inputs and the error measure used everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor


def make_qkv(
    b: int,
    h: int,
    n: int,
    d: int,
    dv: int | None = None,
    *,
    sigma: float = 1.0,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian q, k with per-entry std ``sigma`` and standard-normal v."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * sigma
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * sigma
    v = torch.randn(b, h, n, dv or d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(b: int, n: int, *, seed: int = 0) -> Tensor:
    """A ``(B, N)`` mask (True = real) with left padding, right padding and holes."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, generator=g) > 0.2
    mask[0, : n // 5] = False  # left padding
    if b > 1:
        mask[1, n - n // 4 :] = False  # right padding
    return mask


def rel_err(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|: the relative error measure used in every accuracy test."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


@pytest.fixture
def one_thread():
    """Run a test single-threaded: eigenvalue solves and tiny models gain nothing from
    threads, and oversubscribe a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
