"""Fails the import of :mod:`lln.hf` clearly when transformers is missing or too old."""

from __future__ import annotations

#: Oldest supported transformers (4.56.2 verified; LLNCache needs ``CacheLayerMixin``), as in
#: the hf/test extras of pyproject.toml.
MIN_TRANSFORMERS = "4.56"

try:
    import transformers
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"lln.hf needs transformers >= {MIN_TRANSFORMERS}: pip install lln[hf]"
    ) from err

from packaging.version import Version  # noqa: E402 - a dependency of transformers

if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"lln.hf needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}: "
        "pip install -U lln[hf]"
    )
