"""The scaling exponent of a cost against sequence length: ``t ~ c * N**p``, fitted in log-log."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingFit:
    """Least-squares line ``log t = log c + p log N`` through the measured points.

    Attributes:
        exponent: ``p`` (1 = linear, 2 = quadratic).
        prefactor: ``c``, in the unit of the fitted values.
        lengths: the ``N`` values the fit used, ascending.
    """

    exponent: float
    prefactor: float
    lengths: tuple[int, ...]


def fit_exponent(
    lengths: Sequence[int],
    values: Sequence[float | None],
    *,
    n_min: int | None = None,
    n_max: int | None = None,
) -> ScalingFit | None:
    """Fit ``values ~ c * lengths**p`` by least squares on ``log values`` vs ``log lengths``.

    Args:
        lengths: sequence lengths ``N`` (positive ints), one per value.
        values: the measured cost at each ``N`` (seconds, bytes); ``None`` or a non-positive
            value marks a missing measurement and is left out.
        n_min, n_max: use only ``n_min <= N <= n_max`` (inclusive; None = no bound).

    Returns:
        A :class:`ScalingFit`, or None when fewer than two distinct ``N`` remain.

    Raises:
        ValueError: ``lengths`` and ``values`` differ in length, or a length is < 1.
    """
    if len(lengths) != len(values):
        raise ValueError(
            f"lengths and values must have one entry each, got {len(lengths)} lengths and "
            f"{len(values)} values"
        )
    points = []
    for n, value in zip(lengths, values, strict=True):
        if int(n) < 1:
            raise ValueError(f"lengths must be >= 1, got {n}")
        if value is None or not math.isfinite(value) or value <= 0:
            continue
        if (n_min is not None and n < n_min) or (n_max is not None and n > n_max):
            continue
        points.append((math.log(n), math.log(value), int(n)))
    if len({x for x, _, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _, _ in points) / len(points)
    mean_y = sum(y for _, y, _ in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y, _ in points)
    slope = sxy / sxx
    return ScalingFit(
        exponent=slope,
        prefactor=math.exp(mean_y - slope * mean_x),
        lengths=tuple(sorted(n for _, _, n in points)),
    )
