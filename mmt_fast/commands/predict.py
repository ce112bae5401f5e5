"""``mmt-fast predict``: classify your own clips with a trained run (the work is
:func:`mmt_fast.tools.predict.predict_clips`; the inputs and the output format are
described in :mod:`mmt_fast.tools.predict`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmt_fast.errors import ConfigError

HELP = "classify your own clips (files, folders, list files) with a trained run"
DESCRIPTION = (
    "Classify unlabelled clips with a trained run: multi-view inference as in evaluation, "
    "class names from the run's class index. Bad files are reported and skipped."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint folder or model.safetensors"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="media files, folders (searched recursively), or list files (.txt: one path a line; "
        ".csv/.jsonl: a manifest with a path column)",
    )
    p.add_argument("--out", default=None, help="preds.csv or preds.jsonl (default: CSV on stdout)")
    p.add_argument(
        "--views", type=int, default=None, help="views per clip (default: the run's test_views)"
    )
    p.add_argument("--top-k", type=int, default=1, help="classes per clip in the output")
    p.add_argument(
        "--embeddings",
        default=None,
        help="save the clip embeddings (N, D) as .npy, in output order",
    )
    p.add_argument("--batch-size", type=int, default=None, help="clips per batch")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_arguments(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.out is not None and Path(args.out).suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"--out {args.out}: use a .csv or .jsonl file")
    if args.embeddings is not None and not str(args.embeddings).endswith(".npy"):
        raise ConfigError(f"--embeddings {args.embeddings}: use a .npy file")


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    # imported here, not at the top, so that ``mmt-fast predict --help`` answers before torch
    import numpy as np

    from mmt_fast.inference import load_run
    from mmt_fast.tools.predict import collect_inputs, predict_clips, write_predictions

    loaded = load_run(args.checkpoint, which=args.which)
    records = collect_inputs(args.inputs, loaded.model.modalities)
    pred = predict_clips(
        loaded,
        records,
        views=args.views,
        batch_size=args.batch_size,
        device=args.device,
        embeddings=args.embeddings is not None,
        progress=not args.no_progress,
    )
    text = write_predictions(pred, args.out, args.top_k)
    if args.out is None:
        sys.stdout.write(text)
    for path, kind, reason in pred.bad:
        print(f"[mmt-fast] skipped {path}: {kind}: {reason}", file=sys.stderr)
    msg = f"predicted {len(pred.records)} clips with {loaded.checkpoint.path}"
    if pred.bad:
        msg += f"; skipped {len(pred.bad)} bad files {pred.skipped}"
    if args.out is not None:
        msg += f"; wrote {args.out}"
    if args.embeddings is not None:
        Path(args.embeddings).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.embeddings, pred.embeddings.numpy().astype(np.float32))
        msg += f", {args.embeddings} {tuple(pred.embeddings.shape)}"
    print(f"[mmt-fast] {msg}", file=sys.stderr)
    return 0
