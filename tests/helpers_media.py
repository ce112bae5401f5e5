"""Helpers that write real media files for the data tests (no mocks)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from mmt_fast.data.synthetic import render_clip, write_clip

SR = 16000


def flash_click_clip(
    path: Path,
    event_frames: list[int],
    num_frames: int = 60,
    fps: int = 10,
    size: tuple[int, int] = (32, 48),
    audio: bool = True,
) -> Path:
    """Black frames with a white frame at each event frame; silent audio with a 10 ms click
    centred in each event frame's time span ``[(f + 0.5) / fps - 5 ms, ...)``."""
    h, w = size
    frames = np.zeros((num_frames, h, w, 3), np.uint8)
    x = np.zeros(int(num_frames / fps * SR), np.float32)
    for f in event_frames:
        frames[f] = 255
        c = int((f + 0.5) / fps * SR)
        x[c - 80 : c + 80] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(160) / SR)
    write_clip(path, frames, fps, x if audio else None, SR)
    return path


def solid_clip(path: Path, rgb: tuple[int, int, int], num_frames: int = 12, fps: int = 10) -> Path:
    frames = np.broadcast_to(np.array(rgb, np.uint8), (num_frames, 32, 32, 3))
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(num_frames / fps * SR)) / SR)
    write_clip(path, frames, fps, tone.astype(np.float32), SR)
    return path


def synthetic_clip(
    path: Path,
    motion: int = 0,
    pitch: int = 0,
    seed: int = 0,
    duration: float = 2.0,
    fps: int = 10,
    audio: bool = True,
) -> Path:
    """A small synthetic clip (32 px); ``audio=False`` writes no audio track."""
    frames, x, _ = render_clip(motion, pitch, np.random.default_rng(seed), 32, duration, fps, SR)
    write_clip(path, frames, fps, x if audio else None, SR)
    return path


def truncate(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    """Mono PCM16 wav."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


def timed_clip(
    path: Path,
    frame_times: list[float],
    event_frames: list[int],
    audio_start: float = 0.0,
    channels: int = 1,
    fmt: str | None = None,
    sample_rate: int = SR,
    size: tuple[int, int] = (32, 64),
) -> Path:
    """A flash-and-click clip written with PyAV with explicit timestamps: frame ``k`` shows
    at ``frame_times[k]`` (variable frame rate allowed, millisecond time base), white at
    the event frames; the audio track starts at ``audio_start`` s and clicks at the middle
    of each event frame's display interval. With ``channels=2`` the right channel is
    half the left (mono = mean of the channels)."""
    import fractions

    import av

    h, w = size
    dur = frame_times[-1] + (frame_times[-1] - frame_times[-2])
    ends = [*frame_times[1:], dur]
    x = np.zeros(int(dur * sample_rate) + 1, np.float32)
    for f in event_frames:
        c = int((frame_times[f] + ends[f]) / 2 * sample_rate)
        x[c - 80 : c + 80] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(160) / sample_rate)
    layout = "stereo" if channels == 2 else "mono"
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream("libx264", rate=1000)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "20", "threads": "1"}
        vs.codec_context.time_base = fractions.Fraction(1, 1000)
        as_ = c.add_stream("aac", rate=sample_rate)
        as_.layout = layout
        for k, t in enumerate(frame_times):
            img = np.full((h, w, 3), 255 if k in event_frames else 0, np.uint8)
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            fr.pts, fr.time_base = round(t * 1000), fractions.Fraction(1, 1000)
            for p in vs.encode(fr):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        s0 = int(audio_start * sample_rate)
        for s in range(s0, len(x), 1024):
            seg = x[None, s : s + 1024]
            if channels == 2:
                seg = np.concatenate([seg, 0.5 * seg])
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(seg), format="fltp", layout=layout)
            fr.sample_rate, fr.pts = sample_rate, s
            fr.time_base = fractions.Fraction(1, sample_rate)
            for p in as_.encode(fr):
                c.mux(p)
        for p in as_.encode():
            c.mux(p)
    return path
