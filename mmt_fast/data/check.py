"""Find unusable clips before training: open and test-decode every clip of a list.

:func:`check_clips` runs each clip through the dataset's own loading code
(:class:`~mmt_fast.data.dataset.AVClipDataset` in test mode with two views: the
header, the first and the last sampling window of the video, the audio under
those windows), in parallel worker processes, and returns one
:class:`ClipProblem` per unusable clip with the bad-clip ``kind`` of
``errors.py`` (``missing_file``, ``corrupt_file``, ``no_audio``, ...). The
decoding code is the loader's; the training transforms (random crops of other
windows) are not run, so a clip whose first and last windows decode can in
principle fail in a middle one. Used by ``mmt-fast check-data``
(:mod:`mmt_fast.commands.check_data`) and reusable by data preparation.

:func:`check_shards` does the same for ``data.format: webdataset`` from the
bytes training reads: the shards (each one's size and SHA-256 against its
index, then every sample decoded from its members), not the clip files they
were packed from.
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


def _probe_all(ds, workers: int, progress: bool, desc: str) -> dict[int, tuple[str, str]]:
    """{item: (kind, reason)} of the unusable items of ``ds`` (loaded in ``workers``
    processes; no tensors cross them)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    found: dict[int, tuple[str, str]] = {}
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
                found[k] = res
                bad[res[0]] += 1
                bar.set_postfix_str(", ".join(f"{n} {c}" for c, n in sorted(bad.items())))
        bar.close()
    finally:
        torch.set_num_threads(threads)
    return found


def _test_config(config: DataConfig) -> DataConfig:
    return replace(config, mode="test", num_views=2, on_error="skip", decode_threads=1)


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
    records = list(records)
    ds = AVClipDataset(records, _test_config(config), class_index=class_index, **dataset_kwargs)
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
    for k, (kind, reason) in _probe_all(ds, workers, progress, desc).items():
        i = positions[k]
        problems[i] = ClipProblem(i, records[i].path, kind, reason)
    return [problems[i] for i in sorted(problems)]


def check_shards(
    index_path: str | Path,
    split: str | None,
    config: DataConfig,
    workers: int = 4,
    progress: bool = True,
    desc: str = "check",
    **dataset_kwargs,
) -> tuple[int, list[ClipProblem]]:
    """What training reads from shards: every shard's size and SHA-256 against the index,
    then every sample of ``split`` decoded from its shard's bytes as the loader decodes it
    (test mode, first and last window). Returns (clips in the split, problems); a damaged
    shard makes each of its samples a ``corrupt_file`` problem naming the shard, and the
    rows missing at packing time are ``missing_file``. ``index`` positions are the split's
    sample order in the index."""
    from tqdm import tqdm

    from .errors import ShardError
    from .shards import ShardClips, ShardIndex

    index = ShardIndex.load(index_path, check_sizes=False)
    positions = index.select(split)
    damaged: dict[int, str] = {}
    for sh in tqdm(sorted({index.samples[p]["shard"] for p in positions}), desc=f"{desc} shards",
                   unit="shard", disable=not progress, file=sys.stderr, dynamic_ncols=True):  # fmt: skip
        try:
            index.verify(sh)
        except ShardError as e:
            damaged[sh] = str(e)
    problems = [
        ClipProblem(k, str(index.shard_path(index.samples[p]["shard"])), "corrupt_file",
                    damaged[index.samples[p]["shard"]])
        for k, p in enumerate(positions) if index.samples[p]["shard"] in damaged
    ]  # fmt: skip
    intact = replace(index, samples=[s for s in index.samples if s["shard"] not in damaged])
    clips = ShardClips(intact, split, _test_config(config), **dataset_kwargs)
    order = {p: k for k, p in enumerate(positions)}
    at = {id(s): i for i, s in enumerate(index.samples)}
    for k, (kind, reason) in _probe_all(clips, workers, progress, desc).items():
        pos = at[id(intact.samples[clips.sample_of[k]])]
        problems.append(ClipProblem(order[pos], clips.name_of(k), kind, reason))
    for d in clips.dropped:  # rows missing at packing time, unknown labels
        problems.append(ClipProblem(-1, d.path, d.kind, d.reason))
    has_split = index.has_splits()  # rows missing at packing time count as clips too
    n_missing = sum(
        1 for m in index.missing if split is None or not has_split or m.get("split") == split
    )
    return len(positions) + n_missing, sorted(problems, key=lambda q: q.index)


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
