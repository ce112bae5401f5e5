"""``mmt-fast check-data``: find unusable clips of a training config's manifests.

    mmt-fast check-data --config FILE [--split train --split val ...] [--workers N]
                        [--out report.json|report.csv] [--max-bad-fraction F] [KEY=VALUE ...]

Every clip of each split is opened and test-decoded in parallel (the header,
the first and last sampling windows of the video, the audio under them: see
:func:`mmt_fast.data.check.check_clips`), with a progress bar. With
``data.format: webdataset`` the shards are checked instead of the files they
were packed from (:func:`mmt_fast.data.check.check_shards`): each shard's size
and SHA-256 against the index, each sample decoded from the shard's bytes. A line per
split gives the counts per bad-clip kind; ``--out`` writes the unusable clips
(JSON with a per-split summary, or CSV). Exit code 0 when no split has more
unusable clips than ``--max-bad-fraction`` (default 0: none), else 3 (a data
error, as ``train`` uses), 2 for a config error.
"""

from __future__ import annotations

import argparse
import sys

SPLITS = ("train", "val", "test")
HELP = "test-decode every clip of a config's manifests; report the unusable ones"
DESCRIPTION = (
    "Open and test-decode every clip (header, first and last windows of video and audio) in "
    "parallel; counts per bad-clip kind, a JSON/CSV report, exit code 3 when unusable clips "
    "exceed --max-bad-fraction."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a training YAML (its data section is used)")
    p.add_argument(
        "--split",
        action="append",
        choices=SPLITS,
        default=None,
        help="a split to check, repeatable: --split train --split val (default: every split "
        "the config names)",
    )
    p.add_argument("--workers", type=int, default=4, help="decoding processes (0: in this process)")
    p.add_argument("--out", default=None, help="report of the unusable clips: .json or .csv")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.0,
        help="fraction of unusable clips per split tolerated before the exit code is 3",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.root=/data")


def run(args: argparse.Namespace) -> int:
    from mmt_fast.data.check import check_clips, check_shards, summarize, write_report
    from mmt_fast.errors import ConfigError, DataError
    from mmt_fast.run.builders import data_setup
    from mmt_fast.run.config import read_config

    if args.workers < 0:
        raise ConfigError(f"--workers={args.workers}; expected >= 0")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ConfigError(f"--max-bad-fraction={args.max_bad_fraction}; expected in [0, 1]")
    if args.out and not args.out.lower().endswith((".json", ".csv")):
        raise ConfigError(f"--out {args.out}: expected a .json or .csv file")
    cfg = read_config(args.config, args.overrides)
    d = cfg.data
    splits = args.split or [s for s in SPLITS if getattr(d, s)]
    missing = [s for s in splits if not getattr(d, s)]
    if missing or not splits:
        raise ConfigError(f"the config names no manifest for {missing or list(SPLITS)} (data.*)")
    setup = data_setup(cfg, splits, views=2)
    records, dc, kw = setup.records, setup.dataset_cfg, setup.dataset_kwargs()
    results = {}
    failed = []
    for s in splits:
        opts = {"workers": args.workers, "progress": not args.no_progress, "desc": s, **kw}
        if d.format == "webdataset":  # the shards' bytes, as training reads them
            n, probs = check_shards(getattr(d, s), getattr(d, f"{s}_split"), dc, **opts)
        else:
            n, probs = len(records[s]), check_clips(records[s], dc, **opts)
        results[s] = (n, probs)
        info = summarize(probs, n)
        kinds = ", ".join(f"{k} {c}" for k, c in info["per_kind"].items())
        print(
            f"{s}: {n} clips, {len(probs)} unusable" + (f" ({kinds})" if kinds else ""),
            file=sys.stderr,
            flush=True,
        )
        if len(probs) > args.max_bad_fraction * n:
            failed.append(f"{s} {len(probs)}/{n} {info['per_kind']}")
    if args.out:
        path = write_report(args.out, results)
        print(f"report: {path}", file=sys.stderr)
    if failed:
        first = next(p for _, ps in results.values() for p in ps)
        raise DataError(
            "unusable clips: "
            + "; ".join(failed)
            + f" (more than --max-bad-fraction={args.max_bad_fraction}); first: "
            + f"{first.path}: {first.reason}"
            + (f"; list in {args.out}" if args.out else "; --out FILE lists them")
        )
    return 0
