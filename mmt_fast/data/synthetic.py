"""Synthetic audio-video classification data: real mp4 files (H.264 + AAC) and a manifest.

The task needs both modalities. A class is a pair (motion, pitch):

- video factor: the direction a square moves in (``right``, ``left``, ``down``,
  ``up``; the first ``n_video`` of them), wrapping around the frame edges;
- audio factor: the pitch band of a tone (about 300, 700, 1600, 3600 Hz; the
  first ``n_audio``).

Clip ``i`` has class ``c = i % num_classes``, motion ``c // n_audio`` and pitch
``c % n_audio``; its label names both, e.g. ``right-300Hz`` (:func:`class_name`),
and ``num_classes = n_video * n_audio`` (default 4 = 2 x 2). Video alone cannot tell the pitch and audio alone cannot
tell the motion, so either modality alone is right at best ``1 / n_audio`` or
``1 / n_video`` of the time (50% at 2 x 2); both together can reach 100%.
Nuisances: background colour and per-frame pixel noise, square size, colour,
position and speed; tone frequency (+-8% within its band), amplitude, phase,
tremolo, and white noise.

Output in ``out_dir``: ``clip_00000.mp4`` ... , ``manifest.csv`` with header
``path,label,split,motion,pitch_hz`` (paths relative to ``out_dir``, split
``train``/``val``/``test``, ``pitch_hz`` the tone's exact frequency), ``classes.json``
(a :class:`ClassIndex` of the sorted labels, the order training uses) and
``synthetic.json`` (settings and class factors).
Read it with ``read_manifest(out_dir / "manifest.csv", split="train")``.
Defaults (64 px, 4 s, 16 fps = 64 frames) allow 16 frames at stride 4.
"""

from __future__ import annotations

import argparse
import csv
import fractions
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmt_fast.errors import ConfigError

from .manifests import ClassIndex

MOTIONS: tuple[str, ...] = ("right", "left", "down", "up")
MOTION_VECTORS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (dy, dx)
PITCHES_HZ: tuple[float, ...] = (300.0, 700.0, 1600.0, 3600.0)


def class_name(motion: int, pitch: int) -> str:
    """The label of (motion index, pitch band index), e.g. ``right-300Hz``."""
    return f"{MOTIONS[motion]}-{PITCHES_HZ[pitch]:.0f}Hz"


def write_clip(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = 20,
) -> None:
    """Write uint8 frames (T, H, W, 3) as H.264 and, if given, mono float audio (N,) as AAC.

    ``audio=None`` writes a file without an audio track. H and W must be even.
    """
    frames = np.asarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=int(fps))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": str(crf), "threads": "1"}
        as_ = None
        if audio is not None:
            as_ = c.add_stream("aac", rate=sample_rate)
            as_.layout = "mono"
        for i in range(t):
            for p in vs.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if as_ is not None:
            x = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
            chunk = 1024
            for s in range(0, len(x), chunk):
                fr = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(x[None, s : s + chunk]), format="fltp", layout="mono"
                )
                fr.sample_rate, fr.pts = sample_rate, s
                fr.time_base = fractions.Fraction(1, sample_rate)
                for p in as_.encode(fr):
                    c.mux(p)
            for p in as_.encode():
                c.mux(p)


def factorize(num_classes: int) -> tuple[int, int]:
    """``num_classes`` -> (n_video, n_audio), both in [2, 4], n_video >= n_audio when possible."""
    for nv in range(math.isqrt(num_classes), 5):
        if nv >= 2 and num_classes % nv == 0 and 2 <= num_classes // nv <= 4:
            na = num_classes // nv
            return max(nv, na), min(nv, na)
    raise ConfigError(f"num_classes={num_classes} must be n_video * n_audio with both in 2..4")


def render_clip(
    motion: int,
    pitch: int,
    rng: np.random.Generator,
    size: int = 64,
    duration: float = 4.0,
    fps: int = 16,
    sample_rate: int = 16000,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One clip: frames (T, size, size, 3) uint8, audio (N,) float32 and the tone frequency (Hz)."""
    t = round(duration * fps)
    dy, dx = MOTION_VECTORS[MOTIONS[motion]]
    bg = rng.uniform(0, 100, 3)
    side = int(rng.integers(size // 8, size // 4 + 1))
    colour = rng.uniform(150, 255, 3)
    speed = rng.uniform(1.0, 2.5) * size / 64  # pixels per frame
    y0, x0 = rng.uniform(0, size, 2)
    frames = np.empty((t, size, size, 3), np.float32)
    ar = np.arange(side)
    for i in range(t):
        img = bg + rng.normal(0, 6, (size, size, 3))
        y = int(y0 + dy * speed * i) % size
        x = int(x0 + dx * speed * i) % size
        img[np.ix_((y + ar) % size, (x + ar) % size)] = colour
        frames[i] = img
    n = round(duration * sample_rate)
    ts = np.arange(n) / sample_rate
    freq = PITCHES_HZ[pitch] * rng.uniform(0.92, 1.08)
    amp = rng.uniform(0.1, 0.4)
    tremolo = 1.0 - 0.3 * (1 + np.sin(2 * np.pi * rng.uniform(0.5, 4.0) * ts + rng.uniform(0, 6.3)))
    audio = amp * tremolo * np.sin(2 * np.pi * freq * ts + rng.uniform(0, 2 * np.pi))
    audio = audio + rng.uniform(0.005, 0.03) * rng.standard_normal(n)
    return np.clip(frames, 0, 255).astype(np.uint8), audio.astype(np.float32), float(freq)


def _split_of(group: int, num_groups: int, val_frac: float, test_frac: float) -> str:
    # at least one round each for val and test once there are 3 rounds
    n_test = max(round(test_frac * num_groups), int(test_frac > 0 and num_groups >= 3))
    n_val = max(round(val_frac * num_groups), int(val_frac > 0 and num_groups >= 3))
    if group >= num_groups - n_test:
        return "test"
    if group >= num_groups - n_test - n_val:
        return "val"
    return "train"


def make_synthetic(
    out_dir: str | os.PathLike,
    num_clips: int = 64,
    seed: int = 0,
    size: int = 64,
    duration: float = 4.0,
    fps: int = 16,
    num_classes: int = 4,
    sample_rate: int = 16000,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
) -> Path:
    """Write ``num_clips`` clips and the manifest into ``out_dir``; returns the manifest path.

    Clip ``i`` has class ``i % num_classes`` (balanced); clips are split in whole
    rounds of ``num_classes`` so each split is balanced too.
    """
    if size % 2:
        raise ConfigError("size must be even (yuv420p)")
    n_video, n_audio = factorize(num_classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups = -(-num_clips // num_classes)
    rows = []
    for i in range(num_clips):
        label = i % num_classes
        motion, pitch = divmod(label, n_audio)
        frames, audio, freq = render_clip(motion, pitch, rng, size, duration, fps, sample_rate)
        name = f"clip_{i:05d}.mp4"
        write_clip(out / name, frames, fps, audio, sample_rate)
        split = _split_of(i // num_classes, groups, val_frac, test_frac)
        rows.append([name, class_name(motion, pitch), split, MOTIONS[motion], f"{freq:.1f}"])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "motion", "pitch_hz"])
        w.writerows(rows)
    names = [class_name(*divmod(c, n_audio)) for c in range(num_classes)]
    ClassIndex.from_labels(names).save(out / "classes.json")
    meta = {
        "num_clips": num_clips,
        "seed": seed,
        "size": size,
        "duration": duration,
        "fps": fps,
        "sample_rate": sample_rate,
        "num_classes": num_classes,
        "n_video": n_video,
        "n_audio": n_audio,
        "classes": {
            names[c]: {"motion": MOTIONS[c // n_audio], "pitch_hz": PITCHES_HZ[c % n_audio]}
            for c in range(num_classes)
        },
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=1) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``mmt-fast make-synthetic --out DIR [--num-clips N] ...``."""
    p = argparse.ArgumentParser(
        prog="mmt-fast make-synthetic",
        description="Write a synthetic audio-video dataset (label = motion x pitch).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-clips", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame height and width (px, even)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per clip")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=4, help="n_video x n_audio, each 2..4")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--val-frac", type=float, default=0.15)
    p.add_argument("--test-frac", type=float, default=0.15)
    a = p.parse_args(argv)
    manifest = make_synthetic(
        a.out, a.num_clips, a.seed, a.size, a.duration, a.fps, a.num_classes,
        a.sample_rate, a.val_frac, a.test_frac,
    )  # fmt: skip
    print(f"wrote {a.num_clips} clips and {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
