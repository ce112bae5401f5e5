"""The run layer: what training and inference share, below both.

- :mod:`~mmt_fast.run.config`: training configs (YAML <-> dataclasses), :func:`read_config`;
- :mod:`~mmt_fast.run.builders`: records, class index, datasets, loaders and the model from a
  config (:func:`~mmt_fast.run.builders.data_setup` for commands without a trained run);
- :mod:`~mmt_fast.run.checkpoint`: the checkpoint store (save, resume, load for inference);
- :mod:`~mmt_fast.run.metrics`, :mod:`~mmt_fast.run.evaluation`: accuracy and reports,
  predictions gathered across ranks;
- :mod:`~mmt_fast.run.loop`: the evaluation loop (views averaged, embeddings recorded);
- :mod:`~mmt_fast.run.distributed`, :mod:`~mmt_fast.run.sampling`,
  :mod:`~mmt_fast.run.signals`: ranks, resumable sampling and seeding, signal names.

The trainer (:mod:`mmt_fast.train`) and inference (:mod:`mmt_fast.inference`) build on
this package and never import each other.
"""

from mmt_fast.run.checkpoint import CheckpointManager, load_checkpoint, resolve_checkpoint
from mmt_fast.run.config import TrainConfig, config_from_dict, load_config, read_config

__all__ = [
    "CheckpointManager",
    "TrainConfig",
    "config_from_dict",
    "load_checkpoint",
    "load_config",
    "read_config",
    "resolve_checkpoint",
]
