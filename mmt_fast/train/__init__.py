"""Training and evaluation: configs, the DDP trainer, checkpoints, metrics.

``mmt-fast train --config FILE`` and ``mmt-fast evaluate`` (see :mod:`mmt_fast.cli`)
are thin wrappers around :func:`train` and :func:`evaluate_checkpoint`.
"""

from mmt_fast.train.checkpoint import CheckpointManager, load_checkpoint, resolve_checkpoint
from mmt_fast.train.config import TrainConfig, config_from_dict, load_config
from mmt_fast.train.run_eval import evaluate_checkpoint
from mmt_fast.train.schedule import WarmupCosine, lr_factor
from mmt_fast.train.trainer import Trainer, train

__all__ = [
    "CheckpointManager",
    "TrainConfig",
    "Trainer",
    "WarmupCosine",
    "config_from_dict",
    "evaluate_checkpoint",
    "load_checkpoint",
    "load_config",
    "lr_factor",
    "resolve_checkpoint",
    "train",
]
