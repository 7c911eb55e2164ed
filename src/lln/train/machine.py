"""One line naming the machine a run ran on (recorded in ``summary.json``, shown by
``lln results``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """One line: CPU model, cores, torch version, operating system."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"
