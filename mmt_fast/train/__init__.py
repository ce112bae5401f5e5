"""Training and evaluation: configs, the DDP trainer, checkpoints, metrics.

``mmt-fast train --config FILE`` and ``mmt-fast evaluate`` (see :mod:`mmt_fast.cli`)
are thin wrappers around :func:`train` and :func:`evaluate_checkpoint`.

The names below are imported on first use (PEP 562), so importing one of the
package's library modules (``config``, ``checkpoint``, ``builders``, ``metrics``)
does not import the trainer: :mod:`mmt_fast.inference` builds on those modules,
and the trainer and ``evaluate`` build on :mod:`mmt_fast.inference`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "CheckpointManager": "mmt_fast.train.checkpoint",
    "load_checkpoint": "mmt_fast.train.checkpoint",
    "resolve_checkpoint": "mmt_fast.train.checkpoint",
    "TrainConfig": "mmt_fast.train.config",
    "config_from_dict": "mmt_fast.train.config",
    "load_config": "mmt_fast.train.config",
    "evaluate_checkpoint": "mmt_fast.train.run_eval",
    "WarmupCosine": "mmt_fast.train.schedule",
    "lr_factor": "mmt_fast.train.schedule",
    "Trainer": "mmt_fast.train.trainer",
    "train": "mmt_fast.train.trainer",
}

if TYPE_CHECKING:
    from mmt_fast.train.checkpoint import CheckpointManager, load_checkpoint, resolve_checkpoint
    from mmt_fast.train.config import TrainConfig, config_from_dict, load_config
    from mmt_fast.train.run_eval import evaluate_checkpoint
    from mmt_fast.train.schedule import WarmupCosine, lr_factor
    from mmt_fast.train.trainer import Trainer, train


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
