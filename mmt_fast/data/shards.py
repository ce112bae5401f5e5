"""WebDataset-style tar shards: packing a manifest, reading samples, streaming for training.

Layout (readable by the ``webdataset`` package and by ``tar``): ``out_dir`` holds
``index.json`` and the set of shards it names, ``set-<time>-<random>/shard-000000.tar``,
``shard-000001.tar``, ... Each sample
is a run of tar members sharing a key (``00000042``, no dots) with one member
per part, named ``<key>.<ext>``:

| member | content |
|---|---|
| ``<key>.<video ext>`` (``mp4``, ``mkv``, ...) | the clip's media file, byte for byte |
| ``<key>.wav`` / ``<key>.flac`` | its audio sidecar (``<stem>.wav`` or ``<stem>.flac`` beside it), when there is one |
| ``<key>.json`` | ``clip_id``, ``path`` (the source file, used in messages), ``label`` or ``verb``/``noun``, ``start_s``/``end_s``, ``split``, ``video``/``audio`` (member extensions) |

``index.json`` lists the shards (name, samples, bytes, SHA-256) and every sample (its
key, shard, metadata and the byte offset and size of each member inside the
shard), plus the manifest rows that could not be packed (``missing``). The
trainer reads labels, class lists and epoch sizes from the index without
opening a shard; evaluation reads single samples by offset; training streams
the shards sequentially (:class:`ShardStream`).

Shards and index are one unit. A re-pack writes a new set folder and then
replaces ``index.json`` in one ``os.replace`` (files fsynced first); the old set
is removed after the switch, a set left by a killed re-pack at the next one.
So a writer killed at any moment leaves the old index with its set or the new
index with its set. Readers check, without extra reads: every shard's size
against the index when the index is loaded (a ``stat`` per shard); each
sample's ``json`` member against the index's metadata before the sample is used
(a sample never gets another's label); and while streaming, each shard's
SHA-256 computed over the bytes as they are read (about 1 ms of one core per MB,
against about 30 ms of decoding per 1 MB clip), compared at the shard's end.
Random access reads (evaluation) check the size and the metadata only;
``ShardIndex.verify`` (used by ``mmt-fast check-data``) hashes a whole shard.
Any mismatch is a :class:`~mmt_fast.data.errors.ShardError` (a data error, exit
code 3) naming the shard.

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
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mmt_fast.data.seeding import derive_seed, run_seeded
from mmt_fast.errors import ConfigError, DataError

from .dataset import AVClipDataset, BadItem, DataConfig, Media
from .errors import BadClipError, ShardError
from .manifests import ClipRecord, read_manifest

INDEX_NAME = "index.json"
FORMAT = "mmt-fast-shards"
VERSION = 2  # 2: shards in a set folder, with sizes and SHA-256 in the index
SET_PREFIX = "set-"
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


def _kill_point(stage: str) -> None:
    """Fault injection for the tests: ``MMT_FAST_SHARDS_KILL_AT=<stage>`` SIGKILLs this
    process at that stage of :func:`write_shards` (as an OOM kill or a node loss would)."""
    if os.environ.get("MMT_FAST_SHARDS_KILL_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path, chunk: int = 4 << 20) -> str:
    """The hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _records_to_pack(manifest: Path, root: Path | None, split: str | None) -> list[ClipRecord]:
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    records = read_manifest(manifest, root, split=split)
    if not records:
        raise DataError(f"{manifest} has no clips" + (f" in split {split!r}" if split else ""))
    # a shard sample holds its whole file: segments of one long video would each copy it.
    # Rows of one clip (the same file and times, other ids or targets, as prepare's
    # manifest has when records share a cut) store it once per row, as separate files would
    cuts = collections.defaultdict(set)
    for r in records:
        cuts[r.path].add((r.start_s, r.end_s))
    shared = [p for p, c in cuts.items() if len(c) > 1]
    if shared:
        raise DataError(
            f"{manifest}: {len(shared)} files serve several segments (e.g. {shared[0]}); each "
            "row would store the whole file again. Cut the segments into clips of their own "
            "first (`mmt-fast prepare`) and pack its manifest"
        )
    return records


def _sample_parts(rec: ClipRecord) -> tuple[dict[str, bytes], dict] | str:
    """The members of ``rec``'s sample ({ext: bytes}, the json last) and its metadata, or
    why its file cannot be packed."""
    p = Path(rec.path)
    if not p.is_file():
        return "is a folder, not a media file" if p.is_dir() else "file does not exist"
    parts = {(p.suffix[1:].lower() or "bin"): p.read_bytes()}
    video_ext = next(iter(parts))
    side = _sidecar(p) if video_ext not in SIDECAR_EXTS else None
    audio_ext = None
    if side is not None:
        audio_ext = side.suffix[1:].lower()
        parts[audio_ext] = side.read_bytes()
    meta = _meta(rec, video_ext, audio_ext)
    parts["json"] = json.dumps(meta).encode()
    return parts, meta


class _ShardWriter:
    """Tars of at most ``max_bytes`` in ``folder``, written under temporary names and
    renamed when closed; ``shards`` lists the closed ones (name relative to the set's parent)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.bytes = self.n = 0

    def add(self, key: str, parts: dict[str, bytes]) -> int:
        """Write one sample; returns its shard's number."""
        size = sum(len(b) + 1024 for b in parts.values())  # + header and padding
        if self.tar is not None and self.bytes + size > self.max_bytes:
            self.close()
        if self.tar is None:
            self.tmp = self.folder / f".shard-{len(self.shards):06d}.tar.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        for ext, data in parts.items():
            _add(self.tar, f"{key}.{ext}", data)
        self.bytes += size
        self.n += 1
        return len(self.shards)

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = f"shard-{len(self.shards):06d}.tar"
        _fsync(self.tmp)
        os.replace(self.tmp, self.folder / name)
        self.shards.append({"name": f"{self.folder.name}/{name}", "num_samples": self.n})
        self.tar, self.tmp, self.bytes, self.n = None, None, 0, 0
        if len(self.shards) == 1:
            _kill_point("first_shard")

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)


def _pack(records: list[ClipRecord], writer: _ShardWriter, progress: bool):
    """Write every record's sample; (samples, missing rows)."""
    samples: list[dict] = []
    missing: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="clip", desc="shards", dynamic_ncols=True)
    try:
        for rec in records:
            if bar is not None:
                bar.update(1)
            got = _sample_parts(rec)
            if isinstance(got, str):
                missing.append(
                    {"path": rec.path, "clip_id": rec.clip_id, "split": rec.split, "reason": got}
                )
                continue
            parts, meta = got
            key = f"{len(samples):08d}"
            samples.append({"key": key, "shard": writer.add(key, parts), "meta": meta})
        writer.close()
    finally:
        if bar is not None:
            bar.close()
        writer.abort()  # an error mid-way: leave no partial shard
    return samples, missing


def _seal(root: Path, shards: list[dict], samples: list[dict]) -> None:
    """Add each shard's size and SHA-256 and each sample's member offsets (from the tars)."""
    by_shard = collections.defaultdict(list)
    for s in samples:
        by_shard[s["shard"]].append(s)
    for i, sh in enumerate(shards):
        path = root / sh["name"]
        with tarfile.open(path) as tar:  # tarfile knows where each member's data starts
            offsets = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
        sh["bytes"] = path.stat().st_size
        sh["sha256"] = file_sha256(path)
        for s in by_shard[i]:
            s["members"] = {
                n.split(".", 1)[1]: v for n, v in offsets.items() if n.split(".", 1)[0] == s["key"]
            }


def _live_set(out_dir: Path) -> str | None:
    """The set folder the current index names (None: no readable index)."""
    try:
        return json.loads((out_dir / INDEX_NAME).read_text()).get("set")
    except (OSError, ValueError, AttributeError):
        return None


def _remove_stale(out_dir: Path, keep: str | None, loose: bool) -> None:
    """Remove every set but ``keep`` (killed re-packs, replaced sets) and, with ``loose``
    (after a switch), the shards of a version-1 index at the top level."""
    for p in out_dir.glob(SET_PREFIX + "*"):
        if p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    if loose:
        for p in [*out_dir.glob("shard-*.tar"), *out_dir.glob(".shard-*.tar.tmp")]:
            p.unlink(missing_ok=True)


def _switch(out_dir: Path, index: dict) -> Path:
    """Make ``index`` (naming its set) the live one in one ``os.replace``."""
    path, tmp = out_dir / INDEX_NAME, out_dir / f".{INDEX_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index) + "\n")
    _fsync(tmp)
    _kill_point("index_written")
    os.replace(tmp, path)  # the switch: readers see the old set or the new one
    _fsync(out_dir)
    _kill_point("switched")
    return path


def write_shards(
    manifest: Path,
    out_dir: Path,
    *,
    root: Path | None = None,
    split: str | None = None,
    max_shard_bytes: int = 256 << 20,
    progress: bool = True,
) -> Path:
    """Pack a plain manifest's clips into a new set of tar shards and switch ``out_dir``'s
    ``index.json`` to it; returns the index path.

    Args:
        manifest: a plain CSV/JSONL manifest (see :func:`read_manifest`).
        out_dir: created if needed; the set the index named before is removed once the
            new index is in place.
        root: folder the manifest's relative paths start from (default: its folder).
        split: pack only the rows of this ``split`` (default: all, each keeps its split).
        max_shard_bytes: a shard is closed before it would grow past this size
            (a single larger sample gets a shard of its own).
        progress: a tqdm bar per clip.

    A row whose file is missing is not packed; it is listed under ``missing`` in
    the index (path, reason) and printed, and the trainer counts it as
    ``missing_file`` like the folder path does. The shards go to a new folder
    ``set-<time>-<random>/``, each fsynced under its final name before the index
    naming them (with sizes and SHA-256) replaces the old one in one ``os.replace``:
    a writer killed at any moment leaves the old set and index, or the new ones
    (one writer per ``out_dir`` at a time).
    """
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes}; expected > 0")
    manifest, out_dir = Path(manifest), Path(out_dir)
    records = _records_to_pack(manifest, root, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir, _live_set(out_dir), loose=False)  # sets of killed re-packs
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    folder = out_dir / f"{SET_PREFIX}{stamp}-{secrets.token_hex(4)}"
    folder.mkdir()
    writer = _ShardWriter(folder, max_shard_bytes)
    try:
        samples, missing = _pack(records, writer, progress)
        if not samples:
            raise DataError(
                f"{manifest}: none of its {len(records)} files exist (first: {missing[0]})"
            )
        _seal(out_dir, writer.shards, samples)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _fsync(folder)
    _kill_point("shards_written")
    index = {
        "format": FORMAT,
        "version": VERSION,
        "set": folder.name,
        "manifest": str(manifest),
        "split": split,
        "shards": writer.shards,
        "samples": samples,
        "missing": missing,
    }
    path = _switch(out_dir, index)
    _remove_stale(out_dir, folder.name, loose=True)
    total = sum(s["bytes"] for s in writer.shards)
    msg = (
        f"wrote {len(samples)} clips in {len(writer.shards)} shards ({total / 2**20:.1f} MiB) "
        f"to {folder}"
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
    split: str | None = None  # the split packed (None: every row, each with its own split)

    @classmethod
    def load(cls, path: str | os.PathLike, check_sizes: bool = True) -> ShardIndex:
        """Read ``path`` (the index file, or the folder holding ``index.json``) and check
        that every shard it names is there with the size it records (one ``stat`` each;
        ``check_sizes=False``: not yet, for a caller that reports each shard)."""
        p = Path(path)
        if p.is_dir():
            p = p / INDEX_NAME
        if not p.is_file():
            raise DataError(f"shard index {p} does not exist (write it with write_shards)")
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"shard index {p} cannot be read: {e}") from e
        if isinstance(d, dict) and d.get("format") == FORMAT and d.get("version") == 1:
            raise DataError(
                f"{p} is a version-1 shard index (no shard sizes or hashes, nothing ties it to "
                "its shards): pack the shards again (`mmt-fast prepare --shards` or write_shards)"
            )
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
            raise DataError(f"{p} is not an {FORMAT} index of version {VERSION}")
        index = cls(p.parent, d["shards"], d["samples"], d.get("missing", []), d.get("split"))
        for i in range(len(index.shards) if check_sizes else 0):
            index.check_size(i)
        return index

    def check_size(self, i: int) -> None:
        """ShardError unless shard ``i`` exists with the size the index records."""
        path, want = self.shard_path(i), self.shards[i]["bytes"]
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ShardError(f"shard {path} named by {self.root / INDEX_NAME}: {e}") from e
        if size != want:
            raise ShardError(
                f"shard {path} holds {size} bytes, its index {self.root / INDEX_NAME} says "
                f"{want} (truncated, or replaced outside write_shards): pack the shards again"
            )

    def verify(self, i: int) -> None:
        """ShardError unless shard ``i``'s size and SHA-256 are the index's (reads the whole
        file: about 1 GB/s of one core; a verified shard is not hashed again in this process)."""
        self.check_size(i)
        path = self.shard_path(i)
        key = (str(path), self.shards[i]["sha256"])
        if key in _VERIFIED:
            return
        if file_sha256(path) != self.shards[i]["sha256"]:
            raise ShardError(
                f"shard {path}: its SHA-256 is not the one in {self.root / INDEX_NAME} "
                "(damaged, or replaced outside write_shards): pack the shards again"
            )
        _VERIFIED.add(key)

    def has_splits(self) -> bool:
        """Whether any sample carries a split name (else every split selects all)."""
        return any(s["meta"].get("split") for s in self.samples)

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
        if split is None or not self.has_splits():
            return list(range(len(self.samples)))
        return [i for i, s in enumerate(self.samples) if s["meta"].get("split") == split]

    def read_sample(self, i: int) -> dict[str, bytes]:
        """Every member of sample ``i`` ({ext: bytes}), read by offset (random access);
        ShardError when its ``json`` member is not the index's sample."""
        s = self.samples[i]
        out = {}
        with open(self.shard_path(s["shard"]), "rb") as f:
            for ext, (off, size) in s["members"].items():
                f.seek(off)
                out[ext] = f.read(size)
        self.check_member(i, out)
        return out

    def check_member(self, i: int, parts: dict[str, bytes]) -> None:
        """ShardError unless ``parts["json"]`` (the metadata stored beside the media) is
        sample ``i``'s metadata in the index: a sample never gets another's label."""
        s = self.samples[i]
        try:
            stored = json.loads(parts["json"])
        except (KeyError, ValueError) as e:
            stored = f"unreadable ({type(e).__name__})"
        if stored != s["meta"]:
            raise ShardError(
                f"shard {self.shard_path(s['shard'])}: sample {s['key']} is not the one its "
                f"index {self.root / INDEX_NAME} names (clip {s['meta'].get('clip_id')!r}; the "
                "shard's metadata: "
                f"{stored.get('clip_id') if isinstance(stored, dict) else stored!r}): "
                "pack the shards again"
            )


_VERIFIED: set[tuple[str, str]] = set()  # (shard path, sha256) hashed by this process


class _HashingReader(io.RawIOBase):
    """A read-only stream over ``f`` that hashes every byte read (for tarfile's ``r|``)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.sha.update(memoryview(b)[:n])
        return n

    def finish(self) -> str:
        """Hash the rest of the file (tar padding) and return the hex digest."""
        while block := self.f.read(1 << 20):
            self.sha.update(block)
        return self.sha.hexdigest()


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
    ``sample_of[i]`` is the index position of item ``i``. ``records``: the clips to
    serve, each a sample of the split (``ShardIndex.record``), in their order
    (default: every sample of the split); a record that is not one is a DataError.
    """

    def __init__(
        self,
        index: ShardIndex | str | os.PathLike,
        split: str | None,
        config: DataConfig,
        records: list[ClipRecord] | None = None,
        **dataset_kw,
    ) -> None:
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index)
        positions = self.index.select(split)
        if records is not None:
            positions = self._positions_of(records, positions, split)
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

    def _positions_of(self, records: list[ClipRecord], positions: list[int], split) -> list[int]:
        free = collections.defaultdict(list)  # identical rows (one clip, packed twice) in order
        for p in positions:
            free[_record_key(self.index.record(p))].append(p)
        out = []
        for r in records:
            todo = free.get(_record_key(r))
            if not todo:
                raise DataError(
                    f"{r.path} (clip {r.clip_id!r}) is not a sample of split {split!r} of "
                    f"{self.index.root / INDEX_NAME}"
                )
            out.append(todo.pop(0))
        return out

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict | BadItem:
        p = self.sample_of[i]
        try:
            parts = self.index.read_sample(p)
        except OSError as e:  # as the stream does: a shard that cannot be read stops the run
            path = self.index.shard_path(self.index.samples[p]["shard"])
            raise ShardError(f"shard {path} cannot be read: {e}") from e
        return self.load_parts(i, parts)

    def name_of(self, i: int) -> str:
        """Item ``i`` as messages name it: ``<shard file>:<sample key>``."""
        s = self.index.samples[self.sample_of[i]]
        return f"{self.index.shard_path(s['shard'])}:{s['key']}"

    def load_parts(self, i: int, parts: dict[str, bytes]) -> dict | BadItem:
        """Item ``i`` from its members' bytes (``parts``), with the base's bad-clip handling;
        a bad clip is named by its shard and key, the reason ends with its source file."""
        meta = self.index.samples[self.sample_of[i]]["meta"]
        try:
            try:
                item = self.base.load(i, _media(meta, parts))
            except BadClipError as e:
                if self.base.config.on_error == "raise":
                    raise
                self.base.skip_counts[e.kind] += 1
                item = BadItem(i, e.path, e.kind, e.reason)
        except BadClipError as e:  # data.on_error: raise
            raise BadClipError(
                self.name_of(i), f"{e.reason} (packed from {meta['path']})", e.kind
            ) from e
        if isinstance(item, BadItem):
            return item._replace(
                path=self.name_of(i), reason=f"{item.reason} (packed from {meta['path']})"
            )
        return item

    def __getattr__(self, name: str):
        if name in ("base", "index"):
            raise AttributeError(name)
        return getattr(self.base, name)


def _record_key(r: ClipRecord) -> tuple:
    return (r.path, r.clip_id, r.label, r.verb, r.noun, r.start_s, r.end_s)


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
            raise ConfigError(
                f"shuffle_buffer={shuffle_buffer} and batch_size={batch_size}: both must be >= 1"
            )
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
        """(item, members) of ``shards`` read sequentially; each sample's metadata is
        checked against the index before it is used, each shard's size before it is opened
        and its SHA-256 (computed while reading) at its end: a ShardError names the file."""
        index = self.clips.index
        for sh in shards:
            wanted = dict((k, i) for i, k in self.shard_items[sh])
            path = index.shard_path(sh)
            index.check_size(sh)
            with open(path, "rb") as f:
                reader = _HashingReader(f)
                try:
                    for key, parts in iter_tar(reader):
                        if key in wanted:
                            item = wanted.pop(key)
                            index.check_member(self.clips.sample_of[item], parts)
                            yield item, parts
                    digest = reader.finish()
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise ShardError(f"shard {path} cannot be read: {e}") from e
            if digest != index.shards[sh]["sha256"]:
                raise ShardError(
                    f"shard {path}: its SHA-256 is not the one in {index.root / INDEX_NAME} "
                    "(damaged, or replaced outside write_shards): pack the shards again"
                )
            if wanted:
                raise ShardError(
                    f"shard {path} lacks {len(wanted)} sample(s) its index names "
                    f"(first key {next(iter(wanted))})"
                )

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
            raise ConfigError(
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
            yield run_seeded(s, self.clips.load_parts, item, parts)
