"""``mmt-fast train``: train a model from a YAML config (:func:`mmt_fast.train.train`).

``--resume`` continues from the last checkpoint in ``train.out_dir``. When a preemption
signal (``train.preempt_signals``) stopped the run after it wrote a checkpoint, the exit code
is 75 (:data:`mmt_fast.train.preemption.PREEMPTED_EXIT_CODE`): requeue the job and resume.
"""

from __future__ import annotations

import argparse

HELP = "train a model from a YAML config"
DESCRIPTION = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in train.out_dir"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3")


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top, so that ``mmt-fast --help`` answers before torch loads
    from mmt_fast.run.config import read_config
    from mmt_fast.train.preemption import PREEMPTED_EXIT_CODE
    from mmt_fast.train.trainer import train

    cfg = read_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    if result.get("preempted"):  # a checkpoint is written; the job may be requeued
        return PREEMPTED_EXIT_CODE
    return 0
