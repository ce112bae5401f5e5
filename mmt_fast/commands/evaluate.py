"""``mmt-fast evaluate``: a checkpoint on a labelled split, with multi-view testing
(:func:`mmt_fast.inference.evaluate_checkpoint`).

By default a run is evaluated with what it was trained with: the config and the class
index saved in its checkpoint folder (``config.yaml``, ``classes.json``). Under
``torchrun`` every rank evaluates its share of the split. The report (top-1/top-5,
per-class and mean-class accuracy, the EK action accuracy) goes to
``RUN_DIR/eval_<split>.json`` beside the run's ``metrics.csv``, with confusion-matrix plots.
"""

from __future__ import annotations

import argparse

HELP = "evaluate a run on a labelled split (multi-view top-1/top-5, per-class, EK action)"
DESCRIPTION = (
    "Evaluate a checkpoint with the config and class index it was trained with (saved in "
    "the run); results go next to the run's metrics.csv."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or model.safetensors"
    )
    p.add_argument(
        "--config",
        default=None,
        help="a training YAML to use instead of the run's saved config (its model must match)",
    )
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument(
        "--views", type=int, default=None, help="test views per clip (default: data.test_views)"
    )
    p.add_argument("--out", default=None, help="results JSON (default: RUN_DIR/eval_<split>.json)")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    p.add_argument("--no-plot", action="store_true", help="skip the confusion-matrix plots")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.test=other/manifest.csv"
    )


def run(args: argparse.Namespace) -> int:
    from mmt_fast.inference import evaluate_checkpoint  # here: --help answers before torch loads

    evaluate_checkpoint(
        args.config,
        args.checkpoint,
        split=args.split,
        views=args.views,
        out=args.out,
        which=args.which,
        plot=not args.no_plot,
        overrides=args.overrides,
    )
    return 0
