"""mmt-fast: train, evaluate and apply audio-video classifiers (MMT and its ablations).

Commands::

    mmt-fast make-synthetic --out DIR [--num-clips N] ...
    mmt-fast prepare --config FILE | --manifest FILE --out DIR [--split S] [--short-side N] [--workers N]
    mmt-fast train --config FILE [--resume] [KEY=VALUE ...]
    mmt-fast evaluate --checkpoint RUN_DIR [--config FILE] [--split test] [--views N]
    mmt-fast predict --checkpoint RUN_DIR INPUT... [--out preds.csv|.jsonl] [--top-k K]
    mmt-fast convert --from timm-mvitv2|slowfast|torchvision|ast --checkpoint IN --out OUT.safetensors
    mmt-fast check-data --config FILE [--split train --split val] [--workers N] [--out report.json|.csv]
    mmt-fast plan --model MMT --gpu-mem 40GiB [--precision bf16] [--checkpointing stage1]
    mmt-fast analyze --checkpoint RUN_DIR [--split test] [--out DIR]    # Table 5 + t-SNE
    mmt-fast explain --checkpoint RUN_DIR --clip PATH [--target CLASS] [--out FILE.png]
    torchrun --nproc_per_node=8 -m mmt_fast.cli train --config FILE   # DDP

KEY=VALUE overrides use dotted config keys and YAML values, e.g.
train.epochs=3 optim.lr=3e-4 model.overrides.loss__align=null.

Each command is a module of :mod:`mmt_fast.commands` with ``HELP`` (one line),
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> exit code``; this module only
builds the parser from them and dispatches. The command modules import only the standard
library and :mod:`mmt_fast.errors` at import time (torch and the package are imported by
``run``), so ``--help`` answers at once.

Errors end the command with one line on stderr (--debug anywhere on the line,
or MMT_FAST_DEBUG=1, prints the traceback too) and an exit code that says who
must act: 2 config (a value, override, argument, path or the run folder), 3
data (an empty or unusable split, a bad manifest, a bad clip under
data.on_error: raise), 4 runtime (non-finite loss, no valid batch, damaged
checkpoints, any other failure), 5 I/O (an output that cannot be written: no
space, read-only, a file where a folder should be), 130 interrupted. The classes are those
of mmt_fast.errors (``exit_code``, ``category``); every command raises them and only main()
turns them into the message and the exit code. ``train`` exits with 75 when a preemption
signal (``train.preempt_signals``: SIGTERM, SIGUSR1) stopped it after writing a
checkpoint: requeue the job and resume.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: the commands in the order ``--help`` lists them; each is mmt_fast.commands.<name with _>
COMMANDS = (
    "make-synthetic",
    "prepare",
    "train",
    "evaluate",
    "check-data",
    "plan",
    "analyze",
    "explain",
    "convert",
    "predict",
)


def command_module(name: str):
    """The module of command ``name`` (``check-data`` -> :mod:`mmt_fast.commands.check_data`)."""
    return importlib.import_module(f"mmt_fast.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    """The ``mmt-fast`` parser: one subparser per command, ``func`` set to its ``run``."""
    p = argparse.ArgumentParser(
        prog="mmt-fast",
        description=__doc__.split("\n\n")[0],
        epilog="Run 'mmt-fast COMMAND --help' for the options of a command.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (anywhere on the line)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        mod = command_module(name)
        s = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.DESCRIPTION,
            add_help=not getattr(mod, "OWN_HELP", False),
        )
        mod.add_arguments(s)
        s.set_defaults(func=mod.run)
    return p


def _run(argv: list[str]) -> int:
    if argv[:1] == ["make-synthetic"]:  # every option, --help included, belongs to the generator
        return command_module("make-synthetic").run(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def error_exit_code(e: BaseException) -> tuple[int, str]:
    """(exit code, category) of an exception reaching the command line (see the module
    docstring)."""
    from mmt_fast.errors import MMTError

    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, MMTError):  # BadClipError (data.on_error: raise) is a DataError
        return e.exit_code, e.category
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
        code, category = error_exit_code(e)
        if debug:
            import traceback

            traceback.print_exc()
        from mmt_fast.errors import MMTError

        msg = str(e).strip() or type(e).__name__
        if not isinstance(e, MMTError | KeyboardInterrupt):
            msg = f"{type(e).__name__}: {msg}"  # an unexpected error: say what it was
        hint = "" if debug else " (--debug for the traceback)"
        print(f"mmt-fast: {category} error: {msg}{hint}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
