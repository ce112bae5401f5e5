"""Audio loading, AST-style log-mel filterbanks, SpecAugment, and window alignment.

Source of the audio: ``<stem>.wav`` beside the video when it exists (read with
the standard-library ``wave`` module, PCM 8/16/24/32-bit, seeking to the window,
so long Epic-Kitchens videos are cheap when their audio has been extracted),
otherwise the video container's own audio track, decoded whole by decord's
``AudioReader`` (resampled to mono 16 kHz by decord). Other sample rates are
resampled with ``torchaudio.functional.resample``.

Features follow AST's ``dataloader.py`` (Gong et al.): waveform minus its mean,
``torchaudio.compliance.kaldi.fbank(htk_compat=True, sample_frequency=16000,
use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
frame_shift=10)`` (25 ms window, 10 ms hop: ``target_length`` frames need
``(target_length - 1) * 160 + 400`` samples), zero-padded or cropped to
``target_length`` frames; SpecAugment (frequency then time masking, training
only) before the normalisation ``(fbank - mean) / (2 * std)`` with AudioSet's
``mean = -4.2677393``, ``std = 4.5689974``, as AST does.

Alignment with the video: the audio window (``span = ((target_length - 1) * 160
+ 400) / 16000`` s) is centred on the centre ``c`` of the video window:
``ws = c - span / 2``. With ``align="shift"`` (default) it is then moved by the
least amount that makes it cover as much of the clip's audio as possible, i.e.
``ws`` is clamped to ``[min(a0, a1 - span), max(a0, a1 - span)]`` for the clip's
audio ``[a0, a1)``: no shift when the centred window lies inside the clip's audio
or already covers all of it; for a 10 s VGGSound clip and the default 10.24 s
window this always covers the whole clip, as AST does. With ``align="center"``
the window stays centred and the parts outside the clip are zero frames. Either
way the fbank frames of the clip's audio are computed from the samples inside
the window and placed at their own time offset; frames outside the clip's audio
are zeros (AST pads the fbank with zeros, not the waveform).
"""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio

from .errors import BadClipError

SAMPLE_RATE = 16000
HOP = 160  # samples per fbank frame shift (10 ms)
WIN = 400  # samples per fbank frame (25 ms)
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def window_samples(target_length: int, hop: int = HOP, win: int = WIN) -> int:
    """Samples needed for exactly ``target_length`` fbank frames."""
    return (target_length - 1) * hop + win


class AudioSource:
    """Mono audio of one file at ``sample_rate``; ``read(a, b)`` returns samples ``[a, b)``."""

    path: str
    sample_rate: int
    num_samples: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    def read(self, a: int, b: int) -> np.ndarray:
        raise NotImplementedError


class _ArraySource(AudioSource):
    def __init__(self, path: str, samples: np.ndarray, sample_rate: int) -> None:
        self.path, self.samples, self.sample_rate = path, samples, sample_rate
        self.num_samples = len(samples)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.samples[max(a, 0) : max(b, 0)]


class _WavSource(AudioSource):
    """PCM wav read by seeking; resampled per read when the file rate differs."""

    def __init__(self, path: str, sample_rate: int) -> None:
        self.path, self.sample_rate = path, sample_rate
        try:
            with wave.open(path, "rb") as w:
                self._rate, self._channels = w.getframerate(), w.getnchannels()
                self._width, self._frames = w.getsampwidth(), w.getnframes()
        except (wave.Error, EOFError) as e:
            raise BadClipError(path, f"cannot read wav file: {e}", "corrupt_file") from e
        self.num_samples = int(self._frames * sample_rate // self._rate)

    def read(self, a: int, b: int) -> np.ndarray:
        ra = max(0, int(a * self._rate // self.sample_rate))
        rb = min(self._frames, int(-(-b * self._rate // self.sample_rate)))
        if rb <= ra:
            return np.zeros(0, np.float32)
        with wave.open(self.path, "rb") as w:
            w.setpos(ra)
            raw = w.readframes(rb - ra)
        x = _pcm_to_float(raw, self._width).reshape(-1, self._channels).mean(1)
        if self._rate != self.sample_rate:
            x = torchaudio.functional.resample(
                torch.from_numpy(x), self._rate, self.sample_rate
            ).numpy()
        return x[: max(b - a, 0)]


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    if width == 4:
        return np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    raise ValueError(f"unsupported PCM sample width {width}")


def sidecar_wav(path: str) -> str | None:
    """``<stem>.wav`` beside ``path`` if it exists."""
    p = Path(path).with_suffix(".wav")
    return str(p) if p.is_file() and p != Path(path) else None


def open_audio(path: str, sample_rate: int = SAMPLE_RATE) -> AudioSource:
    """Open the audio of a clip (sidecar wav, else the container's audio track)."""
    wav = sidecar_wav(path)
    if wav is not None:
        return _WavSource(wav, sample_rate)
    if path.lower().endswith(".wav"):
        if not os.path.isfile(path):
            raise BadClipError(path, "file does not exist", "missing_file")
        return _WavSource(path, sample_rate)
    if not os.path.isfile(path):
        raise BadClipError(path, "file does not exist", "missing_file")
    import decord

    try:
        ar = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
        samples = ar[:].asnumpy()[0].astype(np.float32, copy=False)
    except Exception as e:
        msg = str(e)
        if "audio stream" in msg.lower():
            raise BadClipError(
                path, "no audio track in the file and no .wav beside it", "no_audio"
            ) from e
        last = msg.strip().splitlines()[-1] if msg.strip() else type(e).__name__
        raise BadClipError(path, f"cannot decode audio: {last}", "corrupt_file") from e
    if samples.size == 0:
        raise BadClipError(path, "audio track is empty", "no_audio")
    return _ArraySource(path, samples, sample_rate)


def fbank(
    waveform: torch.Tensor, num_mel_bins: int = 128, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """AST's Kaldi fbank: waveform (N,) float -> (frames, num_mel_bins), frames = 1 + (N - 400) // 160."""
    w = waveform.float().reshape(1, -1)
    w = w - w.mean()
    return torchaudio.compliance.kaldi.fbank(
        w,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )


def window_start(
    centre_s: float, span_s: float, clip_start_s: float, clip_end_s: float, align: str = "shift"
) -> float:
    """Start (s) of the audio window centred on ``centre_s`` (see module docstring)."""
    ws = centre_s - span_s / 2
    if align == "center":
        return ws
    if align != "shift":
        raise ValueError(f"align must be 'shift' or 'center', got {align!r}")
    lo, hi = sorted((clip_start_s, clip_end_s - span_s))
    return min(max(ws, lo), hi)


def window_fbank(
    src: AudioSource,
    ws_s: float,
    clip_start_s: float,
    clip_end_s: float,
    target_length: int = 1024,
    num_mel_bins: int = 128,
) -> torch.Tensor:
    """Fbank of the window starting at ``ws_s`` s -> (target_length, num_mel_bins), unnormalised.

    Only audio inside ``[clip_start_s, clip_end_s)`` is used; frames without
    audio are zeros. The first frame covers samples ``[ws, ws + 400)``.
    """
    sr = src.sample_rate
    n_win = window_samples(target_length)
    ws = round(ws_s * sr)
    a = max(ws, round(clip_start_s * sr), 0)
    b = min(ws + n_win, round(clip_end_s * sr), src.num_samples)
    out = torch.zeros(target_length, num_mel_bins)
    if b - a < WIN:
        return out
    x = torch.from_numpy(np.ascontiguousarray(src.read(a, b), dtype=np.float32))
    if x.numel() < WIN:
        return out
    fb = fbank(x, num_mel_bins, sr)
    off = round((a - ws) / HOP)
    n = min(fb.shape[0], target_length - off)
    if n > 0:
        out[off : off + n] = fb[:n]
    return out


def spec_augment(spec: torch.Tensor, freqm: int, timem: int) -> torch.Tensor:
    """SpecAugment on (1, F, T): torchaudio FrequencyMasking(freqm) then TimeMasking(timem)."""
    if freqm > 0:
        spec = torchaudio.transforms.FrequencyMasking(freqm)(spec)
    if timem > 0:
        spec = torchaudio.transforms.TimeMasking(timem)(spec)
    return spec


def normalize_fbank(spec: torch.Tensor, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD):
    """AST normalisation ``(x - mean) / (2 * std)``."""
    return (spec - mean) / (std * 2)
