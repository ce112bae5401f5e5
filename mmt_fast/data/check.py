"""Find unusable clips before training: open and test-decode every clip of a list.

:func:`check_clips` runs each clip through the dataset's own loading code
(:class:`~mmt_fast.data.dataset.AVClipDataset` in test mode with two views: the
header, the first and the last sampling window of the video, the audio under
those windows), in parallel worker processes, and returns one
:class:`ClipProblem` per unusable clip with the bad-clip ``kind`` of
``errors.py`` (``missing_file``, ``corrupt_file``, ``no_audio``, ...). What
passes here loads during training, since it is the same code. Used by
``mmt-fast check-data`` (:mod:`mmt_fast.commands.check_data`) and reusable by
data preparation.
"""

from __future__ import annotations

import collections
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .dataset import AVClipDataset, DataConfig
from .manifests import ClassIndex, ClipRecord


@dataclass(frozen=True)
class ClipProblem:
    """One unusable clip: its position in the list, file, bad-clip kind and reason."""

    index: int
    path: str
    kind: str
    reason: str


class _Probe:
    """``probe[i]`` -> None (usable) or (kind, reason): no tensors cross processes."""

    def __init__(self, dataset: AVClipDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if isinstance(item, dict) else (item.kind, item.reason)


def _can_fork() -> bool:
    import multiprocessing as mp

    return "fork" in mp.get_all_start_methods()


def _first(batch):
    return batch[0]


def check_clips(
    records: Sequence[ClipRecord],
    config: DataConfig,
    class_index: ClassIndex | None = None,
    workers: int = 4,
    progress: bool = True,
    desc: str = "check",
    **dataset_kwargs,
) -> list[ClipProblem]:
    """Test-decode every record; the unusable ones, in list order.

    Args:
        records: the clips (a manifest's records).
        config: their sampling settings (sizes, modalities); the mode and views
            are replaced by the test mode with two windows (first and last) and
            errors are collected, not raised.
        class_index: labels outside it are ``unknown_label`` (default: the
            records' own labels, so none is).
        workers: decoding processes (0: in this process).
        progress: a tqdm bar on stderr.
        dataset_kwargs: more :class:`AVClipDataset` arguments (verb/noun indices).
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    records = list(records)
    cfg = replace(config, mode="test", num_views=2, on_error="skip", decode_threads=1)
    ds = AVClipDataset(records, cfg, class_index=class_index, **dataset_kwargs)
    problems: dict[int, ClipProblem] = {}
    # records dropped at construction (unknown labels): find their positions in the list
    kept = iter(ds.records)
    want = next(kept, None)
    dropped = iter(ds.dropped)
    positions = []  # list position of each kept record
    for i, r in enumerate(records):
        if r is want:
            positions.append(i)
            want = next(kept, None)
        else:
            d = next(dropped)
            problems[i] = ClipProblem(i, d.path, d.kind, d.reason)
    threads = torch.get_num_threads()
    if workers:
        torch.set_num_threads(1)  # workers fork with this setting
    try:
        loader = DataLoader(
            _Probe(ds),
            batch_size=1,
            num_workers=workers,
            collate_fn=_first,
            multiprocessing_context="fork" if workers and _can_fork() else None,
        )
        bar = tqdm(
            loader,
            total=len(ds),
            desc=desc,
            unit="clip",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        bad: collections.Counter = collections.Counter()
        for k, res in enumerate(bar):
            if res is not None:
                i = positions[k]
                problems[i] = ClipProblem(i, records[i].path, res[0], res[1])
                bad[res[0]] += 1
                bar.set_postfix_str(", ".join(f"{n} {c}" for c, n in sorted(bad.items())))
        bar.close()
    finally:
        torch.set_num_threads(threads)
    return [problems[i] for i in sorted(problems)]


def summarize(problems: Sequence[ClipProblem], total: int) -> dict:
    """{"clips", "unusable", "per_kind"} of one list."""
    return {
        "clips": total,
        "unusable": len(problems),
        "per_kind": dict(sorted(collections.Counter(p.kind for p in problems).items())),
    }


def write_report(path: str | Path, splits: dict[str, tuple[int, list[ClipProblem]]]) -> Path:
    """The report of :func:`check_clips` over several splits: ``.json`` (per-split
    summary and the unusable clips) or ``.csv`` (one row per unusable clip:
    ``split,index,path,kind,reason``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "index", "path", "kind", "reason"])
            for split, (_, probs) in splits.items():
                for p in probs:
                    w.writerow([split, p.index, p.path, p.kind, p.reason])
    else:
        out = {
            "splits": {s: summarize(probs, n) for s, (n, probs) in splits.items()},
            "unusable": [
                {"split": s, **asdict(p)} for s, (_, probs) in splits.items() for p in probs
            ],
        }
        path.write_text(json.dumps(out, indent=1) + "\n")
    return path
