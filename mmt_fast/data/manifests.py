"""Manifest readers: official dataset lists -> :class:`ClipRecord` lists.

All readers return ``list[ClipRecord]``; paths are resolved to files on disk by
the rules below (the first candidate that exists wins; when none exists the
first candidate is kept, and the dataset reports it as ``missing_file``).

VGGSound (``vggsound.csv``, no header; columns ``youtube_id, start_seconds,
label, split``; labels may be quoted and contain commas). Clip id
``f"{youtube_id}_{start_seconds:06d}"`` (VGGSound's own file names, e.g.
``---g-f_I2yQ_000001``). Files (already trimmed 10 s clips, decoded whole):

1. ``<root>/<clip_id>.mp4``
2. ``<root>/<split>/<clip_id>.mp4``

Kinetics-Sounds: a CSV of ``(path or youtube id, label)`` rows, with or without
a header, or the official Kinetics CSV (header ``label, youtube_id, time_start,
time_end, split``). A first column that ends in a video extension or contains a
``/`` is a path (relative to ``root``); otherwise it is a YouTube id and the file
is the first of ``<root>/<d>/<stem>.mp4`` for ``d`` in (``.``, ``<label>``,
``<label with _ for spaces>``, ``<split>/<label>``, ``<split>/<label with _>``,
``<split>``) and ``stem`` in (``<id>``, ``<id>_<time_start:06d>_<time_end:06d>``
when the times are known). Rows whose label is not in ``classes`` are bad data
(``unknown_label``): raised or skipped according to ``on_error``.

Epic-Kitchens-100 (``EPIC_100_train.csv`` / ``EPIC_100_validation.csv``): one
record per narration segment ``[start_timestamp, stop_timestamp)`` (``HH:MM:SS.ff``)
in the long video, file ``<root>/<participant_id>/videos/<video_id>.MP4``, else
``<root>/<video_id>.mp4`` (also the other-case extension of each). Targets:
``verb_class`` (97 classes) and ``noun_class`` (300 classes), as ints; clip id =
``narration_id``.

Plain manifests (``.csv`` with a header, or ``.jsonl``/``.json`` one object per
line): ``path`` and either ``label`` or ``verb`` and ``noun``; optional
``start_s``/``end_s`` (seconds; ``start``/``end`` accepted), ``split``,
``clip_id`` (default: the file stem, plus the start time when given). Relative
paths are resolved against ``root`` (default: the manifest's folder).

Every CSV reader accepts a UTF-8 byte-order mark (spreadsheet exports), CRLF
line ends and spaces after the commas. A row that cannot be used as written
(a missing column, a time that is not a finite number >= 0, ``end <= start``)
raises :class:`~mmt_fast.errors.DataError` naming the file and the line.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mmt_fast.errors import ConfigError, DataError

from .errors import BadClipError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")

# Kinetics-Sounds. Source followed: the 34 classes listed by Arandjelovic &
# Zisserman, "Look, Listen and Learn" (ICCV 2017), written with their
# Kinetics-400 class names ("blowing out" -> "blowing out candles", "dribbling
# ball" -> "dribbling basketball", "mowing the lawn by pushing lawnmower" ->
# "mowing lawn"); "stomping" and "patting" have no Kinetics-400 class and are
# dropped, which gives the 32 classes used by later works. Check this list
# against the split files you use; it is configurable everywhere.
KINETICS_SOUNDS_CLASSES: tuple[str, ...] = (
    "blowing nose",
    "blowing out candles",
    "bowling",
    "chopping wood",
    "dribbling basketball",
    "fingerpicking",
    "laughing",
    "mowing lawn",
    "playing accordion",
    "playing bagpipes",
    "playing bass guitar",
    "playing clarinet",
    "playing drums",
    "playing guitar",
    "playing harmonica",
    "playing keyboard",
    "playing organ",
    "playing piano",
    "playing saxophone",
    "playing trombone",
    "playing trumpet",
    "playing violin",
    "playing xylophone",
    "ripping paper",
    "shoveling snow",
    "shuffling cards",
    "singing",
    "tap dancing",
    "tapping guitar",
    "tapping pen",
    "tickling",
    "typing",
)

EPIC_NUM_VERBS = 97
EPIC_NUM_NOUNS = 300


@dataclass
class ClipRecord:
    """One clip: a file, or a segment ``[start_s, end_s)`` of a file, and its target.

    Exactly one of ``label`` (class name) or ``verb``/``noun`` (int class ids or
    names) is set. ``start_s``/``end_s`` are seconds from the start of the file;
    ``None`` means the start / end of the file.
    """

    path: str
    clip_id: str
    label: str | None = None
    verb: int | str | None = None
    noun: int | str | None = None
    start_s: float | None = None
    end_s: float | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ClassIndex:
    """Label names <-> stable integer indices, saved with checkpoints as JSON.

    ``ClassIndex(names)`` keeps the given order; :meth:`from_labels` sorts the
    unique labels (numerically when every label is an integer string).
    """

    def __init__(self, names: Sequence[str]) -> None:
        names = [str(n) for n in names]
        dup = [n for n, c in collections.Counter(names).items() if c > 1]
        if dup:
            raise DataError(f"duplicate class names: {dup[:5]}")
        self._names = names
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def from_labels(cls, labels: Iterable[str | int]) -> ClassIndex:
        uniq = {str(x) for x in labels if x is not None}
        if all(_is_int(x) for x in uniq):
            return cls(sorted(uniq, key=int))
        return cls(sorted(uniq))

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return str(name) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassIndex) and self._names == other._names

    def __repr__(self) -> str:
        return f"ClassIndex({len(self)} classes: {self._names[:4]}{'...' if len(self) > 4 else ''})"

    def index(self, name: str | int) -> int:
        """Index of ``name``; raises KeyError naming the label."""
        try:
            return self._index[str(name)]
        except KeyError:
            raise KeyError(f"label {name!r} not in the class list ({len(self)} classes)") from None

    def name(self, index: int) -> str:
        return self._names[index]

    def to_dict(self) -> dict:
        return {"names": list(self._names)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> ClassIndex:
        return cls(d["names"])

    @classmethod
    def from_json(cls, text: str) -> ClassIndex:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassIndex:
        return cls.from_json(Path(path).read_text())


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _first_existing(candidates: Sequence[Path]) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def parse_timestamp(ts: str | float) -> float:
    """``"HH:MM:SS.ff"`` (also ``MM:SS.ff`` or plain seconds) -> seconds."""
    if isinstance(ts, int | float):
        return float(ts)
    parts = str(ts).strip().split(":")
    if len(parts) > 3:
        raise ValueError(f"bad timestamp {ts!r}")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60.0 + float(p)
    return seconds


# ---------------------------------------------------------------- VGGSound
def vggsound_clip_id(youtube_id: str, start_seconds: int) -> str:
    return f"{youtube_id}_{int(start_seconds):06d}"


def read_vggsound(
    csv_path: str | os.PathLike, root: str | os.PathLike, split: str | None = None
) -> list[ClipRecord]:
    """Read VGGSound's ``vggsound.csv`` (no header). ``split``: keep only "train"/"test"."""
    root = Path(root)
    out = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 4:
                raise DataError(f"{csv_path}:{lineno}: expected 4 columns, got {len(row)}: {row}")
            ytid, start, label, row_split = (c.strip() for c in row)
            if not _is_int(start):
                if lineno == 1:  # tolerate a header row
                    continue
                raise DataError(f"{csv_path}:{lineno}: start_seconds {start!r} is not an int")
            if split is not None and row_split != split:
                continue
            cid = vggsound_clip_id(ytid, int(start))
            path = _first_existing([root / f"{cid}.mp4", root / row_split / f"{cid}.mp4"])
            out.append(ClipRecord(str(path), cid, label=label, split=row_split))
    return out


# ---------------------------------------------------------- Kinetics-Sounds
def _looks_like_path(s: str) -> bool:
    return "/" in s or s.lower().endswith(VIDEO_EXTENSIONS)


def read_kinetics_sounds(
    csv_path: str | os.PathLike,
    root: str | os.PathLike,
    classes: Sequence[str] | None = KINETICS_SOUNDS_CLASSES,
    on_error: str = "raise",
    split: str | None = None,
    skipped: collections.Counter | None = None,
) -> list[ClipRecord]:
    """Read a Kinetics-Sounds list (see the module docstring for formats and file rules).

    Args:
        classes: the class list; rows with other labels are ``unknown_label``
            bad data. ``None`` keeps every label.
        on_error: "raise" (BadClipError naming the file and label) or "skip"
            (drop the row, count it in ``skipped`` and log a summary).
        split: keep only rows of this split (official format only).
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(root)
    allowed = set(classes) if classes is not None else None
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f, skipinitialspace=True) if r and "".join(r).strip()]
    header = None
    if rows:
        low = [c.strip().lower() for c in rows[0]]
        if "label" in low or low[0] in ("path", "youtube_id", "id", "video", "video_id"):
            header = low
            rows = rows[1:]
    out, n_bad = [], 0
    for row in rows:
        row = [c.strip() for c in row]
        times = None
        row_split = None
        if header is not None and "youtube_id" in header and "label" in header and len(header) > 2:
            d = dict(zip(header, row))
            key, label = d["youtube_id"], d["label"]
            if "time_start" in d and "time_end" in d:
                times = (int(float(d["time_start"])), int(float(d["time_end"])))
            row_split = d.get("split")
        else:
            if len(row) < 2:
                raise DataError(f"{csv_path}: expected (path or id, label), got {row}")
            key, label = row[0], row[1]
        if split is not None and row_split != split:
            continue
        if _looks_like_path(key):
            path = Path(key) if Path(key).is_absolute() else root / key
            cid = Path(key).stem
        else:
            stems = [key]
            if times is not None:
                stems.append(f"{key}_{times[0]:06d}_{times[1]:06d}")
            dirs = [Path("."), Path(label), Path(label.replace(" ", "_"))]
            if row_split:
                dirs += [
                    Path(row_split) / label,
                    Path(row_split) / label.replace(" ", "_"),
                    Path(row_split),
                ]
            path = _first_existing([root / d / f"{s}.mp4" for d in dirs for s in stems])
            cid = stems[-1]
        if allowed is not None and label not in allowed:
            if on_error == "raise":
                raise BadClipError(
                    str(path),
                    f"label {label!r} is not in the class list ({len(allowed)} classes)",
                    "unknown_label",
                )
            n_bad += 1
            if skipped is not None:
                skipped["unknown_label"] += 1
            continue
        out.append(ClipRecord(str(path), cid, label=label, split=row_split))
    if n_bad:
        log.warning("%s: skipped %d rows with labels outside the class list", csv_path, n_bad)
    return out


# -------------------------------------------------------- Epic-Kitchens-100
def read_epic_kitchens(csv_path: str | os.PathLike, root: str | os.PathLike) -> list[ClipRecord]:
    """Read ``EPIC_100_{train,validation}.csv``: one segment record per narration."""
    root = Path(root)
    out = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for lineno, d in enumerate(_dict_rows(f), 2):
            try:
                pid, vid = d["participant_id"], d["video_id"]
                start = parse_timestamp(d["start_timestamp"])
                stop = parse_timestamp(d["stop_timestamp"])
                verb, noun = int(d["verb_class"]), int(d["noun_class"])
                _check_times(start, stop)
            except (KeyError, ValueError) as e:
                raise DataError(f"{csv_path}:{lineno}: bad Epic-Kitchens row ({e})") from e
            path = _first_existing(
                [
                    root / pid / "videos" / f"{vid}.MP4",
                    root / pid / "videos" / f"{vid}.mp4",
                    root / f"{vid}.mp4",
                    root / f"{vid}.MP4",
                ]
            )
            out.append(
                ClipRecord(
                    str(path), d["narration_id"], verb=verb, noun=noun, start_s=start, end_s=stop
                )
            )
    return out


# ------------------------------------------------------------ plain manifest
def _dict_rows(f) -> Iterable[dict]:
    """csv.DictReader with stripped keys and values (spaces after commas, CRLF)."""
    for d in csv.DictReader(f, skipinitialspace=True):
        yield {
            (k.strip() if isinstance(k, str) else k): (v.strip() if isinstance(v, str) else v)
            for k, v in d.items()
        }


def _opt_float(d: dict, *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if v is not None and str(v).strip() != "":
            try:
                return float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{k}={v!r} is not a number") from None
    return None


def _check_times(start: float | None, end: float | None) -> None:
    for name, v in (("start", start), ("end", end)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} time {v} s is not a finite number >= 0")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end time {end} s is not after the start time {start} s")


def _int_or_str(v):
    if v is None:
        return None
    s = str(v).strip()
    return int(s) if _is_int(s) else s


def read_manifest(
    path: str | os.PathLike, root: str | os.PathLike | None = None, split: str | None = None
) -> list[ClipRecord]:
    """Read a plain CSV (with header) or JSONL manifest (see module docstring)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    with open(path, newline="" if not jsonl else None, encoding="utf-8-sig") as f:
        if jsonl:
            rows = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not a JSON object ({e})") from e
        else:
            rows = [(lineno, d) for lineno, d in enumerate(_dict_rows(f), 2)]
    out = []
    for lineno, d in rows:
        where = f"{path}:{lineno}"
        if not isinstance(d, dict) or not str(d.get("path") or "").strip():
            keys = list(d) if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where}: row has no 'path' (columns: {keys})")
        if split is not None and d.get("split") != split:
            continue
        p = Path(str(d["path"]).strip())
        p = p if p.is_absolute() else root / p
        try:
            start = _opt_float(d, "start_s", "start")
            end = _opt_float(d, "end_s", "end")
            _check_times(start, end)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        cid = d.get("clip_id") or (p.stem if start is None else f"{p.stem}_{start:.3f}")
        if d.get("label") not in (None, ""):
            rec = ClipRecord(str(p), str(cid), label=str(d["label"]), start_s=start, end_s=end)
        elif d.get("verb") not in (None, "") and d.get("noun") not in (None, ""):
            rec = ClipRecord(
                str(p), str(cid), verb=_int_or_str(d["verb"]), noun=_int_or_str(d["noun"]),
                start_s=start, end_s=end,
            )  # fmt: skip
        else:
            raise DataError(f"{where}: row has neither 'label' nor 'verb' and 'noun'")
        rec.split = d.get("split") or None
        out.append(rec)
    return out
