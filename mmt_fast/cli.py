"""``mmt-fast``: command-line entry point.

::

    mmt-fast train --config FILE [--resume] [KEY=VALUE ...]
    mmt-fast evaluate --config FILE --checkpoint DIR_OR_FILE [--split test] [--views 5] [--out F.json]
    mmt-fast make-synthetic --out DIR [--num-clips N] ...
    mmt-fast plan --model MMT --gpu-mem 40GiB [--precision bf16] [--checkpointing stage1]
    torchrun --nproc_per_node=8 -m mmt_fast.cli train --config FILE   # DDP

``KEY=VALUE`` overrides use dotted config keys and YAML values, e.g.
``train.epochs=3 optim.lr=3e-4 model.overrides.loss__align=null``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _train(args: argparse.Namespace) -> int:
    from mmt_fast.train import load_config, train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mmt_fast.train import evaluate_checkpoint, load_config

    cfg = load_config(args.config, args.overrides)
    evaluate_checkpoint(
        cfg,
        args.checkpoint,
        split=args.split,
        views=args.views,
        out=args.out,
        which=args.which,
        plot=not args.no_plot,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmt-fast", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML file (see configs/)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in train.out_dir"
    )
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate", help="evaluate a checkpoint (multi-view top-1/top-5, per-class, EK action)"
    )
    e.add_argument("--config", required=True, help="the training YAML (data and model sections)")
    e.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or model.safetensors"
    )
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument(
        "--views", type=int, default=None, help="test views per clip (default: data.test_views)"
    )
    e.add_argument(
        "--out", default=None, help="results JSON (default: <checkpoint>/eval_<split>.json)"
    )
    e.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    e.add_argument("--no-plot", action="store_true", help="skip the confusion-matrix plots")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    e.set_defaults(func=_evaluate)

    pl = sub.add_parser("plan", help="largest batch that fits a GPU (estimated, no GPU needed)")
    __import__("mmt_fast.plan", fromlist=["add_arguments"]).add_arguments(pl)
    pl.set_defaults(func=lambda a: __import__("mmt_fast.plan", fromlist=["run"]).run(a))

    s = sub.add_parser(
        "make-synthetic", help="write a synthetic audio-video dataset", add_help=False
    )
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(
        func=lambda a: __import__("mmt_fast.data.synthetic", fromlist=["main"]).main(a.args)
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["make-synthetic"]:  # every option belongs to the generator
        from mmt_fast.data.synthetic import main as synthetic_main

        return synthetic_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
