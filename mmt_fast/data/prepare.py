"""Prepared copies of a dataset (``mmt-fast prepare``): clips re-encoded once for fast loading.

Each clip (a whole file, or a segment of a long video cut with ``margin_s`` seconds
on both sides for temporal jitter and windows longer than the segment) becomes, in ``out_dir``:

- ``clips/<name>.mp4``: H.264 (libx264 through PyAV; no ffmpeg binary needed)
  with the short side scaled to ``short_side`` (never upscaled; even sizes for
  yuv420p; area interpolation; a display rotation (phone videos) is kept as the
  output's display matrix), a keyframe every ``gop`` frames (closed GOPs),
  ``bframes`` B-frames between reference frames in a fixed pattern, none of them
  a reference (x264 ``b-adapt=0``, ``b-pyramid=none``; the last ``bframes + 1``
  frames are P-frames, so the last frame shown is the last stored and keeps its
  duration), ``tune=fastdecode`` (no CABAC or deblocking, so frames decode
  cheaply), no audio, and the container comment ``mmt-fast prepared format N``
  (``video.PREPARED_TAG``) by which the loader recognises the file and decodes
  it with ``video.PacketReader``, skipping the B-frames no sampled frame needs
  (a clip with a display rotation gets no B-frames: decord reads it, turning its
  frames upright). Every source frame is kept with its own timestamp, shifted so that
  the first kept frame is at 0 and written in the source stream's time base:
  frame times are exact and variable frame rates survive.
- ``clips/<name>.wav``: the clip's audio as the loader reads it (mono = mean of
  the channels, 16 kHz; 16-bit PCM by default; ``.flac`` with ``audio_subtype="FLAC"``),
  placed on the same clock: sample
  ``k`` plays at ``k / 16000`` s after the first kept frame. A track that starts
  after the video is not padded with silence: the wav starts where the track
  starts and its comment ``mmt-fast audio_start_s=<s>`` says where (the loader
  then treats the time before it as "no audio", as it does for the container's
  own track); one that starts earlier is trimmed. The loader reads the
  ``<stem>.wav`` beside a video before the video's own audio (``audio.py``).
- ``clips/<name>.json``: what was done (source, its size and mtime, the cut, the
  settings, frames, the time shift); written last, so a clip counts as finished
  only when it exists and matches the source and the settings. Everything is
  written under a temporary name and moved into place with ``os.replace``.

Each output is verified before it is moved into place: decord opens it, finds
every frame at the timestamp written (to 1 ms), and decodes the first, middle
and last frames at the expected size; the loader's packet reader finds the same
frames at the same times and decodes the last one; the wav holds the expected
number of samples.

The new ``manifest.csv`` (a plain manifest: ``path,clip_id,label,verb,noun,
start_s,end_s,split,source,offset_s``; paths relative to ``out_dir``) keeps each
record's target, clip id and split, with segment times shifted by ``offset_s``
(the source time of the cut's first frame). ``prepare_report.json`` lists the
unusable inputs per kind (:data:`mmt_fast.data.errors.BAD_KINDS`; they are left
out of the manifest and never stop the batch), the clips without audio (kept,
``no_audio``; also a clip whose audio track or sidecar cannot be read, with the
reason: its video still serves video-only training, and audio training counts
it ``no_audio``), counts, and the disk use. An output that cannot be written
(no space, read-only, no permission, a file where a folder should be) is not an
unusable input: it stops the run at once with a
:class:`~mmt_fast.errors.StorageError` naming the path.

Choosing the settings (:func:`settings_for`): the short side is what the
training transform decodes at (``DataConfig.decode_short_side``: 320 px for the
paper's 224 crops) or, for a set used only for testing, the crop size (224 px:
the test transform then only crops). The keyframe interval is a quarter of
the sampling window (16 frames for 16 frames at stride 4), so reaching a random
window costs at most 15 extra frames (3 reference pictures with B-frames);
``bframes`` is the sampling stride minus one, so every stride-th frame is a
reference and the others are decoded only when a window samples them: a
61-frame window at stride 4 decodes 16-40 pictures (over every window start)
instead of 61-76.

Clips of format 1 (before the B-frames; no container comment) still load, through
decord as any other video; since the format is part of each clip's key, running
prepare again over the same folder re-encodes them.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mmt_fast.errors import ConfigError, StorageError, TrainingError

from . import audio as A
from . import video as Vd
from .errors import BadClipError
from .manifests import ClipRecord

FORMAT_VERSION = 2  # 2: non-reference B-frames and the container tag (video.PREPARED_TAG)
MANIFEST_NAME = "manifest.csv"
REPORT_NAME = "prepare_report.json"
MANIFEST_COLUMNS = (
    "path", "clip_id", "label", "verb", "noun", "start_s", "end_s", "split", "source", "offset_s",
)  # fmt: skip


@dataclass(frozen=True)
class PrepareSettings:
    """How clips are re-encoded (see the module docstring).

    ``short_side``: pixels of the output's short side (files already smaller keep
    their size); ``gop``: frames between keyframes; ``bframes``: non-reference
    B-frames between two reference frames (a fixed pattern); ``margin_s``: seconds kept
    before and after a segment; ``crf``/``preset``: libx264 quality and speed;
    ``audio_subtype``: the sidecar's sample format (soundfile subtype: ``PCM_16``,
    ``PCM_24`` or ``FLOAT``), or ``FLAC`` for a lossless 16-bit ``<stem>.flac`` (about
    half the size of the 16-bit wav, a little CPU to decode).
    """

    short_side: int = 320
    gop: int = 16
    bframes: int = 3
    margin_s: float = 1.0
    crf: int = 23
    preset: str = "veryfast"
    sample_rate: int = A.SAMPLE_RATE
    audio_subtype: str = "PCM_16"

    def __post_init__(self) -> None:
        if self.short_side < 2 or self.gop < 1:
            raise ConfigError(
                f"short_side ({self.short_side}) must be >= 2 and gop ({self.gop}) >= 1"
            )
        if not 0 <= self.bframes <= 16:
            raise ConfigError(f"bframes={self.bframes} must lie in [0, 16] (x264's limit)")
        if not (math.isfinite(self.margin_s) and self.margin_s >= 0):
            raise ConfigError(f"margin_s={self.margin_s} must be a finite number >= 0")
        if not 0 <= self.crf <= 51:
            raise ConfigError(f"crf={self.crf} must lie in [0, 51]")
        if self.audio_subtype not in ("PCM_16", "PCM_24", "FLOAT", "FLAC"):
            raise ConfigError(
                f"audio_subtype={self.audio_subtype!r}; expected PCM_16, PCM_24, FLOAT or FLAC"
            )


def settings_for(data_config, train: bool, **overrides) -> PrepareSettings:
    """Settings from the training recipe: short side ``decode_short_side`` for a set that
    is trained on, ``crop_size`` for a test-only set; keyframe every quarter window; a
    segment margin of one sampling window at 24 fps (2.6 s for 61 frames), so that a
    window that starts anywhere in the segment has its frames in the cut (a segment
    shorter than the window reads frames past its end, see ``video.window_centre``)."""
    short = data_config.decode_short_side if train else data_config.crop_size
    gop = max(1, -(-data_config.window_frames // 4))
    margin = math.ceil(data_config.window_frames / 24 * 10) / 10
    bframes = min(data_config.stride - 1, 16)  # every stride-th frame a reference
    kw = {"short_side": short, "gop": gop, "bframes": bframes, "margin_s": margin}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return PrepareSettings(**kw)


@dataclass
class Job:
    """One output clip: ``src`` cut to ``[cut[0], cut[1])`` s (None: the file's edges)."""

    src: str
    cut: tuple[float | None, float | None] | None
    name: str  # output stem relative to out_dir, e.g. "clips/abc-1a2b3c4d"
    clip_ids: list[str] = field(default_factory=list)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._")[:80] or "clip"


def plan_jobs(records: Sequence[ClipRecord], margin_s: float) -> tuple[list[Job], list[int]]:
    """The output clips of ``records`` (records with the same file and cut share one) and,
    per record, the index of its job."""
    jobs: list[Job] = []
    by_key: dict[tuple, int] = {}
    which = []
    for r in records:
        src = os.path.abspath(r.path)
        cut = None
        if r.start_s is not None or r.end_s is not None:
            c0 = None if r.start_s is None else max(r.start_s - margin_s, 0.0)
            c1 = None if r.end_s is None else r.end_s + margin_s
            cut = (c0, c1)
        key = (src, cut)
        if key not in by_key:
            h = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
            stem = _safe(Path(src).stem if cut is None else f"{Path(src).stem}_{cut[0] or 0:.2f}")
            by_key[key] = len(jobs)
            jobs.append(Job(src, cut, f"clips/{stem}-{h}"))
        jobs[by_key[key]].clip_ids.append(r.clip_id)
        which.append(by_key[key])
    return jobs, which


# ------------------------------------------------------------------ one clip
def _source_key(job: Job, settings: PrepareSettings) -> dict:
    st = os.stat(job.src)
    return {
        "version": FORMAT_VERSION,
        "source": job.src,
        "source_bytes": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "cut": list(job.cut) if job.cut is not None else None,
        "settings": asdict(settings),
    }


def finished_meta(job: Job, out_dir: Path, settings: PrepareSettings) -> dict | None:
    """The metadata of a finished clip that matches its source and ``settings``, else None."""
    meta_path = out_dir / f"{job.name}.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != _source_key(job, settings):
            return None
        for f, size in meta["files"].items():
            if os.path.getsize(out_dir / f) != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side scaled to ``short_side`` (never up), both even."""
    s = min(1.0, short_side / min(height, width))
    return _even(height * s), _even(width * s)


def _err_msg(e: BaseException) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def _write_failed(path: Path, e: BaseException) -> StorageError:
    """The error for a failed write of an output file (full disk, read-only, no permission,
    a file where a folder should be): it stops the whole run, never one clip."""
    why = _err_msg(e)
    if not isinstance(e, OSError):  # libsndfile says only "System error"
        with contextlib.suppress(OSError):
            st = os.statvfs(path.parent)
            if st.f_bavail == 0 or st.f_favail == 0:
                why = f"No space left on device ({why})"
    return StorageError(f"cannot write {path}: {why}")


class _Encoder:
    """Re-encodes the kept frames of one cut into ``dst`` (see the module docstring): sizes
    and the display rotation from the first frame; frames held back ``bframes`` deep so the
    last ones can be sent as P-frames; packet durations kept (the last frame's ends the clip)."""

    def __init__(self, dst, st, settings: PrepareSettings, job: Job) -> None:
        import av

        self.dst, self.job, self.settings, self.tb = dst, job, settings, st.time_base
        rate = st.average_rate or st.guessed_rate or 25
        self.vs = dst.add_stream("libx264", rate=rate)
        self.vs.pix_fmt = "yuv420p"
        self.vs.codec_context.time_base = self.tb
        self.first = self.size = None
        self.rotation = 0
        self.pts_out: list[int] = []
        self.durations: dict[int, int] = {}
        self.pending: collections.deque = collections.deque()  # frames not yet sent to x264
        self.picture_type = av.video.frame.PictureType
        self.configure(settings.bframes)

    def configure(self, bframes: int) -> None:  # before the first frame is encoded
        # B-frames in a fixed pattern (no adaptive placement), none used as a
        # reference (no B-pyramid), closed GOPs: the loader skips the unneeded ones
        g, s = str(self.settings.gop), self.settings
        self.bframes = bframes
        self.vs.options = {
            "preset": s.preset, "crf": str(s.crf), "g": g, "keyint_min": g, "sc_threshold": "0",
            "bf": str(bframes), "tune": "fastdecode", "threads": "1",
            "x264-params": "b-pyramid=none:b-adapt=0:open-gop=0",
        }  # fmt: skip
        self.dst.metadata["comment"] = (
            f"{Vd.PREPARED_TAG} format {FORMAT_VERSION}: H.264, GOP {s.gop}, "
            f"{bframes} non-reference B-frames"
        )

    def _start(self, fr) -> None:
        """Sizes from the first stored frame; its display rotation kept."""
        self.first = fr.pts
        self.size = output_size(fr.height, fr.width, self.settings.short_side)
        self.vs.height, self.vs.width = self.size
        self.rotation = round(fr.rotation or 0) % 360
        if self.rotation:
            self.vs.set_display_rotation(self.rotation)
            # decord reads rotated clips (it turns them upright): no B-frames, whose
            # reordering changes the last frame's end as decord reads it
            self.configure(0)

    def add(self, fr) -> None:
        if self.first is None:
            self._start(fr)
        pts = fr.pts - self.first
        oh, ow = self.size
        # (reformat returns the frame itself when nothing changes: set pts after reading)
        out = fr.reformat(width=ow, height=oh, format="yuv420p", interpolation="AREA")
        if fr.duration:  # the last frame's duration ends the clip's time axis
            self.durations[pts] = fr.duration
        out.pts, out.time_base = pts, self.tb
        out.pict_type = self.picture_type.NONE
        self.pts_out.append(pts)
        self.pending.append(out)
        if len(self.pending) > self.bframes:
            self._send(self.pending.popleft())

    def finish(self) -> None:
        # the last frames as P-frames: the last frame shown is then the last one stored,
        # whose sample duration (its packet's) the muxer keeps: the clip's end time
        while self.pending:
            out = self.pending.popleft()
            out.pict_type = self.picture_type.P
            self._send(out)
        self._send(None)

    def _send(self, frame) -> None:
        for p in self.vs.encode(frame):
            if p.pts in self.durations:
                p.duration = self.durations.pop(p.pts)
            try:
                self.dst.mux(p)
            except OSError as e:  # PyAV's write errors are OSErrors (ENOSPC, EIO, ...)
                raise _write_failed(Path(self.dst.name), e) from e


def _frames_in_cut(src, st, job: Job):
    """The source frames of ``job``'s cut, in order (BadClipError for missing or
    non-increasing timestamps)."""
    c0, c1 = job.cut if job.cut is not None else (None, None)
    eps = 1e-6
    tb, origin = st.time_base, st.start_time or 0
    if c0:  # to the keyframe before the cut
        src.seek(origin + int(c0 / tb), stream=st, backward=True)
    prev = None
    for fr in src.decode(st):
        if fr.pts is None:
            raise BadClipError(job.src, "a video frame has no timestamp", "corrupt_file")
        t = float((fr.pts - origin) * tb)
        if c0 is not None and t < c0 - eps:
            continue
        if c1 is not None and t >= c1 - eps:
            break
        if prev is not None and fr.pts <= prev:
            raise BadClipError(
                job.src, f"video timestamps do not increase at {t:.3f} s", "corrupt_file"
            )
        prev = fr.pts
        yield fr


def _encode_video(job: Job, tmp: Path, settings: PrepareSettings) -> dict:
    """Decode the cut with PyAV, scale, re-encode to ``tmp``; the kept frames' times.
    BadClipError for the source's faults, StorageError for the output's."""
    import av

    Vd.probe_video(job.src)  # missing, folder, no video, MPEG-TS: BadClipError
    try:
        src = av.open(job.src)
    except Exception as e:
        raise BadClipError(job.src, f"cannot open the video: {_err_msg(e)}", "corrupt_file") from e
    with src:
        st = src.streams.video[0]
        st.codec_context.thread_count = 1
        tb, origin = st.time_base, st.start_time or 0  # (read before the container closes)
        try:
            dst = av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"})
        except OSError as e:
            raise _write_failed(tmp, e) from e
        try:
            enc = _Encoder(dst, st, settings, job)
            for fr in _frames_in_cut(src, st, job):
                enc.add(fr)
            enc.finish()
        except (BadClipError, StorageError):
            raise
        except Exception as e:
            raise BadClipError(
                job.src, f"cannot decode or re-encode the video: {_err_msg(e)}", "corrupt_file"
            ) from e
        finally:
            try:
                dst.close()  # the trailer and the faststart rewrite: output side
            except OSError as e:
                raise _write_failed(tmp, e) from e
    if not enc.pts_out:
        raise BadClipError(job.src, f"no video frame in the cut {job.cut} s", "bad_segment")
    oh, ow = enc.size
    upright = (ow, oh) if enc.rotation in (90, 270) else (oh, ow)  # what decord returns
    return {
        "offset_s": float((enc.first - origin) * tb),
        "times": np.asarray(enc.pts_out, np.float64) * float(tb),
        "height": upright[0],
        "width": upright[1],
        "rotation": enc.rotation,
    }


def _write_audio(job: Job, tmp: Path, settings: PrepareSettings, offset_s: float) -> dict | None:
    """The clip's audio from ``offset_s`` (source clock) as a 16 kHz mono wav; None: no audio."""
    import soundfile

    sr = settings.sample_rate
    try:
        src = A.open_audio(job.src, sr)
    except BadClipError as e:
        if e.kind == "no_audio":
            return None
        raise
    k0 = round(offset_s * sr)
    end = job.cut[1] if job.cut is not None else None
    lo = max(k0, src.start_sample)
    hi = src.num_samples if end is None else min(src.num_samples, round(end * sr))
    if hi - lo <= 0:
        return None
    start_s = (lo - k0) / sr
    chunk = 60 * sr
    flac = settings.audio_subtype == "FLAC"
    try:
        f = soundfile.SoundFile(
            str(tmp), "w", samplerate=sr, channels=1, format="FLAC" if flac else "WAV",
            subtype="PCM_16" if flac else settings.audio_subtype,
        )  # fmt: skip
    except Exception as e:  # soundfile reports a write error as "System error"
        raise _write_failed(tmp, e) from e
    try:
        if lo > k0:
            f.comment = f"{A.WAV_START_TAG}{start_s:.6f}"
        for a in range(lo, hi, chunk):
            x = np.clip(src.read(a, min(a + chunk, hi)), -1.0, 1.0)  # the source's side
            try:
                f.write(x)
            except Exception as e:
                raise _write_failed(tmp, e) from e
    finally:
        try:
            f.close()  # the header's sizes: output side
        except Exception as e:
            raise _write_failed(tmp, e) from e
    with contextlib.suppress(Exception):
        src.close()
    return {"samples": hi - lo, "start_s": start_s}


def _audio_or_why(job: Job, tmp: Path, settings: PrepareSettings, offset_s: float):
    """(audio, None), or (None, why) when the source's audio cannot be read: the clip is
    kept without audio (video-only training uses it; audio training counts it
    ``no_audio``), the reason goes to the report."""
    try:
        return _write_audio(job, tmp, settings, offset_s), None
    except StorageError:
        raise
    except Exception as e:
        return None, e.reason if isinstance(e, BadClipError) else _err_msg(e)


def _verify(job: Job, mp4: Path, wav: Path | None, video: dict, audio: dict | None) -> None:
    """Decode the outputs with the loader's decoders; BadClipError naming what differs."""
    import soundfile

    n = len(video["times"])
    try:
        vr = Vd.open_video(str(mp4))
        times = Vd.frame_times(vr)
        if len(vr) != n:
            raise ValueError(f"{len(vr)} frames decoded, {n} written")
        dt = np.abs(times[:n] - video["times"]).max()
        if dt > 1e-3:
            raise ValueError(f"frame times differ from the source's by up to {dt * 1e3:.1f} ms")
        x = vr.get_batch(sorted({0, n // 2, n - 1})).asnumpy()
        if x.shape[1:3] != (video["height"], video["width"]):
            raise ValueError(f"frames decode at {x.shape[1:3]}")
        del vr
        reader = Vd.open_clip(str(mp4))[1]  # the loader's reader (None: rotated, decord's)
        if reader is not None:
            if len(reader) != n:
                raise ValueError(f"the packet reader finds {len(reader)} frames, {n} written")
            dt = np.abs(reader.get_frame_timestamp(np.arange(n))[:, 0] - video["times"]).max()
            if dt > 1e-3:
                raise ValueError(f"the packet reader's frame times differ by {dt * 1e3:.1f} ms")
            reader.get_frames([n - 1])  # decodes from the last keyframe
        if wav is not None:
            info = soundfile.info(str(wav))
            if info.frames != audio["samples"] or info.samplerate != A.SAMPLE_RATE:
                raise ValueError(f"the wav holds {info.frames} samples at {info.samplerate} Hz")
    except Exception as e:
        raise BadClipError(
            job.src, f"the prepared copy does not verify: {_err_msg(e)}", "decode_error"
        ) from e


def _install(tmp_mp4: Path, mp4: Path, tmp_wav: Path | None, wav: Path) -> None:
    """Move the verified outputs into place (a stale sidecar would be read as this audio)."""
    try:
        os.replace(tmp_mp4, mp4)
        for stale in (mp4.with_suffix(".wav"), mp4.with_suffix(".flac")):
            if stale != wav or tmp_wav is None:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        if tmp_wav is not None:
            os.replace(tmp_wav, wav)
    except OSError as e:
        raise _write_failed(Path(e.filename or mp4), e) from e


def prepare_clip(job: Job, out_dir: Path, settings: PrepareSettings) -> dict:
    """Prepare one clip (resumable, atomic, verified); its metadata. BadClipError if unusable."""
    out_dir = Path(out_dir)
    meta = finished_meta(job, out_dir, settings)
    if meta is not None:
        return {**meta, "status": "done_before"}
    if not os.path.isfile(job.src):
        Vd.probe_video(job.src)  # the missing_file error
    t0 = time.perf_counter()
    key = _source_key(job, settings)
    mp4 = out_dir / f"{job.name}.mp4"
    ext = ".flac" if settings.audio_subtype == "FLAC" else ".wav"
    wav, meta_path = mp4.with_suffix(ext), mp4.with_suffix(".json")
    try:
        mp4.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_failed(mp4.parent, e) from e
    tag = f".tmp-{os.getpid()}"
    tmp_mp4, tmp_wav = mp4.with_name(mp4.name + tag), wav.with_name(wav.name + tag)
    try:
        video = _encode_video(job, tmp_mp4, settings)
        audio, audio_error = _audio_or_why(job, tmp_wav, settings, video["offset_s"])
        _verify(job, tmp_mp4, tmp_wav if audio else None, video, audio)
        _install(tmp_mp4, mp4, tmp_wav if audio else None, wav)
    finally:
        for t in (tmp_mp4, tmp_wav):
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
    files = {str(mp4.relative_to(out_dir)): mp4.stat().st_size}
    if audio is not None:
        files[str(wav.relative_to(out_dir))] = wav.stat().st_size
    times = video["times"]
    meta = {
        "key": key,
        "files": files,
        "frames": len(times),
        "height": video["height"],
        "width": video["width"],
        "rotation": video["rotation"],
        "offset_s": video["offset_s"],
        "duration_s": float(times[-1] + (np.median(np.diff(times)) if len(times) > 1 else 0.0)),
        "audio": audio,
        "warnings": [] if audio is not None else ["no_audio"],
        "audio_error": audio_error,
        "seconds": time.perf_counter() - t0,
    }
    _atomic_write(meta_path, json.dumps(meta, indent=1))
    return {**meta, "status": "prepared"}


RUNNING_DIR = ".prepare-running"  # one marker per clip being prepared: "<job> <pid>"


def _run_job(args) -> tuple[int, dict]:
    """Prepare job ``i`` in a worker: its result, a bad clip as a result; a StorageError
    propagates (it stops the run). A marker file names the clip while it runs, so that
    the parent can name it if this process dies."""
    i, job, out_dir, settings = args
    marker = out_dir / RUNNING_DIR / f"{i}"
    try:
        marker.write_text(f"{job.src} {os.getpid()}")
    except OSError as e:
        raise _write_failed(marker, e) from e
    try:
        return i, prepare_clip(job, out_dir, settings)
    except BadClipError as e:
        return i, {"status": "bad", "kind": e.kind, "reason": e.reason}
    except (StorageError, MemoryError):
        raise
    except OSError as e:
        name = Path(os.path.abspath(e.filename)) if isinstance(e.filename, str) else None
        if e.errno in _OUTPUT_ERRNOS and name and name.is_relative_to(out_dir.absolute()):
            raise _write_failed(name, e) from e  # an output step not wrapped in prepare_clip
        return i, {"status": "bad", "kind": "decode_error", "reason": f"{type(e).__name__}: {e}"}
    except Exception as e:  # one clip never stops the batch
        return i, {"status": "bad", "kind": "decode_error", "reason": f"{type(e).__name__}: {e}"}
    finally:
        with contextlib.suppress(OSError):
            marker.unlink()


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EFBIG}  # fmt: skip


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _running(out_dir: Path) -> str:
    """The clips whose markers are left: those being prepared when a worker died (the
    pool stops the others with SIGTERM, which leaves their markers too: a worker stuck
    in C code must still stop, so no handler delays it)."""
    names = []
    for m in sorted((out_dir / RUNNING_DIR).glob("*"), key=lambda p: p.name):
        with contextlib.suppress(OSError, ValueError, IndexError):
            src, pid = m.read_text().rsplit(" ", 1)
            names.append(f"{src} (pid {pid})")
    return ", ".join(names) or "unknown"


def _run_pool(tasks: list, workers: int, done: Callable[[int, dict], None], out_dir: Path):
    """Run ``tasks`` in ``workers`` processes, calling ``done`` as each finishes. A dead
    worker (SIGKILL, the out-of-memory killer) stops the run with a TrainingError naming
    the clips that were being prepared; a StorageError stops it at once."""
    # not fork: a decord reader inherited from this process and freed in a child
    # hangs it (see dataset._release_frames); the fork server starts clean
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":  # workers fork from a server that imported us
        ctx.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(min(workers, len(tasks)), ctx, initializer=_init_worker)
    try:
        futures = [pool.submit(_run_job, t) for t in tasks]
        for f in as_completed(futures):
            done(*f.result())
    except BrokenProcessPool as e:
        pool.shutdown(wait=True)  # every worker stopped: no marker changes any more
        raise TrainingError(
            "a prepare worker process died (killed: out of memory, or a signal); the clips "
            f"being prepared then, one of them by that worker: {_running(out_dir)}; finished "
            "clips are kept: run prepare "
            "again to resume (with fewer --workers if memory ran out)"
        ) from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_all(jobs: list[Job], out_dir: Path, settings: PrepareSettings, workers: int,
             progress: bool) -> tuple[dict[int, dict], int]:  # fmt: skip
    """Every job's result ({job: result}) and how many were finished before."""
    try:
        (out_dir / RUNNING_DIR).mkdir(parents=True, exist_ok=True)
        (out_dir / "clips").mkdir(exist_ok=True)
    except OSError as e:
        raise _write_failed(Path(e.filename or out_dir), e) from e
    for stale in [*(out_dir / "clips").glob("*.tmp-*"), *(out_dir / RUNNING_DIR).glob("*")]:
        with contextlib.suppress(OSError):  # left by an interrupted run
            stale.unlink()
    results: dict[int, dict] = {}
    tasks = [(i, j, out_dir, settings) for i, j in enumerate(jobs)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(jobs), unit="clip", desc="prepare", file=sys.stderr, dynamic_ncols=True
        )
    counts = collections.Counter()

    def done(i: int, r: dict) -> None:
        results[i] = r
        counts[r["status"]] += 1
        if bar is not None:
            bar.set_postfix(unusable=counts["bad"], done_before=counts["done_before"],
                            refresh=False)  # fmt: skip
            bar.update()

    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker()
            for t in tasks:
                done(*_run_job(t))
        else:
            _run_pool(tasks, workers, done, out_dir)
    finally:
        if bar is not None:
            bar.close()
    with contextlib.suppress(OSError):  # empty unless a worker died
        (out_dir / RUNNING_DIR).rmdir()
    return results, counts["done_before"]


# ------------------------------------------------------------------ a dataset
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from e


def _manifest_rows(records, which, jobs, results) -> list[dict]:
    """One manifest row per usable record, in the input order."""
    rows = []
    for rec, ji in zip(records, which):
        r, job = results[ji], jobs[ji]
        if r["status"] == "bad":
            continue
        off = r["offset_s"]

        def shift(v, off=off, cut=job.cut):
            return v if cut is None or v is None else max(v - off, 0.0)

        start, end = shift(rec.start_s), shift(rec.end_s)
        rows.append({
            "path": f"{job.name}.mp4", "clip_id": rec.clip_id,
            "label": rec.label if rec.label is not None else "",
            "verb": "" if rec.verb is None else rec.verb,
            "noun": "" if rec.noun is None else rec.noun,
            "start_s": "" if start is None else f"{start:.6f}",
            "end_s": "" if end is None else f"{end:.6f}",
            "split": rec.split or "", "source": rec.path, "offset_s": f"{off:.6f}" if job.cut else "",
        })  # fmt: skip
    return rows


def _report(records, rows, jobs, results, settings, out_dir, n_before, t0) -> dict:
    unusable, no_audio = {}, []
    for i, job in enumerate(jobs):
        r = results[i]
        if r["status"] == "bad":
            unusable.setdefault(r["kind"], []).append(
                {"path": job.src, "cut": job.cut, "clip_ids": job.clip_ids, "reason": r["reason"]}
            )
        elif "no_audio" in r.get("warnings", ()):
            no_audio.append({"path": job.src, "clip_ids": job.clip_ids})
            if r.get("audio_error"):  # an audio track or sidecar that cannot be read
                no_audio[-1]["reason"] = r["audio_error"]
    good = [results[i] for i in range(len(jobs)) if results[i]["status"] != "bad"]
    src_bytes = sum(
        os.path.getsize(j.src) for j in {j.src: j for j in jobs}.values() if os.path.isfile(j.src)
    )

    def files(*ends):
        return sum(s for r in good for f, s in r["files"].items() if f.endswith(ends))

    return {
        "out_dir": str(out_dir),
        "manifest": MANIFEST_NAME,
        "settings": asdict(settings),
        "records": len(records),
        "records_written": len(rows),
        "clips": len(jobs),
        "prepared": sum(r["status"] == "prepared" for r in results.values()),
        "done_before": n_before,
        "unusable_counts": {k: len(v) for k, v in sorted(unusable.items())},
        "unusable": dict(sorted(unusable.items())),
        "warnings": {"no_audio": no_audio},
        "bytes": {
            "prepared": files(""),
            "video": files(".mp4"),
            "audio": files(".wav", ".flac"),
            "sources": src_bytes,
        },
        "seconds": time.perf_counter() - t0,
    }


def prepare_dataset(
    records: Sequence[ClipRecord],
    out_dir: str | os.PathLike,
    settings: PrepareSettings,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Prepare every record into ``out_dir`` (see the module docstring); returns the report.

    ``records[i].split`` goes to the manifest's split column. Unusable inputs are
    reported, never raised; ``workers`` processes share the clips. One run at a time
    per ``out_dir`` (temporary files of an interrupted run are removed at the start).
    An output that cannot be written (no space, read-only, no permission, a file where
    a folder should be) raises :class:`~mmt_fast.errors.StorageError` naming it, at
    once; a worker that dies raises :class:`~mmt_fast.errors.TrainingError` naming the
    clips being prepared.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_failed(out_dir, e) from e
    t0 = time.perf_counter()
    jobs, which = plan_jobs(records, settings.margin_s)
    results, n_before = _run_all(jobs, out_dir, settings, workers, progress)
    rows = _manifest_rows(records, which, jobs, results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _atomic_write(out_dir / MANIFEST_NAME, buf.getvalue())
    report = _report(records, rows, jobs, results, settings, out_dir, n_before, t0)
    _atomic_write(out_dir / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    b = report["bytes"]
    bad_txt = ", ".join(f"{k} {v}" for k, v in report["unusable_counts"].items()) or "none"
    no_audio = report["warnings"]["no_audio"]
    log(
        f"prepared {report['prepared']} clips, {n_before} finished before, unusable: {bad_txt}"
        + (f", without audio (kept): {len(no_audio)}" if no_audio else "")
        + f" ({report['seconds']:.1f} s); report: {out_dir / REPORT_NAME}"
    )
    log(
        f"disk: {_fmt_bytes(b['prepared'])} in {out_dir} (video {_fmt_bytes(b['video'])}, "
        f"audio {_fmt_bytes(b['audio'])}; sources {_fmt_bytes(b['sources'])}); "
        f"manifest: {out_dir / MANIFEST_NAME} ({len(rows)} rows)"
    )
    return report
