"""``mmt-fast``: command-line entry point.

::

    mmt-fast train --config FILE [--resume] [KEY=VALUE ...]
    mmt-fast evaluate --config FILE --checkpoint DIR_OR_FILE [--split test] [--views 5] [--out F.json]
    mmt-fast make-synthetic --out DIR [--num-clips N] ...
    torchrun --nproc_per_node=8 -m mmt_fast.cli train --config FILE   # DDP

``KEY=VALUE`` overrides use dotted config keys and YAML values, e.g.
``train.epochs=3 optim.lr=3e-4 model.overrides.loss__align=null``.

Errors end the command with one line on stderr (``--debug`` anywhere on the line,
or ``MMT_FAST_DEBUG=1``, prints the traceback too) and an exit code that says who
must act: 2 config (a value, override, path or the run folder), 3 data (an
empty or unusable split, a bad manifest), 4 runtime (non-finite loss, no valid
batch, damaged checkpoints, any other failure), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _load_config(args: argparse.Namespace):
    """The config, every failure to read or validate it being a ConfigError (exit code 2)."""
    from mmt_fast.errors import ConfigError
    from mmt_fast.train import load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"config file {e.filename} does not exist") from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"{args.config}: {msg}") from e


def _train(args: argparse.Namespace) -> int:
    from mmt_fast.train import train

    cfg = _load_config(args)
    train(cfg, resume=args.resume)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mmt_fast.train import evaluate_checkpoint

    cfg = _load_config(args)
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
    p.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (anywhere on the line)",
    )
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

    s = sub.add_parser(
        "make-synthetic", help="write a synthetic audio-video dataset", add_help=False
    )
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(
        func=lambda a: __import__("mmt_fast.data.synthetic", fromlist=["main"]).main(a.args)
    )
    return p


def _run(argv: list[str]) -> int:
    if argv[:1] == ["make-synthetic"]:  # every option belongs to the generator
        from mmt_fast.data.synthetic import main as synthetic_main

        return synthetic_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def error_exit_code(e: BaseException) -> tuple[int, str]:
    """(exit code, kind) of an exception reaching the command line (see the module docstring)."""
    from mmt_fast.errors import MMTError

    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, MMTError):
        return e.exit_code, e.kind
    if type(e).__name__ == "BadClipError":  # data.on_error: raise
        return 3, "data"
    return 4, "runtime"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns its exit code (errors become one line on stderr)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MMT_FAST_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(argv)
    except SystemExit:
        raise
    except BaseException as e:
        code, kind = error_exit_code(e)
        if debug:
            import traceback

            traceback.print_exc()
        from mmt_fast.errors import MMTError

        msg = str(e).strip() or type(e).__name__
        if not isinstance(e, MMTError | KeyboardInterrupt) and code != 3:
            msg = f"{type(e).__name__}: {msg}"  # an unexpected error: say what it was
        hint = "" if debug else " (--debug for the traceback)"
        print(f"mmt-fast: {kind} error: {msg}{hint}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
