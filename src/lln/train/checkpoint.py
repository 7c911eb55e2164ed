"""Atomic checkpoints and the random-number state they carry.

:func:`save_checkpoint` writes to a temporary file in the same folder and renames it over
the old checkpoint (``os.replace`` is atomic on POSIX and Windows), so a run killed at any
moment leaves either the previous complete checkpoint or the new one — never half a file.
Random states are stored as tensors and plain Python values, so checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The global torch, numpy and Python random states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global state)
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global state)
    random.seed(seed)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: Entries every training checkpoint holds.
CHECKPOINT_KEYS = ("step", "config", "model", "optimizer", "scheduler", "order", "rng")


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain values only);
    ``required``: entries it must hold (the trainer asks for :data:`CHECKPOINT_KEYS`).

    Raises:
        ValueError: the file is empty, truncated, corrupt or not a training checkpoint; the
            message names the file (a killed run never leaves one: saving is atomic, so this
            is a file damaged or replaced by something else).
    """
    path = Path(path)
    hint = "delete it, or pass --overwrite to start the run again"
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError...
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"checkpoint {path} cannot be read ({reason[:200]}): {hint}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing or ("step" in required and not isinstance(state["step"], int)):
        raise ValueError(f"checkpoint {path} is not a training checkpoint of lln (missing or "
                         f"bad entries: {missing or ['step']}): {hint}")
    return state
