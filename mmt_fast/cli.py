"""mmt-fast: train, evaluate and apply audio-video classifiers (MMT and its ablations).

Commands::

    mmt-fast make-synthetic --out DIR [--num-clips N] ...
    mmt-fast prepare --config FILE | --manifest FILE --out DIR [--split S] [--short-side N] [--workers N]
    mmt-fast train --config FILE [--resume] [KEY=VALUE ...]
    mmt-fast evaluate --checkpoint RUN_DIR [--config FILE] [--split test] [--views N]
    mmt-fast predict --checkpoint RUN_DIR INPUT... [--out preds.csv|.jsonl] [--top-k K]
    mmt-fast convert --from timm-mvitv2|slowfast|torchvision|ast --checkpoint IN --out OUT.safetensors
    mmt-fast check-data --config FILE [--split train ...] [--workers N] [--out report.json|.csv]
    mmt-fast plan --model MMT --gpu-mem 40GiB [--precision bf16] [--checkpointing stage1]
    mmt-fast analyze --checkpoint RUN_DIR [--split test] [--out DIR]    # Table 5 + t-SNE
    mmt-fast explain --checkpoint RUN_DIR --clip PATH [--target CLASS] [--out FILE.png]
    torchrun --nproc_per_node=8 -m mmt_fast.cli train --config FILE   # DDP

KEY=VALUE overrides use dotted config keys and YAML values, e.g.
train.epochs=3 optim.lr=3e-4 model.overrides.loss__align=null.

Only the standard library is imported here: torch and the package are imported
by each command after its arguments are parsed, so ``--help`` answers at once.

Errors end the command with one line on stderr (--debug anywhere on the line,
or MMT_FAST_DEBUG=1, prints the traceback too) and an exit code that says who
must act: 2 config (a value, override, argument, path or the run folder), 3
data (an empty or unusable split, a bad manifest, a bad clip under
data.on_error: raise), 4 runtime (non-finite loss, no valid batch, damaged
checkpoints, any other failure), 5 I/O (an output that cannot be written: no
space, read-only, a file where a folder should be), 130 interrupted. The classes are those of
mmt_fast.errors; every command raises them and only main() turns them into
the message and the exit code. ``train`` exits with 75 when a preemption
signal (``train.preempt_signals``: SIGTERM, SIGUSR1) stopped it after writing a
checkpoint: requeue the job and resume.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _load_config(args: argparse.Namespace):
    """The config, every failure to read or validate it being a ConfigError (exit code 2)."""
    from mmt_fast.inference import read_config

    return read_config(args.config, args.overrides)


def _train(args: argparse.Namespace) -> int:
    from mmt_fast.train import train

    cfg = _load_config(args)
    result = train(cfg, resume=args.resume)
    if result.get("preempted"):  # a checkpoint is written; the job may be requeued
        from mmt_fast.train.preemption import PREEMPTED_EXIT_CODE

        return PREEMPTED_EXIT_CODE
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mmt_fast.train.run_eval import evaluate_checkpoint

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


def _convert(args: argparse.Namespace) -> int:
    from mmt_fast.commands.convert import main as convert_main

    return convert_main(args)


def _predict(args: argparse.Namespace) -> int:
    from mmt_fast.commands.predict import main as predict_main

    return predict_main(args)


def _make_synthetic(args: argparse.Namespace) -> int:
    from mmt_fast.data.synthetic import main as synthetic_main

    return synthetic_main(args.args)


def build_parser() -> argparse.ArgumentParser:
    """The ``mmt-fast`` parser: one subparser per command, ``func`` set to its handler."""
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

    s = sub.add_parser(
        "make-synthetic",
        help="write a synthetic audio-video dataset (mp4 clips + manifest)",
        add_help=False,
    )
    s.add_argument("args", nargs=argparse.REMAINDER)
    s.set_defaults(func=_make_synthetic)

    pp = sub.add_parser(
        "prepare",
        help="a prepared copy of a dataset: clips re-encoded at the training size, 16 kHz wavs",
        description="Re-encode the clips of a config's splits or a manifest once, for fast "
        "loading: video at the training short side with short keyframe intervals and the "
        "source's timestamps, audio as a 16 kHz mono wav beside it, Epic-Kitchens segments cut "
        "with a margin; a new manifest and a report of the unusable inputs. Resumable.",
    )
    __import__("mmt_fast.commands.prepare", fromlist=["add_arguments"]).add_arguments(pp)
    pp.set_defaults(func=lambda a: __import__("mmt_fast.commands.prepare", fromlist=["run"]).run(a))

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML file (see configs/)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in train.out_dir"
    )
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.epochs=3")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a run on a labelled split (multi-view top-1/top-5, per-class, EK action)",
        description="Evaluate a checkpoint with the config and class index it was trained "
        "with (saved in the run); results go next to the run's metrics.csv.",
    )
    e.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or model.safetensors"
    )
    e.add_argument(
        "--config",
        default=None,
        help="a training YAML to use instead of the run's saved config (its model must match)",
    )
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument(
        "--views", type=int, default=None, help="test views per clip (default: data.test_views)"
    )
    e.add_argument("--out", default=None, help="results JSON (default: RUN_DIR/eval_<split>.json)")
    e.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    e.add_argument("--no-plot", action="store_true", help="skip the confusion-matrix plots")
    e.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.test=other/manifest.csv"
    )
    e.set_defaults(func=_evaluate)

    cd = sub.add_parser(
        "check-data",
        help="test-decode every clip of a config's manifests; report the unusable ones",
        description="Open and test-decode every clip (header, first and last windows of video "
        "and audio) in parallel; counts per bad-clip kind, a JSON/CSV report, exit code 3 when "
        "unusable clips exceed --max-bad-fraction.",
    )
    __import__("mmt_fast.commands.check_data", fromlist=["add_arguments"]).add_arguments(cd)
    cd.set_defaults(
        func=lambda a: __import__("mmt_fast.commands.check_data", fromlist=["main"]).main(a)
    )

    pl = sub.add_parser("plan", help="largest batch that fits a GPU (estimated, no GPU needed)")
    __import__("mmt_fast.commands.plan", fromlist=["add_arguments"]).add_arguments(pl)
    pl.set_defaults(func=lambda a: __import__("mmt_fast.commands.plan", fromlist=["run"]).run(a))

    an = sub.add_parser(
        "analyze",
        help="cluster a split's audio/video/fused embeddings (k-means ARI, homogeneity; t-SNE)",
        description="Table 5: embed a split with a trained run, k-means with k = number of "
        "classes, adjusted Rand index and homogeneity per embedding (printed + JSON), and a "
        "t-SNE map of each embedding (PNG).",
    )
    an.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    an.add_argument("--config", default=None, help="a YAML instead of the run's saved config")
    an.add_argument("--split", default="test", choices=("train", "val", "test"))
    an.add_argument("--out", default=None, help="output folder (default: the run folder)")
    an.add_argument("--views", type=int, default=None, help="views per clip (default: the run's)")
    an.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    an.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    an.add_argument("--seed", type=int, default=0, help="k-means and t-SNE seed")
    an.add_argument("--no-plot", action="store_true", help="skip the t-SNE picture")
    an.set_defaults(
        func=lambda a: __import__("mmt_fast.commands.analysis", fromlist=["main"]).main(a)
    )

    ex = sub.add_parser(
        "explain",
        help="Grad-CAM of one clip on both encoders' last stage, with the top-5 (PNG)",
        description="Grad-CAM of the target class (default: the predicted one) on the video "
        "encoder's and MAT's last-stage tokens: sampled frames and the spectrogram with their "
        "heat maps, and the top-5 predictions, in one PNG.",
    )
    ex.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    ex.add_argument("--clip", required=True, help="a media file (.mp4, or .wav for audio-only)")
    ex.add_argument("--target", default=None, help="class name (default: the top-1 prediction)")
    ex.add_argument("--out", default=None, help="the PNG (default: RUN_DIR/explain_<clip>.png)")
    ex.add_argument("--config", default=None, help="a YAML instead of the run's saved config")
    ex.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    ex.add_argument("--frames", type=int, default=4, help="sampled frames in the picture")
    ex.set_defaults(
        func=lambda a: __import__("mmt_fast.commands.explain", fromlist=["main"]).main(a)
    )

    c = sub.add_parser(
        "convert",
        help="convert a pretrained checkpoint (timm/SlowFast/torchvision MViTv2, AST, DeiT)",
        description="Map a public checkpoint onto an mmt-fast encoder and write it as "
        "safetensors (for model.init.audio / model.init.video). Nothing is downloaded.",
    )
    c.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("timm-mvitv2", "slowfast", "torchvision", "ast"),
        help="timm-mvitv2: timm mvitv2_* or MViT .pyth (ImageNet); slowfast: SlowFast MViTv2 "
        ".pyth; torchvision: mvit_v2_s state dict; ast: AST checkpoints or DeiT",
    )
    c.add_argument("--checkpoint", required=True, help=".pth / .pyth / .safetensors file")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    c.add_argument(
        "--model",
        default=None,
        help="target encoder preset (default: MAT for timm-mvitv2, MViTv2-B-16 for slowfast, "
        "MViTv2-S-16 for torchvision, AST for ast)",
    )
    c.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help="head of the target (default 0: encoder only, as inside MMT; a checkpoint head "
        "of the same size is copied)",
    )
    c.add_argument(
        "--source-grid",
        type=int,
        nargs=2,
        metavar=("F", "T"),
        help="(frequency, time) patch grid of an AST checkpoint's position embeddings, when "
        "neither 12 x 101 nor the model's own",
    )
    c.add_argument(
        "--non-strict",
        action="store_true",
        help="keep the model's initialisation (listed) for tensors that do not fit, instead of failing",
    )
    c.set_defaults(func=_convert)

    pr = sub.add_parser(
        "predict",
        help="classify your own clips (files, folders, list files) with a trained run",
        description="Classify unlabelled clips with a trained run: multi-view inference as in "
        "evaluation, class names from the run's class index. Bad files are reported and skipped.",
    )
    pr.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or model.safetensors"
    )
    pr.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="media files, folders (searched recursively), or list files (.txt: one path a line; "
        ".csv/.jsonl: a manifest with a path column)",
    )
    pr.add_argument("--out", default=None, help="preds.csv or preds.jsonl (default: CSV on stdout)")
    pr.add_argument(
        "--views", type=int, default=None, help="views per clip (default: the run's test_views)"
    )
    pr.add_argument("--top-k", type=int, default=1, help="classes per clip in the output")
    pr.add_argument(
        "--embeddings",
        default=None,
        help="save the clip embeddings (N, D) as .npy, in output order",
    )
    pr.add_argument("--batch-size", type=int, default=None, help="clips per batch")
    pr.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.set_defaults(func=_predict)
    return p


def _run(argv: list[str]) -> int:
    if argv[:1] == ["make-synthetic"]:  # every option belongs to the generator
        return _make_synthetic(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def error_exit_code(e: BaseException) -> tuple[int, str]:
    """(exit code, kind) of an exception reaching the command line (see the module docstring)."""
    from mmt_fast.errors import MMTError

    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, MMTError):  # BadClipError (data.on_error: raise) is a DataError
        # class attributes: a BadClipError instance's own ``kind`` is the bad-clip kind
        return type(e).exit_code, type(e).kind
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
        if not isinstance(e, MMTError | KeyboardInterrupt):
            msg = f"{type(e).__name__}: {msg}"  # an unexpected error: say what it was
        hint = "" if debug else " (--debug for the traceback)"
        print(f"mmt-fast: {kind} error: {msg}{hint}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
