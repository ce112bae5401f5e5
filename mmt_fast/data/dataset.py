"""``AVClipDataset``: ClipRecords -> aligned video frames and audio spectrograms.

Items (dict):

| key | shape / type | when |
|---|---|---|
| ``video`` | (3, T, S, S) float32; (V, 3, T, S, S) in test mode with V > 1 views | modalities "av"/"video" |
| ``audio`` | (1, F, Tt) float32 (F = num_mel_bins, Tt = target_length); (V, 1, F, Tt) with views | modalities "av"/"audio" |
| ``label`` | int64 scalar | single-label records |
| ``verb``, ``noun`` | int64 scalars | verb/noun records (Epic-Kitchens) |
| ``index`` | int64 scalar, position in ``dataset.records`` | always |
| ``warnings`` | tuple of str (e.g. ``("short_clip",)``) | always |

Bad data (see ``errors.py``): with ``on_error="raise"`` a :class:`BadClipError`
naming the file and the problem propagates. With ``on_error="skip"``
``__getitem__`` returns a :class:`BadItem` (index, path, kind, reason) instead
of a dict (a picklable marker rather than ``None``, so the reason survives the
trip from a DataLoader worker) and :func:`collate_clips` drops it and counts it
per kind in ``batch["skipped"]``. Labels outside the class index are found at
construction: raised, or dropped and counted in ``dataset.skip_counts``.
``dataset.skip_counts`` also counts skips in this process (complete only with
``num_workers=0``; use the batch counts otherwise).

A segment shorter than the video window repeats its last frame and is counted
as the warning ``short_clip`` (or is bad data with ``short_clip="error"``); the
audio is always zero-padded (fbank zeros) as AST does.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from mmt_fast.errors import ConfigError, DataError

from . import audio as A
from . import video as Vd
from .errors import BadClipError
from .manifests import EPIC_NUM_NOUNS, EPIC_NUM_VERBS, ClassIndex, ClipRecord

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Sampling, transform and bad-data settings of :class:`AVClipDataset`.

    Units: ``stride`` in frames between samples; ``crop_size`` in pixels;
    ``target_length`` in fbank frames (10 ms); ``freqm``/``timem`` are the
    maximum SpecAugment mask widths in bins / frames (0 disables).
    ``decoder_resize``: decode frames at the size the transform needs (see
    ``video.decode_size``; ``train_short_side`` sets the training size).
    ``audio_span``: decode only the audio the windows cover (else the whole track).
    """

    mode: str = "train"  # "train" | "test"
    modalities: str = "av"  # "av" | "audio" | "video"
    num_frames: int = 16
    stride: int = 4
    crop_size: int = 224
    num_views: int = 5  # test mode only
    train_scale: tuple[float, float] = (0.08, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    sample_rate: int = A.SAMPLE_RATE
    num_mel_bins: int = 128
    target_length: int = 1024
    audio_mean: float = A.AUDIOSET_MEAN
    audio_std: float = A.AUDIOSET_STD
    freqm: int = 48
    timem: int = 192
    audio_align: str = "shift"  # "shift" | "center", see audio.py
    on_error: str = "raise"  # "raise" | "skip"
    short_clip: str = "pad"  # "pad" (warning) | "error" (bad data)
    decode_threads: int = 1
    decoder_resize: bool = True  # decode frames at a reduced size (see video.decode_size)
    audio_span: bool = True  # decode only the audio the windows cover (False: the whole track)
    train_short_side: int | None = None  # None: round(crop_size * 320 / 224)
    device_transforms: bool = False  # items: uint8 frames + 16 kHz wave (see device_transforms.py)

    def __post_init__(self) -> None:
        checks = {
            "mode": ("train", "test"),
            "modalities": ("av", "audio", "video"),
            "audio_align": ("shift", "center"),
            "on_error": ("raise", "skip"),
            "short_clip": ("pad", "error"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"DataConfig.{name}={getattr(self, name)!r}; expected {allowed}")
        if min(self.num_frames, self.stride, self.crop_size, self.num_views) < 1:
            raise ConfigError("num_frames, stride, crop_size and num_views must be >= 1")
        if self.target_length < 1 or self.num_mel_bins < 1:
            raise ConfigError("target_length and num_mel_bins must be >= 1")

    @property
    def train(self) -> bool:
        return self.mode == "train"

    @property
    def views(self) -> int:
        return 1 if self.train else self.num_views

    @property
    def decode_short_side(self) -> int:
        """Short side (px) training frames are decoded at (when larger in the file)."""
        return self.train_short_side or round(self.crop_size * 320 / 224)

    @property
    def window_frames(self) -> int:
        return (self.num_frames - 1) * self.stride + 1


DATA_PRESETS: dict[str, DataConfig] = {
    "paper": DataConfig(),
    # tiny sizes for tests and smoke runs on the CPU
    "tiny": DataConfig(num_frames=4, stride=2, crop_size=32, target_length=128, freqm=8, timem=16),
}


def data_config(name: str = "paper", **overrides) -> DataConfig:
    """A named preset with fields overridden, e.g. ``data_config("paper", mode="test")``."""
    return replace(DATA_PRESETS[name], **overrides)


class BadItem(NamedTuple):
    """What ``__getitem__`` returns for a bad clip in skip mode."""

    index: int
    path: str
    kind: str
    reason: str


class Media(NamedTuple):
    """A clip's file in memory (e.g. read from a shard): its bytes and, when it has
    one, its audio sidecar as (extension, bytes). The record's path names it in messages."""

    data: bytes
    sidecar: tuple[str, bytes] | None = None


class AVClipDataset(Dataset):
    """Audio-video clips from :class:`ClipRecord` s (see the module docstring for items).

    Args:
        records: the clips.
        config: sampling/transform settings.
        class_index: label names -> indices for single-label records; default:
            sorted unique labels of ``records``.
        verb_index, noun_index: for records whose verb/noun are names; int
            verb/noun must lie in ``[0, num_verbs)`` / ``[0, num_nouns)``.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        config: DataConfig | None = None,
        class_index: ClassIndex | None = None,
        verb_index: ClassIndex | None = None,
        noun_index: ClassIndex | None = None,
        num_verbs: int = EPIC_NUM_VERBS,
        num_nouns: int = EPIC_NUM_NOUNS,
    ) -> None:
        self.config = config or DataConfig()
        self.skip_counts: collections.Counter = collections.Counter()
        self.warning_counts: collections.Counter = collections.Counter()
        self.dropped: list[BadItem] = []
        self.in_memory = False  # True when the media come as bytes (shards): no file checks
        records = list(records)
        kinds = {"label" if r.label is not None else "verb_noun" for r in records}
        if len(kinds) > 1:
            raise DataError("records mix single labels and verb/noun targets")
        self.target_kind = kinds.pop() if kinds else "label"
        if self.target_kind == "label" and class_index is None:
            class_index = ClassIndex.from_labels(r.label for r in records)
        self.class_index, self.verb_index, self.noun_index = class_index, verb_index, noun_index
        self.num_verbs, self.num_nouns = num_verbs, num_nouns
        self.records: list[ClipRecord] = []
        self._targets: list[dict[str, int]] = []
        for r in records:
            try:
                t = self._target(r)
            except BadClipError as e:
                if self.config.on_error == "raise":
                    raise
                self.skip_counts[e.kind] += 1
                self.dropped.append(BadItem(-1, e.path, e.kind, e.reason))
                continue
            self.records.append(r)
            self._targets.append(t)
        if self.dropped:
            log.warning(
                "dropped %d records with unknown labels, e.g. %s",
                len(self.dropped),
                self.dropped[0],
            )
        self._logged: set[str] = set()

    # ------------------------------------------------------------ targets
    def _target(self, r: ClipRecord) -> dict[str, int]:
        if self.target_kind == "label":
            if r.label not in self.class_index:
                raise BadClipError(
                    r.path,
                    f"label {r.label!r} is not in the class list ({len(self.class_index)} classes)",
                    "unknown_label",
                )
            return {"label": self.class_index.index(r.label)}
        return {
            "verb": self._vn(r, r.verb, self.verb_index, self.num_verbs, "verb"),
            "noun": self._vn(r, r.noun, self.noun_index, self.num_nouns, "noun"),
        }

    @staticmethod
    def _vn(r: ClipRecord, v, index: ClassIndex | None, n: int, what: str) -> int:
        if isinstance(v, int) and index is None:
            if 0 <= v < n:
                return v
            raise BadClipError(r.path, f"{what} class {v} outside [0, {n})", "unknown_label")
        if index is None or v not in index:
            raise BadClipError(r.path, f"{what} {v!r} is not in the {what} list", "unknown_label")
        return index.index(v)

    # ------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | BadItem:
        return self.load(index)

    def load(self, index: int, media: Media | None = None) -> dict | BadItem:
        """``self[index]``, decoding from ``media`` (bytes in memory) when given."""
        rec = self.records[index]
        try:
            return self._load(index, rec, media)
        except Exception as e:  # anything unexpected is still one bad clip
            _release_frames(e)
            err = e
            if not isinstance(e, BadClipError):
                err = BadClipError(rec.path, f"{type(e).__name__}: {e}", "decode_error")
                err.__cause__ = e
        if self.config.on_error == "raise":
            raise err
        self.skip_counts[err.kind] += 1
        if err.kind not in self._logged:
            self._logged.add(err.kind)
            log.warning("skipping bad clip: %s", err)
        return BadItem(index, err.path, err.kind, err.reason)

    def _load_audio(self, rec: ClipRecord, media: Media | None, centres) -> dict:
        """``{"audio": ...}`` of one item: the fbank of each view's window (normalised,
        SpecAugment in training), or with ``device_transforms`` the windows' samples and
        spans (``audio_span``) for the device; ``centres``: the video windows' centres
        (None: audio only)."""
        cfg = self.config
        data = media.data if media is not None else None
        if cfg.modalities == "audio" and not str(rec.path).lower().endswith(".wav"):
            if data is None and os.path.isdir(rec.path):
                raise BadClipError(rec.path, "is a folder, not a media file", "missing_file")
        for name, v in (("start", rec.start_s), ("end", rec.end_s)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise BadClipError(
                    rec.path, f"{name} {v} s is not a finite time >= 0", "bad_segment"
                )
        if media is None:
            src = A.open_audio(rec.path, cfg.sample_rate)
        else:
            src = A.open_audio(rec.path, cfg.sample_rate, media.data, media.sidecar)
        a0 = rec.start_s or 0.0
        a1 = min(rec.end_s if rec.end_s is not None else float("inf"), src.duration)
        if a1 <= a0:
            raise BadClipError(
                rec.path,
                f"segment [{a0}, {rec.end_s}) s has no audio (audio lasts {src.duration:.2f} s)",
                "bad_segment",
            )
        span = A.window_samples(cfg.target_length) / cfg.sample_rate
        if centres is not None:
            wss = [A.window_start(c, span, a0, a1, cfg.audio_align) for c in centres]
        else:
            wss = self._audio_only_starts(a0, a1, span)
        # one read covers every view (test views overlap); the rest of a long track is skipped
        sr, n_win = cfg.sample_rate, A.window_samples(cfg.target_length)
        lo, hi = round(max(min(wss), a0) * sr), round(min(max(wss) * sr + n_win, a1 * sr))
        if not cfg.audio_span:
            lo, hi = src.start_sample, src.num_samples
        src = A.preload(src, lo, hi)
        if cfg.device_transforms:  # the fbank too is computed on the device, batched
            waves = [A.window_wave(src, ws, a0, a1, cfg.target_length) for ws in wss]
            w, span = (torch.stack(t) for t in zip(*waves))
            if len(wss) == 1:
                return {"audio": w[0, None], "audio_span": span[0]}
            return {"audio": w[:, None], "audio_span": span}
        specs = []
        fbanks: dict[float, torch.Tensor] = {}  # views whose windows were clamped alike
        for ws in wss:
            if ws not in fbanks:
                fbanks[ws] = A.window_fbank(src, ws, a0, a1, cfg.target_length, cfg.num_mel_bins)
            spec = fbanks[ws].t().unsqueeze(0)  # (1, F, T); never modified in place
            if cfg.train:
                spec = A.spec_augment(spec, cfg.freqm, cfg.timem)
            specs.append(A.normalize_fbank(spec, cfg.audio_mean, cfg.audio_std).contiguous())
        return {"audio": specs[0] if len(specs) == 1 else torch.stack(specs)}

    def _load(self, index: int, rec: ClipRecord, media: Media | None = None) -> dict:
        cfg = self.config
        data = media.data if media is not None else None
        item: dict = {}
        warnings: list[str] = []
        centres = None
        if cfg.modalities in ("av", "video"):
            info, reader = Vd.open_clip(rec.path, data)  # reader: a prepared clip's packets
            size = None
            if cfg.decoder_resize:
                size = Vd.decode_size(
                    info.height, info.width, cfg.crop_size, cfg.train, cfg.decode_short_side
                )
            if reader is not None:
                vr, reader.size, reader.threads = reader, size, cfg.decode_threads
            else:
                vr = Vd.open_video(rec.path, cfg.decode_threads, size, data)
            times = Vd.frame_times(vr)
            f0, f1 = Vd.segment_frames(times, rec.start_s, rec.end_s, rec.path)
            n, L = f1 - f0, cfg.window_frames
            if n < L:
                if cfg.short_clip == "error":
                    raise BadClipError(
                        rec.path, f"segment has {n} frames, the window needs {L}", "short_clip"
                    )
                warnings.append("short_clip")
            starts = Vd.window_starts(n, L, cfg.train, cfg.views)
            # one ascending pass over the frames of every view (test views overlap and
            # share keyframes: decoding them view by view would seek back each time)
            idx = [Vd.frame_indices(f0, f1, s, cfg.num_frames, cfg.stride) for s in starts]
            decoded = Vd.decode_frames(vr, np.concatenate(idx), rec.path, data)
            views = []
            for k in range(len(starts)):
                frames = decoded[k * cfg.num_frames : (k + 1) * cfg.num_frames]
                if cfg.device_transforms:  # crop, flip, normalisation: on the device
                    views.append(frames)
                    continue
                views.append(
                    Vd.transform_frames(
                        frames,
                        cfg.crop_size,
                        cfg.train,
                        cfg.mean,
                        cfg.std,
                        cfg.train_scale,
                        cfg.train_ratio,
                        cfg.flip_prob,
                    )
                )
            item["video"] = views[0] if len(views) == 1 else torch.stack(views)
            if cfg.device_transforms:
                item["video_size"] = torch.tensor(decoded.shape[1:3], dtype=torch.int64)
            centres = [Vd.window_centre(times, f0 + s, L) for s in starts]
        if cfg.modalities in ("av", "audio"):
            item.update(self._load_audio(rec, media, centres))
        for k, v in self._targets[index].items():
            item[k] = torch.tensor(v, dtype=torch.int64)
        item["index"] = torch.tensor(index, dtype=torch.int64)
        item["warnings"] = tuple(warnings)
        if warnings:
            self.warning_counts.update(warnings)
        return item

    def _audio_only_starts(self, a0: float, a1: float, span: float) -> list[float]:
        """Audio-only windows: inside the clip when it is longer than the window, else at its start."""
        slack = (a1 - a0) - span
        if slack <= 0:
            return [a0] * self.config.views
        if self.config.train:
            return [a0 + slack * float(torch.rand(()))]
        v = self.config.views
        return [a0 + slack * (0.5 if v == 1 else k / (v - 1)) for k in range(v)]


def unusable_clips(dataset: AVClipDataset) -> list[BadItem]:
    """Clips known to be unusable without decoding: dropped at construction (labels
    outside the class list) and files that are missing or are folders (one stat per
    unique path)."""
    bad = list(dataset.dropped)
    if dataset.in_memory:
        return bad
    status: dict[str, str | None] = {}
    for i, r in enumerate(dataset.records):
        if r.path not in status:
            p = Path(r.path)
            audio_only = dataset.config.modalities == "audio"
            status[r.path] = (
                None
                if p.is_file() or (audio_only and A.sidecar_wav(r.path) is not None)
                else "is a folder, not a media file"
                if p.is_dir()
                else "file does not exist"
            )
        if status[r.path] is not None:
            bad.append(BadItem(i, r.path, "missing_file", status[r.path]))
    return bad


def check_split(name: str, dataset: AVClipDataset, max_bad_fraction: float = 0.5) -> list[BadItem]:
    """Stop before any work when split ``name`` is empty or mostly unusable.

    Raises :class:`DataError` (naming the split, the counts per kind and the first
    files) when no clip is usable or the fraction of unusable clips (see
    :func:`unusable_clips`) exceeds ``max_bad_fraction``; returns the unusable clips.
    """
    bad = unusable_clips(dataset)
    total = len(dataset.records) + len(dataset.dropped)
    usable = total - len(bad)
    if total and usable and len(bad) <= max_bad_fraction * total:
        return bad
    counts = dict(collections.Counter(b.kind for b in bad))
    first = "; ".join(f"{b.path}: {b.reason}" for b in bad[:3])
    why = (
        "has no clips"
        if total == 0
        else f"has no usable clip ({total} clips: {counts})"
        if usable == 0
        else f"has {len(bad)} unusable clips of {total} {counts}, more than "
        f"data.max_bad_fraction={max_bad_fraction}"
    )
    raise DataError(
        f"the {name} split {why}" + (f"; first: {first}" if first else "")
        + ". Check the manifest's paths and labels, data.root and data.classes"
    )  # fmt: skip


def _release_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames in ``exc``'s traceback chain.

    A traceback keeps the decoder objects of the failed load alive (in a
    reference cycle when the error is stored). A decord reader that survives
    into a forked DataLoader worker and is freed there waits forever for its
    decoding threads, which do not exist in the child: the worker hangs.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def collate_clips(items: Sequence[dict | BadItem | None]) -> dict:
    """Stack good items, drop bad ones (BadItem or None) and count them.

    Returns a dict with the stacked tensors of the item keys (``video`` (B, ...),
    ``audio`` (B, ...), ``label``/``verb``/``noun`` (B,), ``index`` (B,)) plus
    ``batch_size`` (int, good items), ``skipped`` ({kind: count}),
    ``bad`` (list of BadItem), ``warnings`` ({warning: count}). When every item
    is bad only the last four keys are present (``batch_size`` 0). uint8 ``video``
    frames of different sizes (``device_transforms``) are zero-padded at the bottom
    and right to the largest; ``video_size`` keeps each clip's own size.
    """
    good = [x for x in items if isinstance(x, dict)]
    bad = [x for x in items if not isinstance(x, dict)]
    skipped = collections.Counter(x.kind if isinstance(x, BadItem) else "unknown" for x in bad)
    warnings = collections.Counter(w for x in good for w in x.get("warnings", ()))
    out: dict = {
        "batch_size": len(good),
        "skipped": dict(skipped),
        "bad": [x for x in bad if isinstance(x, BadItem)],
        "warnings": dict(warnings),
    }
    if good:
        for k in good[0]:
            if k == "video" and good[0][k].dtype == torch.uint8:
                out[k] = _stack_padded([x[k] for x in good])
            elif k != "warnings":
                out[k] = torch.stack([x[k] for x in good])
    return out


def _stack_padded(frames: list[torch.Tensor]) -> torch.Tensor:
    """Stack (..., h, w, 3) tensors, zero-padding h and w to the largest."""
    h = max(f.shape[-3] for f in frames)
    w = max(f.shape[-2] for f in frames)
    if all(f.shape[-3:-1] == (h, w) for f in frames):
        return torch.stack(frames)
    out = frames[0].new_zeros((len(frames), *frames[0].shape[:-3], h, w, 3))
    for i, f in enumerate(frames):
        out[i, ..., : f.shape[-3], : f.shape[-2], :] = f
    return out
