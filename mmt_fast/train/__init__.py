"""The training loop: the DDP trainer, its learning-rate schedule, metric logging and
preemption handling.

``mmt-fast train --config FILE`` (:mod:`mmt_fast.commands.train`) is a thin wrapper around
:func:`train`. Configs, checkpoints, builders and metrics are the run layer's
(:mod:`mmt_fast.run`), which inference (:mod:`mmt_fast.inference`) shares; nothing here
imports inference or a command.
"""

from mmt_fast.train.schedule import WarmupCosine, lr_factor
from mmt_fast.train.trainer import Trainer, train

__all__ = ["Trainer", "WarmupCosine", "lr_factor", "train"]
