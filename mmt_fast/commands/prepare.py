"""``mmt-fast prepare``: a prepared copy of a dataset (re-encoded once for fast loading).

From a training config (every configured split, or those named with ``--split``)
or a manifest in any format the trainer reads, to ``OUT/clips/*.mp4`` + ``*.wav``,
``OUT/manifest.csv`` (a plain manifest with a ``split`` column) and
``OUT/prepare_report.json`` (see :mod:`mmt_fast.data.prepare`). The short side
keyframe interval and B-frames follow the data settings (``--short-side``, ``--gop``
and ``--bframes`` override them). Run it again to resume: finished clips are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SPLITS = ("train", "val", "test")
FORMATS = ("manifest", "vggsound", "kinetics_sounds", "epic_kitchens")
HELP = "a prepared copy of a dataset: clips re-encoded at the training size, 16 kHz wavs"
DESCRIPTION = (
    "Re-encode the clips of a config's splits or a manifest once, for fast loading: video at "
    "the training short side with short keyframe intervals and the source's timestamps, audio "
    "as a 16 kHz mono wav beside it, Epic-Kitchens segments cut with a margin; a new manifest "
    "and a report of the unusable inputs. Resumable."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a training YAML: prepare its configured splits")
    src.add_argument("--manifest", help="a manifest file (see --format)")
    p.add_argument("--out", required=True, help="output folder (created; resumable)")
    p.add_argument(
        "--format",
        default="manifest",
        choices=FORMATS,
        help="format of --manifest (default: manifest)",
    )
    p.add_argument(
        "--root", default=None, help="folder of the media files (default: the manifest's)"
    )
    p.add_argument(
        "--split",
        action="append",
        default=None,
        metavar="NAME",
        help="--config: the splits to prepare (train/val/test; repeatable; default: all configured). "
        "--manifest: keep the rows of this split (rows without a split column get it)",
    )
    p.add_argument(
        "--preset",
        default="paper",
        help="--manifest: the data preset whose sizes apply (default: paper)",
    )
    p.add_argument(
        "--short-side",
        type=int,
        default=None,
        help="output short side in px (default: the training decode size, 320 for 224 crops; "
        "the crop size when only val/test splits are prepared)",
    )
    p.add_argument(
        "--gop", type=int, default=None, help="frames between keyframes (default: a quarter window)"
    )
    p.add_argument(
        "--bframes",
        type=int,
        default=None,
        help="non-reference B-frames between reference frames, which the loader skips when "
        "no window samples them (default: the sampling stride - 1, 3 for stride 4; 0: none)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="seconds kept before and after a segment (Epic-Kitchens; default: one sampling "
        "window at 24 fps, 2.6 s for 16 frames at stride 4)",
    )
    p.add_argument("--crf", type=int, default=23, help="libx264 quality (default 23)")
    p.add_argument(
        "--audio-format",
        default="PCM_16",
        choices=("PCM_16", "PCM_24", "FLOAT", "FLAC"),
        help="the 16 kHz audio sidecar: a wav of 16/24-bit or float samples, or a 16-bit "
        "FLAC (about half the size; default PCM_16)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="processes (default: the CPU count, at most 8)"
    )
    p.add_argument(
        "--shards",
        action="store_true",
        help="also pack the prepared clips into WebDataset tar shards, one set per split "
        "(OUT/shards/<split>/index.json, for data.format: webdataset)",
    )
    p.add_argument(
        "--shard-size", type=int, default=256, metavar="MiB", help="largest shard (default 256 MiB)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="--config overrides, e.g. data.root=/data"
    )


def _records_from_config(args):
    """(records with their split names set, the DataConfig of training, whether a split trains)."""
    from mmt_fast.errors import ConfigError
    from mmt_fast.run.builders import data_setup
    from mmt_fast.run.config import read_config

    cfg = read_config(args.config, args.overrides)
    data = cfg.data
    if data.format == "webdataset":
        raise ConfigError(
            f"{args.config} trains from shards (data.format: webdataset); prepare reads the "
            "clips of a manifest: give the config of the original data"
        )
    wanted = args.split or [s for s in SPLITS if getattr(data, s)]
    for s in wanted:
        if s not in SPLITS:
            raise ConfigError(f"--split {s!r}: expected one of {SPLITS} with --config")
        if not getattr(data, s):
            raise ConfigError(f"--split {s}: data.{s} is not set in {args.config}")
    if not wanted:
        raise ConfigError(f"{args.config} configures no split (data.train/val/test)")
    setup = data_setup(cfg, wanted, mode="train")
    dc = setup.dataset_cfg
    records, seen = [], set()
    for s in wanted:
        name = getattr(data, f"{s}_split") or s
        for r in setup.records[s]:
            key = (r.path, r.start_s, r.end_s, r.clip_id, name)
            if key in seen:  # one file serving several splits (filtered by its split column)
                continue
            seen.add(key)
            r.split = name
            records.append(r)
    return records, dc, "train" in wanted


def _records_from_manifest(args):
    from mmt_fast.data import (
        data_config,
        read_epic_kitchens,
        read_kinetics_sounds,
        read_manifest,
        read_vggsound,
    )
    from mmt_fast.data.dataset import DATA_PRESETS
    from mmt_fast.errors import ConfigError, DataError

    path = Path(args.manifest)
    if not path.is_file():
        raise ConfigError(f"--manifest {path} does not exist")
    if args.preset not in DATA_PRESETS:
        raise ConfigError(f"--preset {args.preset!r}; expected one of {sorted(DATA_PRESETS)}")
    if args.split and len(args.split) > 1:
        raise ConfigError("--manifest takes one --split")
    split = args.split[0] if args.split else None
    root = args.root or path.parent
    try:
        if args.format == "manifest":
            recs = read_manifest(path, root)
        elif args.format == "vggsound":
            recs = read_vggsound(path, root, split=split)
        elif args.format == "kinetics_sounds":
            recs = read_kinetics_sounds(path, root, on_error="skip")
        else:
            recs = read_epic_kitchens(path, root)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if split is not None:
        if any(r.split for r in recs):
            recs = [r for r in recs if r.split == split]
        for r in recs:
            r.split = split
    if not recs:
        raise DataError(f"{path} has no clips" + (f" of split {split!r}" if split else ""))
    return recs, data_config(args.preset), split in (None, "train")


def run(args: argparse.Namespace) -> int:
    from mmt_fast.data.prepare import prepare_dataset, settings_for
    from mmt_fast.errors import ConfigError, DataError

    for name, v, ok in (
        ("--short-side", args.short_side, args.short_side is None or args.short_side >= 16),
        ("--gop", args.gop, args.gop is None or args.gop >= 1),
        ("--bframes", args.bframes, args.bframes is None or 0 <= args.bframes <= 16),
        ("--margin", args.margin, args.margin is None or args.margin >= 0),
        ("--crf", args.crf, 0 <= args.crf <= 51),
        ("--workers", args.workers, args.workers is None or args.workers >= 1),
        ("--shard-size", args.shard_size, args.shard_size >= 1),
    ):
        if not ok:
            raise ConfigError(f"{name} {v} is out of range")
    if args.manifest and args.overrides:
        raise ConfigError(f"KEY=VALUE overrides need --config (got {' '.join(args.overrides)})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    records, dc, train = _records_from_config(args) if args.config else _records_from_manifest(args)
    settings = settings_for(
        dc,
        train,
        short_side=args.short_side,
        gop=args.gop,
        bframes=args.bframes,
        margin_s=args.margin,
        crf=args.crf,
        audio_subtype=args.audio_format,
    )
    workers = args.workers or min(os.cpu_count() or 1, 8)
    print(
        f"prepare: {len(records)} records -> {out} (short side {settings.short_side} px, smaller "
        f"sources kept at their size; keyframe "
        f"every {settings.gop} frames, {settings.bframes} B-frames between references, "
        f"margin {settings.margin_s} s, {workers} workers)",
        file=sys.stderr,
        flush=True,
    )
    report = prepare_dataset(records, out, settings, workers=workers, progress=not args.no_progress)
    if report["records_written"] == 0:
        raise DataError(
            f"no clip could be prepared ({report['unusable_counts']}); see {out / 'prepare_report.json'}"
        )
    splits = sorted({r.split for r in records if r.split})
    keys = " ".join(f"data.{s}={out / 'manifest.csv'}" for s in SPLITS if s in splits)
    print(
        f"train from it: data.format=manifest data.root=null {keys}".rstrip(),
        file=sys.stderr,
        flush=True,
    )
    if args.shards:
        from mmt_fast.data.shards import write_shards

        indexes = {}
        for s in splits or [None]:
            dest = out / "shards" / (s or "all")
            print(f"prepare: shards of split {s or '(all rows)'} -> {dest}", file=sys.stderr)
            indexes[s] = write_shards(
                out / "manifest.csv",
                dest,
                split=s,
                max_shard_bytes=args.shard_size << 20,
                progress=not args.no_progress,
            )
        keys = " ".join(f"data.{s}={indexes[s]}" for s in SPLITS if s in indexes)
        print(
            f"train from the shards: data.format=webdataset {keys}".rstrip(),
            file=sys.stderr,
            flush=True,
        )
    return 0
