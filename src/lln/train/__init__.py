"""Training harness: trainer, checkpoints, data-parallel, results grid.

    from lln.train import TrainConfig, train
    summary = train(TrainConfig(task="listops", attn="lln_diag", seed=0, out="runs/x"))

Command line: ``lln train TASK --attn NAME`` (:mod:`lln.train.command`) and ``lln results``
(:mod:`lln.train.results`). Data-parallel: ``torchrun --nproc_per_node N -m lln.cli train ...``
(:mod:`lln.train.distributed`).
"""

from .config import RECIPES, TrainConfig
from .trainer import train

__all__ = ["RECIPES", "TrainConfig", "train"]
