"""`lln bench`: time and peak memory of every attention vs sequence length, and decoding.

Modules: :mod:`~lln.bench.worker` (one configuration in a fresh process),
:mod:`~lln.bench.measure` (timing rule, memory probe), :mod:`~lln.bench.runner` (worker
processes with time / memory limits, the sweep), :mod:`~lln.bench.decode` (token-by-token
decoding), :mod:`~lln.bench.fit` (scaling exponent), :mod:`~lln.bench.report` (JSON header,
markdown, plots, README section), :mod:`~lln.bench.command` (the ``lln bench`` command).
"""

from .fit import ScalingFit, fit_exponent
from .report import replace_marked_section
from .runner import run_in_subprocess, sweep

__all__ = ["ScalingFit", "fit_exponent", "replace_marked_section", "run_in_subprocess", "sweep"]
