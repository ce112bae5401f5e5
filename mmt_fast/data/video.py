"""Video decoding (decord) and the spatial/temporal transforms.

Temporal sampling (frames are indexed within the clip's segment ``[f0, f1)``):
a window covers ``L = (num_frames - 1) * stride + 1`` frames and samples
``start + i * stride`` for ``i < num_frames``. Training draws ``start``
uniformly from ``[0, max(n - L, 0)]``; testing uses ``V`` windows spaced
uniformly from the first possible start to the last one (view ``k`` starts at
``round(k * (n - L) / (V - 1))``; one view is centred). A segment shorter than
``L`` frames repeats its last frame (the dataset counts it as ``short_clip``).
Times come from the container's frame timestamps (decord's
``get_frame_timestamp``), not the average frame rate, so variable-frame-rate
files stay in step with their audio: the segment ``[start_s, end_s)`` holds the
frames whose start time lies in it, and the window's time span runs from the
start of its first frame to the end of its last; its centre is what the audio
window is aligned to (see ``audio.py``). Containers decord cannot index
frame-accurately (MPEG-TS/PS) are refused (``unsupported_format``).

Prepared clips (``mmt-fast prepare``, recognised by their container comment,
:data:`PREPARED_TAG`) are decoded by :class:`PacketReader` (PyAV) instead of
decord: their non-reference B-frames are skipped unless a window samples them,
with the same frames and the same frame times as decoding everything.

Speed: frames are decoded at a reduced size where the transform would shrink
them anyway (:func:`decode_size`): the test short side is the crop size; for
training the short side is ``train_short_side`` (320 px for a 224 crop, the
upper end of SlowFast's scale jitter).

Rotation: phone videos are often stored sideways with a display matrix saying
how to turn them (MP4/MOV ``tkhd``). decord 0.6.0 applies it, so frames come
out upright, and :func:`probe_video` reports the displayed size
(:func:`display_rotation`), so that the reduced decoding size keeps the
picture's proportions; the crops below are taken from upright frames.

Spatial: training takes one random resized crop (area scale and aspect ratio
ranges as torchvision's ``RandomResizedCrop``; the MViTv2 recipe in SlowFast uses
(0.08, 1.0) and (3/4, 4/3)) shared by all frames, resizes it to ``S x S`` and
flips horizontally with probability ``flip_prob``; testing resizes the short
side to ``S`` and takes the centre ``S x S`` crop. Pixels go to [0, 1] and are
normalised per channel with ``(x - mean) / std``.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BadClipError


class VideoInfo(NamedTuple):
    """What the container's header says about the first video stream.

    ``height``/``width`` are the frame size as displayed, i.e. after the
    container's rotation (what decord returns): a phone video stored 1920x1080
    with a 90 degree display matrix is 1080 wide and 1920 high. ``rotation``:
    the display rotation in degrees counter-clockwise (0, 90, 180 or 270).
    """

    height: int
    width: int
    format: str
    rotation: int = 0


def _boxes(f, start: int, end: int):
    """(type, payload start, payload end) of the ISO-BMFF boxes in ``[start, end)``."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head)
        body = pos + 8
        if size == 1:
            size = struct.unpack(">Q", f.read(8))[0]
            body += 8
        elif size == 0:
            size = end - pos
        if size < body - pos:
            return
        yield kind, body, min(pos + size, end)
        pos += size


def display_rotation(path: str, data: bytes | None = None) -> int:
    """Display rotation (degrees counter-clockwise: 0, 90, 180, 270) of the first video
    track of an MP4/MOV file, from its track header's matrix (ISO/IEC 14496-12 ``tkhd``;
    where phones, and FFmpeg's display-matrix side data, put it); 0 for other files.

    Read from the header boxes alone (a few small reads), since PyAV reports the
    display matrix only on decoded frames. decord applies this rotation to the frames
    it returns, so the sizes it is asked for must be the displayed ones. ``data``: the
    file's bytes, when it is in memory.
    """
    try:
        size = os.path.getsize(path) if data is None else len(data)
        with open(path, "rb") if data is None else io.BytesIO(data) as f:
            for kind, b, e in _boxes(f, 0, size):
                if kind != b"moov":
                    continue
                for tk, tb, te in _boxes(f, b, e):
                    if tk != b"trak":
                        continue
                    matrix, video = None, False
                    for ck, cb, ce in _boxes(f, tb, te):
                        if ck == b"tkhd":
                            f.seek(cb)
                            version = f.read(1)[0]
                            f.seek(cb + 4 + (32 if version == 1 else 20) + 16)
                            matrix = struct.unpack(">9i", f.read(36))
                        elif ck == b"mdia":
                            for mk, mb, _ in _boxes(f, cb, ce):
                                if mk == b"hdlr":
                                    f.seek(mb + 8)
                                    video = f.read(4) == b"vide"
                    if video and matrix is not None:
                        a, b_ = matrix[0] / 65536, matrix[1] / 65536
                        return round(math.degrees(math.atan2(-b_, a)) / 90) % 4 * 90
                return 0
    except (OSError, struct.error, IndexError):
        return 0
    return 0


def probe_video(path: str, data: bytes | None = None) -> VideoInfo:
    """Read the header with PyAV (from ``data``, the file's bytes, when given; ``path``
    then only names it in messages): BadClipError for a missing path, a folder, a file
    without a video stream (``no_video``), or a container whose frames decord
    cannot index correctly (``unsupported_format``: MPEG-TS, whose decoded frame
    ``k`` can be frame ``k + 12`` with B-frames, silently shifting video against audio)."""
    return open_clip(path, data, packets=False)[0]


def open_clip(
    path: str, data: bytes | None = None, packets: bool = True
) -> tuple[VideoInfo, PacketReader | None]:
    """:func:`probe_video` and, for a clip written by ``mmt-fast prepare`` (its container
    comment starts with :data:`PREPARED_TAG`), a :class:`PacketReader` holding its
    demuxed packets: one open of the file serves both. None for other files (and for
    prepared clips with a display rotation, which decord turns upright), or when
    ``packets`` is False."""
    import av

    if data is None:
        _check_file(path)
    reader = None
    try:
        with av.open(path if data is None else io.BytesIO(data)) as c:
            fmt = c.format.name
            if not c.streams.video:
                kinds = sorted({s.type for s in c.streams})
                raise BadClipError(
                    path,
                    f"no video stream (streams: {', '.join(kinds) or 'none'}); "
                    "an audio-only file needs an audio-only model (e.g. ablation/audio-only)",
                    "no_video",
                )
            st = c.streams.video[0]
            cc = st.codec_context
            h, w = int(cc.height), int(cc.width)
            prepared = str(c.metadata.get("comment", "")).startswith(PREPARED_TAG)
            if packets and prepared and fmt.startswith("mov") and not display_rotation(path, data):
                reader = PacketReader(c, st, path)
    except BadClipError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BadClipError(
            path, f"cannot open video (truncated or corrupt file?): {msg}", "corrupt_file"
        ) from e
    if fmt in UNSUPPORTED_FORMATS:
        raise BadClipError(
            path,
            f"{UNSUPPORTED_FORMATS[fmt]} cannot be decoded frame-accurately by decord "
            "(frames come out shifted against the audio); remux it, e.g. "
            "`ffmpeg -i in.ts -c copy out.mp4`",
            "unsupported_format",
        )
    rot = 0 if reader is not None else display_rotation(path, data) if fmt.startswith("mov") else 0
    if rot in (90, 270):  # decord returns the frames as displayed: upright
        h, w = w, h
    return VideoInfo(h, w, fmt, rot), reader


#: the start of the container comment ``mmt-fast prepare`` writes (format 2 on): its clips
#: have non-reference B-frames that :class:`PacketReader` skips when no frame of theirs is needed
PREPARED_TAG = "mmt-fast prepared"


def _nal_length_size(extradata: bytes | None) -> int:
    """Bytes of each NAL unit's length prefix in MP4 H.264 samples (``avcC``)."""
    if not extradata or len(extradata) < 5 or extradata[0] != 1:
        raise ValueError("not an MP4 H.264 stream (no avcC record)")
    return (extradata[4] & 3) + 1


def is_reference(sample: bytes, length_size: int = 4) -> bool:
    """Whether an MP4 H.264 sample (length-prefixed NAL units) holds a reference picture:
    any coded slice (NAL type 1 or 5) with a non-zero ``nal_ref_idc`` (ITU-T H.264
    7.4.1: 0 means no other picture predicts from it, so the decoder may drop it). A
    sample without a slice counts as a reference (kept)."""
    pos, slices, n = 0, 0, len(sample)
    while pos + length_size < n:
        size = int.from_bytes(sample[pos : pos + length_size], "big")
        head = sample[pos + length_size]
        if head & 0x1F in (1, 5):
            slices += 1
            if head & 0x60:
                return True
        pos += length_size + size
    return slices == 0


class PacketReader:
    """A prepared clip's video demuxed into memory and decoded with PyAV (FFmpeg's H.264
    decoder, ``threads`` threads: one by default), feeding the decoder only the packets it needs.

    To decode frames ``indices`` (display order), the decoder starts at the last
    keyframe (an IDR: ``prepare`` writes closed GOPs) at or before the first one and is
    sent, in decode order, every reference picture up to the last one plus the
    non-reference pictures among the frames wanted; the other non-reference pictures
    (with ``prepare``'s encoding, 3 of every 4 frames are non-reference B-frames) are
    dropped unread, which gives exactly the frames decoding every packet would give
    (tests/test_prepared_decode.py checks it bit for bit). Frames far apart (test views
    of a long clip) are decoded in separate spans, each from its own keyframe. Frames come out as RGB24 at the
    stored size (or ``size`` when given: FFmpeg's bilinear scaler), like decord's.
    """

    def __init__(self, container, stream, path: str = "") -> None:
        self.path = path
        tb = stream.time_base
        self._tb = float(tb)
        packets = [p for p in container.demux(stream) if p.size and p.pts is not None]
        if not packets:
            raise BadClipError(path, "video stream has no frames", "corrupt_file")
        self._packets = packets  # they own their data: usable after the file is closed
        self._key = np.array([p.is_keyframe for p in packets], dtype=bool)
        pts = np.array([p.pts for p in packets], dtype=np.int64)
        dur = np.array([p.duration or 0 for p in packets], dtype=np.int64)
        order = np.argsort(pts, kind="stable")
        if (np.diff(pts[order]) <= 0).any():
            raise BadClipError(path, "video timestamps repeat", "corrupt_file")
        self._rank = np.empty(len(pts), dtype=np.int64)  # display index of each packet
        self._rank[order] = np.arange(len(pts))
        self._pts_sorted, self._dur_sorted = pts[order], dur[order]
        self._order = order  # the packet of each display index
        self._key_idx = np.flatnonzero(self._key)  # keyframe packets, their display indices
        self._key_rank = self._rank[self._key_idx]
        self._length_size = _nal_length_size(stream.codec_context.extradata)
        self._ref: dict[int, bool] = {}
        self._extradata = stream.codec_context.extradata
        self._codec = stream.codec_context.name
        rate = stream.average_rate or stream.guessed_rate
        self._fps = float(rate) if rate else 0.0
        self.size: tuple[int, int] | None = None  # (height, width) to scale to; None: stored
        self.threads = 1  # decoding threads (DataConfig.decode_threads)
        self.decoded = 0  # pictures sent to the decoder (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self._packets)

    def get_avg_fps(self) -> float:
        return self._fps

    def get_frame_timestamp(self, indices) -> np.ndarray:
        """(len(indices), 2) start and end (s) of the frames, as decord's method of that name."""
        k = np.asarray(indices, dtype=np.int64)
        start = self._pts_sorted[k] * self._tb
        return np.stack([start, (self._pts_sorted[k] + self._dur_sorted[k]) * self._tb], -1)

    def _is_ref(self, i: int) -> bool:
        if i not in self._ref:
            self._ref[i] = is_reference(bytes(self._packets[i]), self._length_size)
        return self._ref[i]

    def _spans(self, ranks: list[int]) -> list[tuple[int, int]]:
        """Decode-order packet ranges [first, last] that cover the frames ``ranks`` (sorted
        display indices): each starts at the keyframe at or before its first frame, and a
        new one starts where a keyframe lies after everything needed so far (views far
        apart in a long clip: no reference pictures decoded between them)."""
        spans: list[list[int]] = []
        for r in ranks:
            k = int(self._key_idx[max(np.searchsorted(self._key_rank, r, "right") - 1, 0)])
            i = int(self._order[r])
            if spans and k <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], i)
            else:
                spans.append([min(k, i), i])
        return [(a, b) for a, b in spans]

    def _decoder(self):
        import av

        cc = av.codec.CodecContext.create(self._codec, "r")
        cc.extradata = self._extradata
        cc.thread_count = self.threads
        return cc

    def get_frames(
        self, indices: Sequence[int], size: tuple[int, int] | None = None, skip: bool = True
    ) -> torch.Tensor:
        """uint8 (len(indices), H, W, 3) of the frames ``indices`` (sorted, unique, display
        order) at ``size`` (default ``self.size``); ``skip=False`` decodes every packet of
        each span from its keyframe (the reference the skipping is tested against)."""
        import av
        from av.video.reformatter import VideoReformatter

        size = size if size is not None else self.size
        want = {int(k): j for j, k in enumerate(indices)}
        if not want or min(want) < 0 or max(want) >= len(self._packets):
            raise IndexError(f"frame indices outside [0, {len(self._packets)})")
        fmt = VideoReformatter()
        out: torch.Tensor | None = None
        lo, hi = min(want), max(want)
        by_pts = {int(p): r for r, p in enumerate(self._pts_sorted) if lo <= r <= hi}
        got = 0

        def take(frames) -> None:
            nonlocal out, got
            for fr in frames:
                j = want.get(by_pts.get(fr.pts, -1))
                if j is None:
                    continue
                h, w = size if size is not None else (fr.height, fr.width)
                x = fmt.reformat(fr, width=w, height=h, format="rgb24").to_ndarray()
                if out is None:
                    out = torch.empty((len(want), h, w, 3), dtype=torch.uint8)
                out[j] = torch.from_numpy(x)
                got += 1

        try:
            cc = self._decoder()
            # one decoder for every span: a span starts at an IDR picture (prepare writes
            # closed GOPs), which resets the decoder's references
            for first, last in self._spans(sorted(want)):
                for i in range(first, last + 1):
                    if skip and self._rank[i] not in want and not self._is_ref(i):
                        continue
                    self.decoded += 1
                    take(cc.decode(self._packets[i]))
            take(cc.decode(None))
        except av.error.FFmpegError as e:
            raise BadClipError(self.path, f"frame decoding failed: {e}", "corrupt_file") from e
        if got != len(want) or out is None:
            raise BadClipError(self.path, f"{got} of {len(want)} frames decoded", "corrupt_file")
        return out


UNSUPPORTED_FORMATS = {"mpegts": "MPEG-TS", "mpeg": "MPEG-PS"}


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise BadClipError(path, "is a folder, not a media file", "missing_file")
        raise BadClipError(path, "file does not exist", "missing_file")


def open_video(
    path: str,
    num_threads: int = 1,
    size: tuple[int, int] | None = None,
    data: bytes | None = None,
):
    """Open ``path`` with decord (decoding at ``size`` = (height, width) when given; from
    ``data``, the file's bytes in memory, when given); BadClipError for a missing or
    unreadable file."""
    import decord

    if data is None:
        _check_file(path)
    kw = {} if size is None else {"height": size[0], "width": size[1]}
    src = path if data is None else io.BytesIO(data)
    try:
        vr = decord.VideoReader(src, ctx=decord.cpu(0), num_threads=num_threads, **kw)
    except Exception as e:  # decord raises DECORDError / RuntimeError
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BadClipError(
            path, f"cannot open video (truncated or corrupt file?): {msg}", "corrupt_file"
        ) from e
    if len(vr) == 0:
        raise BadClipError(path, "video stream has no frames", "corrupt_file")
    return vr


def decode_size(
    height: int, width: int, crop_size: int, train: bool, train_short_side: int | None
) -> tuple[int, int] | None:
    """(height, width) to decode at, or None for the file's own size.

    Test: the short side becomes ``crop_size`` (what the transform resizes to);
    train: ``train_short_side`` (the random crop then has ample pixels) when the
    file's short side is more than 1.25 times that; never upscaled. The width is rounded up to a multiple of 64 (decord 0.6.0 fails
    on some widths); the transform resizes the small frames to the exact size.
    """
    target = crop_size if not train else train_short_side
    if target is None or min(height, width) <= (target if not train else 1.25 * target):
        return None  # (training: scaling 360 -> 320 px costs more in the decoder than it saves)
    s = target / min(height, width)
    h, w = max(target, round(height * s)), max(target, round(width * s))
    return h, -(-w // 64) * 64


def frame_times(vr, n: int | None = None) -> np.ndarray:
    """Start times (s) of the frames from the container's timestamps, (n + 1,): the last
    entry is the end of the last frame. Falls back to ``k / avg_fps`` when the
    timestamps are missing or not increasing."""
    n = len(vr) if n is None else n
    fps = float(vr.get_avg_fps()) or 25.0
    try:
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
    except Exception:
        ts = None
    if ts is None or not np.isfinite(ts).all() or (np.diff(ts[:, 0]) <= 0).any():
        return np.arange(n + 1, dtype=np.float64) / fps
    # the last frame's duration is often missing or a placeholder (1 tick): use the median
    typical = float(np.median(np.diff(ts[:, 0]))) if n > 1 else 1 / fps
    last = ts[-1, 1] - ts[-1, 0]
    return np.append(ts[:, 0], ts[-1, 0] + (last if last > 0.5 * typical else typical))


def segment_frames(
    times: np.ndarray, start_s: float | None, end_s: float | None, path: str = ""
) -> tuple[int, int]:
    """Frame range ``[f0, f1)`` of the frames whose start time lies in ``[start_s, end_s)``
    (None = file edge); ``times`` from :func:`frame_times`."""
    n = len(times) - 1
    if start_s is not None and not (math.isfinite(start_s) and start_s >= 0):
        raise BadClipError(path, f"start {start_s} s is not a finite time >= 0", "bad_segment")
    eps = 1e-6
    f0 = 0 if start_s is None else int(np.searchsorted(times[:n], start_s - eps))
    f1 = n if end_s is None else int(np.searchsorted(times[:n], end_s - eps))
    if f1 <= f0:
        raise BadClipError(
            path,
            f"segment [{start_s}, {end_s}) s is empty or outside the video "
            f"({n} frames, {times[-1]:.3f} s)",
            "bad_segment",
        )
    return f0, f1


def window_centre(times: np.ndarray, first: int, window_len: int) -> float:
    """Centre (s) of the window of ``window_len`` frames from frame ``first``: the middle
    of [start of ``first``, end of frame ``first + window_len - 1``], extrapolated at
    the average frame duration past the end of the file."""
    n = len(times) - 1
    dt = (times[-1] - times[0]) / max(n, 1)

    def at(k: int) -> float:
        return float(times[k]) if k <= n else float(times[n] + (k - n) * dt)

    return (at(first) + at(first + window_len)) / 2


def window_starts(
    num_available: int, window_len: int, train: bool, num_views: int = 1
) -> list[int]:
    """Start offsets (frames, relative to the segment) of the sampling windows.

    Training: one start drawn uniformly from ``[0, max(num_available - window_len, 0)]``
    with torch's RNG. Testing: ``num_views`` uniformly spaced starts.
    """
    delta = max(num_available - window_len, 0)
    if train:
        return [int(torch.randint(0, delta + 1, ()).item())]
    if num_views == 1:
        return [delta // 2]
    return [round(k * delta / (num_views - 1)) for k in range(num_views)]


def frame_indices(f0: int, f1: int, start: int, num_frames: int, stride: int) -> np.ndarray:
    """Absolute frame indices ``f0 + start + i * stride``, clamped to ``f1 - 1``."""
    idx = f0 + start + np.arange(num_frames) * stride
    return np.minimum(idx, f1 - 1)


def decode_frames(
    vr, indices: np.ndarray, path: str = "", data: bytes | None = None
) -> torch.Tensor:
    """Decode frames -> uint8 tensor (T, H, W, 3) (``data``: the file's bytes, when
    ``vr`` was opened from memory)."""
    uniq, inverse = np.unique(indices, return_inverse=True)
    if isinstance(vr, PacketReader):
        frames = vr.get_frames(uniq)
    else:
        frames = _decord_frames(vr, uniq, path, data)
    if len(uniq) == len(indices) and (np.diff(indices) > 0).all():
        return frames  # ascending, no repeats (a training window): no 8 MB gather copy
    return frames[torch.from_numpy(inverse)]


def _decord_frames(vr, uniq: np.ndarray, path: str, data: bytes | None) -> torch.Tensor:
    try:
        frames = torch.from_numpy(vr.get_batch(uniq.tolist()).asnumpy())
    except Exception as e:
        if "must exactly match" not in str(e) or not path:
            raise BadClipError(path, f"frame decoding failed: {e}", "corrupt_file") from e
        frames = _decode_padded_width(path, uniq, data)
    return frames


def _decode_padded_width(path: str, indices: np.ndarray, data: bytes | None = None) -> torch.Tensor:
    """Work around decord 0.6.0 failing on some widths (e.g. 48 px: "The size must exactly
    match"): decode scaled to a width that is a multiple of 64, then resize back."""
    import decord

    def src():
        return path if data is None else io.BytesIO(data)

    height, width = decord.VideoReader(src(), num_threads=1)[0].shape[:2]
    wide = -(-width // 64) * 64
    try:
        vr = decord.VideoReader(src(), num_threads=1, width=wide, height=height)
        x = torch.from_numpy(vr.get_batch(indices.tolist()).asnumpy())
    except Exception as e:
        raise BadClipError(path, f"frame decoding failed: {e}", "corrupt_file") from e
    x = x.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resize_frames(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(T, 3, h, w) -> (T, 3, *size), bilinear with antialiasing when shrinking.

    uint8 input is resized in uint8 (torch's vectorised channels-last path, several
    times faster than float; the result differs by at most one grey level)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if x.dtype == torch.uint8:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop (torchvision's algorithm, torch RNG)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1]))
        r = math.exp(float(torch.empty(()).uniform_(*log_r)))
        w = round(math.sqrt(target * r))
        h = round(math.sqrt(target / r))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def transform_frames(
    frames: torch.Tensor,
    crop_size: int,
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float32 (3, T, S, S), S = crop_size."""
    _, height, width, _ = frames.shape
    if train:
        top, left, h, w = random_resized_crop_box(height, width, scale, ratio)
        x = resize_frames(
            frames[:, top : top + h, left : left + w].permute(0, 3, 1, 2), (crop_size,) * 2
        )
        if flip_prob > 0 and float(torch.rand(())) < flip_prob:
            x = x.flip(-1)
    else:
        s = crop_size / min(height, width)
        new_h, new_w = max(crop_size, round(height * s)), max(crop_size, round(width * s))
        x = resize_frames(frames.permute(0, 3, 1, 2), (new_h, new_w))
        top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
        x = x[:, :, top : top + crop_size, left : left + crop_size]
    # normalise in the output's contiguous (3, T, S, S) layout: the same operations in the
    # same order as (x / 255 - mean) / std on x's channels-last layout, 10x faster
    out = torch.empty((3, x.shape[0], crop_size, crop_size), dtype=torch.float32)
    out.copy_(x.permute(1, 0, 2, 3)).div_(255.0)
    out.sub_(torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1))
    return out.div_(torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1))
