"""WebDataset-style tar shards: packing a manifest, reading samples, streaming for training.

Layout (readable by the ``webdataset`` package and by ``tar``): ``out_dir`` holds
``shard-000000.tar``, ``shard-000001.tar``, ... and ``index.json``. Each sample
is a run of tar members sharing a key (``00000042``, no dots) with one member
per part, named ``<key>.<ext>``:

| member | content |
|---|---|
| ``<key>.<video ext>`` (``mp4``, ``mkv``, ...) | the clip's media file, byte for byte |
| ``<key>.wav`` / ``<key>.flac`` | its audio sidecar (``<stem>.wav`` or ``<stem>.flac`` beside it), when there is one |
| ``<key>.json`` | ``clip_id``, ``path`` (the source file, used in messages), ``label`` or ``verb``/``noun``, ``start_s``/``end_s``, ``split``, ``video``/``audio`` (member extensions) |

``index.json`` lists the shards (name, samples, bytes) and every sample (its
key, shard, metadata and the byte offset and size of each member inside the
shard), plus the manifest rows that could not be packed (``missing``). The
trainer reads labels, class lists and epoch sizes from the index without
opening a shard; evaluation reads single samples by offset; training streams
the shards sequentially (:class:`ShardStream`).

Decoding works from the bytes in memory (decord, PyAV and soundfile all read
from ``io.BytesIO``); no temporary files are written.

Streaming (training). Why a small reader of our own rather than the
``webdataset`` package: exact resume needs the order of one epoch to be a pure
function of ``(seed, epoch, rank, worker)`` and a restarted worker to skip
exactly the samples it had delivered, and the epoch's length must be known up
front so every DDP rank runs the same number of steps; with the index at hand
that is a hundred lines over :mod:`tarfile` (the format stays WebDataset's).

One epoch: the shards are permuted by ``(seed, epoch)``; with ``W`` ranks and
``N`` DataLoader workers (1 when ``num_workers=0``) there are ``S = W * N``
slots and slot ``s = rank * N + worker`` reads shards ``s, s + S, ...`` of the
permutation, each sequentially, through a shuffle buffer of ``shuffle_buffer``
samples seeded by ``(seed, epoch, s)``. Every slot yields exactly
``per_slot = floor(usable / S / batch_size) * batch_size`` samples: a slot whose
shards hold fewer starts over (a new pass with a new buffer seed), one with
more stops early, as WebDataset's nominal epochs do; so an epoch can repeat or
miss a few clips when the shards do not split evenly (write at least ``S``
shards of similar size). The DataLoader takes batch ``j`` from worker
``j mod N``, so after ``k`` batches worker ``w`` has delivered
``ceil((k - w) / N)`` of them; a resumed run's DataLoader, whose round robin
starts again at worker 0, gives worker ``w`` the part of the epoch's worker
``(w + k) mod N``, which skips the batches it had delivered (reading, not
decoding, them). Augmentation is seeded by ``(seed,
epoch, clip)`` as in the map-style path. Guarantee: resuming mid-epoch with the
same number of processes and of DataLoader workers replays the interrupted
epoch's remaining batches exactly (checked, like the process count, when the
run resumes); at an epoch boundary either may change.
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmt_fast.data.seeding import derive_seed, run_seeded
from mmt_fast.errors import DataError

from .dataset import AVClipDataset, BadItem, DataConfig, Media
from .errors import BadClipError
from .manifests import ClipRecord, read_manifest

INDEX_NAME = "index.json"
FORMAT = "mmt-fast-shards"
VERSION = 1
SIDECAR_EXTS = ("wav", "flac")


# ------------------------------------------------------------------ writing
def _sidecar(path: Path) -> Path | None:
    for ext in SIDECAR_EXTS:
        p = path.with_suffix("." + ext)
        if p != path and p.is_file():
            return p
    return None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _meta(rec: ClipRecord, video_ext: str, audio_ext: str | None) -> dict:
    meta = {"clip_id": rec.clip_id, "path": rec.path}
    for k in ("label", "verb", "noun", "start_s", "end_s", "split"):
        v = getattr(rec, k)
        if v is not None:
            meta[k] = v
    meta["video"], meta["audio"] = video_ext, audio_ext
    return meta


def write_shards(
    manifest: Path,
    out_dir: Path,
    *,
    root: Path | None = None,
    split: str | None = None,
    max_shard_bytes: int = 256 << 20,
    progress: bool = True,
) -> Path:
    """Pack a plain manifest's clips into tar shards plus ``index.json``; returns the index path.

    Args:
        manifest: a plain CSV/JSONL manifest (see :func:`read_manifest`).
        out_dir: created if needed; existing ``shard-*.tar`` files in it are replaced.
        root: folder the manifest's relative paths start from (default: its folder).
        split: pack only the rows of this ``split`` (default: all, each keeps its split).
        max_shard_bytes: a shard is closed before it would grow past this size
            (a single larger sample gets a shard of its own).
        progress: a tqdm bar per clip.

    A row whose file is missing is not packed; it is listed under ``missing`` in
    the index (path, reason) and printed, and the trainer counts it as
    ``missing_file`` like the folder path does. Shards and the index are written
    to temporary names and renamed when complete.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}; expected > 0")
    manifest, out_dir = Path(manifest), Path(out_dir)
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    records = read_manifest(manifest, root, split=split)
    if not records:
        raise DataError(f"{manifest} has no clips" + (f" in split {split!r}" if split else ""))
    shared = [p for p, n in collections.Counter(r.path for r in records).items() if n > 1]
    if shared:  # a shard sample holds its whole file: segments of one video would copy it
        raise DataError(
            f"{manifest}: {len(shared)} files serve several rows (e.g. {shared[0]}); each row "
            "would store the whole file again. Cut the segments into clips of their own first "
            "(`mmt-fast prepare`) and pack its manifest"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("shard-*.tar"):
        old.unlink()
    shards: list[dict] = []
    samples: list[dict] = []
    missing: list[dict] = []
    state: dict = {"tar": None, "tmp": None, "bytes": 0, "n": 0}

    def close() -> None:
        if state["tar"] is None:
            return
        state["tar"].close()
        name = f"shard-{len(shards):06d}.tar"
        os.replace(state["tmp"], out_dir / name)
        shards.append({"name": name, "num_samples": state["n"], "bytes": state["bytes"]})
        state.update(tar=None, tmp=None, bytes=0, n=0)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="clip", desc="shards", dynamic_ncols=True)
    try:
        for rec in records:
            if bar is not None:
                bar.update(1)
            p = Path(rec.path)
            if not p.is_file():
                why = "is a folder, not a media file" if p.is_dir() else "file does not exist"
                missing.append(
                    {"path": rec.path, "clip_id": rec.clip_id, "split": rec.split, "reason": why}
                )
                continue
            parts = {(p.suffix[1:].lower() or "bin"): p.read_bytes()}
            video_ext = next(iter(parts))
            side = _sidecar(p) if video_ext not in SIDECAR_EXTS else None
            audio_ext = None
            if side is not None:
                audio_ext = side.suffix[1:].lower()
                parts[audio_ext] = side.read_bytes()
            key = f"{len(samples):08d}"
            meta = _meta(rec, video_ext, audio_ext)
            parts["json"] = json.dumps(meta).encode()
            size = sum(len(b) + 1024 for b in parts.values())  # + header and padding
            if state["tar"] is not None and state["bytes"] + size > max_shard_bytes:
                close()
            if state["tar"] is None:
                state["tmp"] = out_dir / f".shard-{len(shards):06d}.tar.tmp"
                state["tar"] = tarfile.open(state["tmp"], "w", format=tarfile.USTAR_FORMAT)
            for ext, data in parts.items():
                _add(state["tar"], f"{key}.{ext}", data)
            state["bytes"] += size
            state["n"] += 1
            samples.append({"key": key, "shard": len(shards), "meta": meta})
        close()
    finally:
        if bar is not None:
            bar.close()
        if state["tar"] is not None:  # an error mid-way: leave no partial shard
            state["tar"].close()
            state["tmp"].unlink(missing_ok=True)
    if not samples:
        raise DataError(f"{manifest}: none of its {len(records)} files exist (first: {missing[0]})")
    # member offsets, from the finished tars (tarfile knows where each member's data starts)
    for i, sh in enumerate(shards):
        with tarfile.open(out_dir / sh["name"]) as tar:
            offsets = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
        sh["bytes"] = (out_dir / sh["name"]).stat().st_size
        for s in samples:
            if s["shard"] == i:
                s["members"] = {
                    n.split(".", 1)[1]: v
                    for n, v in offsets.items()
                    if n.split(".", 1)[0] == s["key"]
                }
    index = {
        "format": FORMAT,
        "version": VERSION,
        "manifest": str(manifest),
        "split": split,
        "shards": shards,
        "samples": samples,
        "missing": missing,
    }
    path = out_dir / INDEX_NAME
    tmp = out_dir / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index) + "\n")
    os.replace(tmp, path)
    total = sum(s["bytes"] for s in shards)
    msg = (
        f"wrote {len(samples)} clips in {len(shards)} shards ({total / 2**20:.1f} MiB) to {out_dir}"
    )
    if missing:
        msg += f"; {len(missing)} rows not packed (missing files, listed in {path.name})"
    print(f"[mmt-fast] {msg}", flush=True)
    return path


# ------------------------------------------------------------------ reading
@dataclass
class ShardIndex:
    """A parsed ``index.json``: ``root`` is its folder (shard names are relative to it)."""

    root: Path
    shards: list[dict]
    samples: list[dict]
    missing: list[dict]

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardIndex:
        """Read ``path`` (the index file, or the folder holding ``index.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / INDEX_NAME
        if not p.is_file():
            raise DataError(f"shard index {p} does not exist (write it with write_shards)")
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"shard index {p} cannot be read: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
            raise DataError(f"{p} is not an {FORMAT} index of version {VERSION}")
        return cls(p.parent, d["shards"], d["samples"], d.get("missing", []))

    def shard_path(self, i: int) -> Path:
        return self.root / self.shards[i]["name"]

    def record(self, i: int) -> ClipRecord:
        m = self.samples[i]["meta"]
        return ClipRecord(
            m["path"],
            m["clip_id"],
            label=m.get("label"),
            verb=m.get("verb"),
            noun=m.get("noun"),
            start_s=m.get("start_s"),
            end_s=m.get("end_s"),
            split=m.get("split"),
        )

    def select(self, split: str | None) -> list[int]:
        """Sample positions of ``split`` (all when None or when no sample has a split)."""
        if split is None or not any(s["meta"].get("split") for s in self.samples):
            return list(range(len(self.samples)))
        return [i for i, s in enumerate(self.samples) if s["meta"].get("split") == split]

    def read_sample(self, i: int) -> dict[str, bytes]:
        """Every member of sample ``i`` ({ext: bytes}), read by offset (random access)."""
        s = self.samples[i]
        out = {}
        with open(self.shard_path(s["shard"]), "rb") as f:
            for ext, (off, size) in s["members"].items():
                f.seek(off)
                out[ext] = f.read(size)
        return out


def iter_tar(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a tar read sequentially from ``fileobj``
    (any readable stream: a file, a pipe, an HTTP response); members of one sample
    are consecutive, as WebDataset requires."""
    key, parts = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            f = tar.extractfile(m)
            parts[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, parts


# ------------------------------------------------------------------ datasets
def _media(meta: dict, parts: dict[str, bytes]) -> Media:
    video = meta.get("video")
    if video not in parts:
        raise BadClipError(meta["path"], f"shard sample has no {video!r} member", "corrupt_file")
    side = meta.get("audio")
    return Media(parts[video], (side, parts[side]) if side and side in parts else None)


class ShardClips(Dataset):
    """Map-style clips of one split of a shard index (evaluation, validation, tests):
    ``clips[i]`` reads sample ``i``'s members by offset and decodes them from memory.

    Items, bad-clip handling and attributes (``records``, ``dropped``,
    ``skip_counts``, ``config``, ...) are those of the wrapped
    :class:`AVClipDataset` (``self.base``); rows that were missing when the shards
    were written are in ``dropped`` and ``skip_counts`` as ``missing_file``.
    ``sample_of[i]`` is the index position of item ``i``.
    """

    def __init__(
        self,
        index: ShardIndex | str | os.PathLike,
        split: str | None,
        config: DataConfig,
        **dataset_kw,
    ) -> None:
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index)
        positions = self.index.select(split)
        records = [self.index.record(p) for p in positions]
        self.base = AVClipDataset(records, config, **dataset_kw)
        self.base.in_memory = True  # paths only name the clips: no file checks
        pos_of = {id(r): p for r, p in zip(records, positions, strict=True)}
        self.sample_of = [pos_of[id(r)] for r in self.base.records]
        has_split = any(s["meta"].get("split") for s in self.index.samples)
        for m in self.index.missing:
            if split is None or not has_split or m.get("split") == split:
                self.base.dropped.append(BadItem(-1, m["path"], "missing_file", m["reason"]))
                self.base.skip_counts["missing_file"] += 1

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict | BadItem:
        p = self.sample_of[i]
        try:
            parts = self.index.read_sample(p)
        except OSError as e:
            return self.load_parts(i, None, e)
        return self.load_parts(i, parts)

    def load_parts(
        self, i: int, parts: dict[str, bytes] | None, error: OSError | None = None
    ) -> dict | BadItem:
        """Item ``i`` from its members' bytes (``parts``), with the base's bad-clip handling."""
        meta = self.index.samples[self.sample_of[i]]["meta"]
        try:
            if parts is None:
                raise BadClipError(meta["path"], f"cannot read its shard: {error}", "corrupt_file")
            media = _media(meta, parts)
        except BadClipError as e:
            if self.base.config.on_error == "raise":
                raise
            self.base.skip_counts[e.kind] += 1
            return BadItem(i, e.path, e.kind, e.reason)
        return self.base.load(i, media)

    def __getattr__(self, name: str):
        if name in ("base", "index"):
            raise AttributeError(name)
        return getattr(self.base, name)


def _buffered(items: Iterator, rng: random.Random, size: int) -> Iterator:
    """A shuffle buffer: fill to ``size``, then emit a random element per new one; drain randomly."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class ShardStream(IterableDataset):
    """Training clips streamed from the shards (see the module docstring for the order,
    the epoch length and the resume guarantee).

    It plays the sampler's part for the trainer: :meth:`set_epoch` (epoch, samples
    this rank has consumed), :meth:`epoch_indices` (this rank's items of the epoch
    in delivery order, from the index alone) and :meth:`state_dict`.

    Args:
        clips: the split's :class:`ShardClips` (train mode).
        seed: base seed of the shard permutation, the buffers and augmentation.
        batch_size: per-process batch size (each worker yields whole batches).
        num_workers: the DataLoader's worker count (0: the main process).
        world_size, rank: the process group.
        shuffle_buffer: samples held (as bytes) per worker for shuffling; 1 keeps shard order.
        shuffle: permute the shards per epoch.
    """

    def __init__(
        self,
        clips: ShardClips,
        seed: int,
        batch_size: int,
        num_workers: int,
        world_size: int = 1,
        rank: int = 0,
        shuffle_buffer: int = 256,
        shuffle: bool = True,
    ) -> None:
        if shuffle_buffer < 1 or batch_size < 1:
            raise ValueError("shuffle_buffer and batch_size must be >= 1")
        self.clips, self.seed, self.batch_size = clips, seed, batch_size
        self.workers = max(num_workers, 1)
        self.world_size, self.rank = world_size, rank
        self.shuffle_buffer, self.shuffle = shuffle_buffer, shuffle
        self.epoch, self.skip = 0, 0
        # usable items per shard, in shard order: (item index, sample key)
        item_of = {p: i for i, p in enumerate(clips.sample_of)}
        self.shard_items: list[list[tuple[int, str]]] = [[] for _ in clips.index.shards]
        for p, s in enumerate(clips.index.samples):
            if p in item_of:
                self.shard_items[s["shard"]].append((item_of[p], s["key"]))
        self.slots = world_size * self.workers
        n_shards = len(clips.index.shards)
        if n_shards < self.slots:
            raise DataError(
                f"{n_shards} shards cannot feed {world_size} process(es) x {self.workers} "
                "DataLoader worker(s): each needs a shard of its own. Write smaller shards "
                "(max_shard_bytes) or use fewer workers"
            )
        self.per_slot = len(clips) // self.slots // batch_size * batch_size
        if self.per_slot == 0:
            raise DataError(
                f"{len(clips)} training clips over {self.slots} stream(s) ({world_size} "
                f"process(es) x {self.workers} worker(s)) do not fill one batch of {batch_size}"
            )

    # -------------------------------------------------------------- sampler side
    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and drop this rank's first ``skip`` items (whole batches)."""
        if skip % self.batch_size:
            raise ValueError(f"skip={skip} is not a multiple of the batch size {self.batch_size}")
        self.epoch, self.skip = epoch, skip

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "skip": self.skip, "seed": self.seed, "workers": self.workers}

    @property
    def samples_per_rank(self) -> int:
        return self.per_slot * self.workers

    def _slot_shards(self, slot: int) -> list[int]:
        n = len(self.shard_items)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return order[slot :: self.slots]

    def _slot_plan(self, slot: int, read: bool) -> Iterator[tuple[int, int, dict | None]]:
        """(item, pass, members or None) of one slot's epoch; ``read``: stream the tar bytes."""
        shards = self._slot_shards(slot)
        count, pas = 0, 0
        while count < self.per_slot:
            rng = random.Random(derive_seed(self.seed, self.epoch, slot, pas, 3))
            src = self._read(shards) if read else self._keys(shards)
            emitted = 0
            for item, parts in _buffered(src, rng, self.shuffle_buffer):
                yield item, pas, parts
                emitted += 1
                count += 1
                if count == self.per_slot:
                    return
            if emitted == 0:
                raise DataError(f"shards {shards} hold no usable clip")
            pas += 1

    def _keys(self, shards: list[int]) -> Iterator[tuple[int, None]]:
        for sh in shards:
            for item, _ in self.shard_items[sh]:
                yield item, None

    def _read(self, shards: list[int]) -> Iterator[tuple[int, dict]]:
        for sh in shards:
            wanted = dict((k, i) for i, k in self.shard_items[sh])
            with open(self.clips.index.shard_path(sh), "rb") as f:
                for key, parts in iter_tar(f):
                    if key in wanted:
                        yield wanted.pop(key), parts
            for item in wanted.values():  # in the index but not in the tar: a damaged shard
                yield item, {}

    def _worker_skip(self, worker: int) -> int:
        """Items worker ``worker`` had delivered when this rank had consumed ``self.skip``."""
        k = self.skip // self.batch_size
        return max(-(-(k - worker) // self.workers), 0) * self.batch_size

    def epoch_indices(self) -> list[int]:
        """This rank's items of the epoch in delivery order (before ``skip``); batch ``j``
        comes from worker ``j mod N``."""
        per_worker = [
            [item for item, _, _ in self._slot_plan(self.rank * self.workers + w, read=False)]
            for w in range(self.workers)
        ]
        bs, out = self.batch_size, []
        for j in range(self.samples_per_rank // bs):
            w, b = j % self.workers, j // self.workers
            out += per_worker[w][b * bs : (b + 1) * bs]
        return out

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict | BadItem]:
        info = get_worker_info()
        worker, n = (0, 1) if info is None else (info.id, info.num_workers)
        if n != self.workers:
            raise RuntimeError(
                f"ShardStream planned for {self.workers} DataLoader worker(s), runs in {n}"
            )
        # a fresh DataLoader starts its round robin at worker 0: after k batches, worker
        # w plays the part of the epoch's worker (w + k) mod N, whose turn comes next
        role = (worker + self.skip // self.batch_size) % n
        slot = self.rank * self.workers + role
        skip = self._worker_skip(role)
        for k, (item, pas, parts) in enumerate(self._slot_plan(slot, read=True)):
            if k < skip:
                continue
            s = derive_seed(self.seed, self.epoch, item)
            if pas:  # a clip seen again in the same epoch gets new augmentation
                s = derive_seed(self.seed, self.epoch, item, pas)
            yield run_seeded(s, self.clips.load_parts, item, parts if parts else {})
