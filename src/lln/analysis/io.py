"""Writing analysis results: JSON files, the matplotlib import and progress helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PLOT_HINT = "pip install lln[plot]"


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"plots need matplotlib: {PLOT_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tuples lists, numpy scalars floats."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (NaN -> null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1) + "\n")
    return path
