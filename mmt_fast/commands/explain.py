"""``mmt-fast explain``: Grad-CAM of one clip on both encoders' last stage, with the top-5
predictions, in one PNG (the method and the picture: :mod:`mmt_fast.tools.explain`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmt_fast.errors import ConfigError, DataError

HELP = "Grad-CAM of one clip on both encoders' last stage, with the top-5 (PNG)"
DESCRIPTION = (
    "Grad-CAM of the target class (default: the predicted one) on the video encoder's and "
    "MAT's last-stage tokens: sampled frames and the spectrogram with their heat maps, and the "
    "top-5 predictions, in one PNG."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    p.add_argument("--clip", required=True, help="a media file (.mp4, or .wav for audio-only)")
    p.add_argument("--target", default=None, help="class name (default: the top-1 prediction)")
    p.add_argument("--out", default=None, help="the PNG (default: RUN_DIR/explain_<clip>.png)")
    p.add_argument("--config", default=None, help="a YAML instead of the run's saved config")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    p.add_argument("--frames", type=int, default=4, help="sampled frames in the picture")


def run(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {args.frames}")
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise ConfigError(f"--out {args.out}: use a .png file")
    if not Path(args.clip).is_file():
        raise DataError(f"--clip {args.clip}: no such file")
    # imported here, not at the top, so that ``mmt-fast explain --help`` answers before torch
    from mmt_fast.inference import load_run
    from mmt_fast.tools.explain import explain_clip, plot_explanation

    loaded = load_run(args.checkpoint, args.config, None, args.which)
    ex = explain_clip(loaded, args.clip, args.target)
    out = Path(args.out) if args.out else loaded.run_dir / f"explain_{Path(args.clip).stem}.png"
    title = f"{Path(args.clip).name} ({loaded.checkpoint.path})"
    plot_explanation(ex, out, title, args.frames)
    for i, (n, p) in enumerate(ex.top(5)):
        print(f"{i + 1}. {n}\t{p:.4f}")
    print(f"[mmt-fast] Grad-CAM of {ex.class_names[ex.target]}; wrote {out}", file=sys.stderr)
    return 0
