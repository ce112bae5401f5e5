"""Audio loading, AST-style log-mel filterbanks, SpecAugment, and window alignment.

Source of the audio: ``<stem>.wav`` (or ``<stem>.flac``) beside the video when it
exists and can be read (soundfile: PCM 8/16/24/32-bit, float, WAVE_FORMAT_EXTENSIBLE, any channel
count; read by seeking to the window, so long Epic-Kitchens videos are cheap
when their audio has been extracted; it is taken to start with the video),
otherwise the file's own audio track, decoded with PyAV over the window only
(seek, then decode) and placed by its timestamps: the clip's time axis starts at
the first video frame (decord's frame timestamps use the same origin), so an
audio track that starts 1 s after the video is padded by 1 s of silence (fbank
zeros) and one that starts earlier is trimmed. A sidecar that fails to read
falls back to the file's own track. Channels are always averaged (mono = mean of
the channels, for container audio and wavs alike); other sample rates are
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

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torchaudio

from mmt_fast.errors import ConfigError

from .errors import BadClipError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP = 160  # samples per fbank frame shift (10 ms)
WIN = 400  # samples per fbank frame (25 ms)
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def window_samples(target_length: int, hop: int = HOP, win: int = WIN) -> int:
    """Samples needed for exactly ``target_length`` fbank frames."""
    return (target_length - 1) * hop + win


class AudioSource:
    """Mono audio of one file at ``sample_rate`` on the clip's time axis.

    ``read(a, b)`` returns samples ``[a, b)`` (sample ``k`` is at time ``k / sample_rate``
    on the clip's axis, whose 0 is the first video frame, see the module docstring);
    audio exists on ``[start_sample, num_samples)``; the caller reads inside it.
    """

    path: str
    sample_rate: int
    num_samples: int
    start_sample: int = 0

    @property
    def duration(self) -> float:
        """End of the audio (s) on the clip's time axis."""
        return self.num_samples / self.sample_rate

    @property
    def start(self) -> float:
        """Start of the audio (s) on the clip's time axis."""
        return self.start_sample / self.sample_rate

    def read(self, a: int, b: int) -> np.ndarray:
        raise NotImplementedError


class _ArraySource(AudioSource):
    def __init__(self, path: str, samples: np.ndarray, sample_rate: int) -> None:
        self.path, self.samples, self.sample_rate = path, samples, sample_rate
        self.num_samples = len(samples)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.samples[max(a, 0) : max(b, 0)]


class _SpanSource(AudioSource):
    """Samples ``[lo, hi)`` of another source held in memory (same time axis)."""

    def __init__(self, src: AudioSource, lo: int, hi: int) -> None:
        self.path, self.sample_rate = src.path, src.sample_rate
        self.start_sample, self.num_samples = src.start_sample, src.num_samples
        self.lo = lo
        self.samples = np.ascontiguousarray(src.read(lo, hi), dtype=np.float32)

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.zeros(max(b - a, 0), np.float32)
        i0, i1 = max(a, self.lo), min(b, self.lo + len(self.samples))
        if i1 > i0:
            out[i0 - a : i1 - a] = self.samples[i0 - self.lo : i1 - self.lo]
        return out


def preload(src: AudioSource, lo: int, hi: int) -> AudioSource:
    """Read samples ``[lo, hi)`` of ``src`` (clamped to its audio) once, for several windows."""
    lo, hi = max(lo, src.start_sample, 0), min(hi, src.num_samples)
    return _SpanSource(src, lo, max(hi, lo))


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return x
    return torchaudio.functional.resample(torch.from_numpy(x), rate, target).numpy()


WAV_START_TAG = "mmt-fast audio_start_s="  # the comment `mmt-fast prepare` writes


class _WavSource(AudioSource):
    """A wav file read with soundfile by seeking (PCM 8/16/24/32-bit, float 32/64,
    WAVE_FORMAT_EXTENSIBLE, any number of channels, averaged); it starts at time 0,
    or at ``s`` seconds when its comment (LIST/INFO ICMT chunk) is
    ``mmt-fast audio_start_s=s`` (a sidecar written by ``mmt-fast prepare`` from a
    track that starts after the video: the samples before it are "no audio", as
    for the container's own track, not silence).
    With ``data`` (the file's bytes) it reads from memory; FLAC reads the same way."""

    def __init__(self, path: str, sample_rate: int, data: bytes | None = None) -> None:
        import soundfile

        self.path, self.sample_rate, self._data = path, sample_rate, data
        try:
            with soundfile.SoundFile(self._src()) as f:
                rate, frames, comment = int(f.samplerate), int(f.frames), f.comment or ""
        except Exception as e:  # soundfile.LibsndfileError / RuntimeError
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BadClipError(path, f"cannot read wav file: {msg}", "corrupt_file") from e
        self._rate, self._frames = rate, frames
        if self._frames <= 0:
            raise BadClipError(path, "wav file holds no samples", "no_audio")
        start = 0.0
        if comment.startswith(WAV_START_TAG):
            try:
                start = float(comment[len(WAV_START_TAG) :].split()[0])
            except (ValueError, IndexError):
                raise BadClipError(path, f"bad start tag {comment!r}", "corrupt_file") from None
        self.start_sample = max(round(start * sample_rate), 0)
        self.num_samples = self.start_sample + int(self._frames * sample_rate // self._rate)

    def _src(self):
        return self.path if self._data is None else io.BytesIO(self._data)

    def read(self, a: int, b: int) -> np.ndarray:
        if self.start_sample:  # clip axis -> file axis; zeros before the file's first sample
            out = np.zeros(max(b - a, 0), np.float32)
            s = self.start_sample
            if b > s:
                x = self._read(max(a, s) - s, b - s)
                out[max(a, s) - a : max(a, s) - a + len(x)] = x
            return out
        return self._read(a, b)

    def _read(self, a: int, b: int) -> np.ndarray:
        import soundfile

        # read a little more on both sides so the resampling filter sees real neighbours
        margin = 64 if self._rate != self.sample_rate else 0
        ra = max(0, int(a * self._rate // self.sample_rate) - margin)
        rb = min(self._frames, int(-(-b * self._rate // self.sample_rate)) + margin)
        if rb <= ra:
            return np.zeros(0, np.float32)
        try:
            x, _ = soundfile.read(
                self._src(), frames=rb - ra, start=ra, dtype="float32", always_2d=True
            )
        except Exception as e:
            raise BadClipError(self.path, f"cannot read wav file: {e}", "corrupt_file") from e
        x = _resample(np.ascontiguousarray(x.mean(1)), self._rate, self.sample_rate)
        skip = max(round(a - ra * self.sample_rate / self._rate), 0)
        return x[skip : skip + max(b - a, 0)]


class ContainerAudio(AudioSource):
    """The audio track of a media file, decoded with PyAV only over the span asked for.

    Time axis: 0 is the start of the first video stream when the file has one (the
    origin of decord's frame timestamps), else of the audio stream; each decoded
    audio frame is placed by its own timestamp, so an audio track that starts late
    (or early) lands where it plays. Channels are averaged; the file's rate is
    resampled to ``sample_rate`` with ``torchaudio.functional.resample``.
    """

    # s decoded before the span: the first frame after a seek decodes as silence (AAC,
    # Opus and Vorbis frames overlap their predecessor); 0.3 s covers 2048-sample frames
    SEEK_MARGIN = 0.3

    def __init__(
        self, path: str, sample_rate: int = SAMPLE_RATE, data: bytes | None = None
    ) -> None:
        self.path, self.sample_rate, self._data = path, sample_rate, data
        self._open()
        st = self._c.streams.audio[0]
        self._st = st
        self._rate = int(st.codec_context.sample_rate or st.rate or 0)
        if self._rate <= 0:
            raise BadClipError(path, "audio track has no sample rate", "corrupt_file")
        origin_stream = self._c.streams.video[0] if self._c.streams.video else st
        self._origin = _stream_start(origin_stream)
        self._a0 = _stream_start(st)
        a0 = self._a0 - self._origin
        dur = _stream_duration(self._c, st)
        if dur is None or dur <= 0:
            raise BadClipError(path, "audio track has no duration (empty or corrupt)", "no_audio")
        self.start_sample = round(a0 * sample_rate)
        self.num_samples = round((a0 + dur) * sample_rate)

    def _open(self) -> None:
        import av

        path = self.path
        self._fresh = True  # nothing decoded yet: the first frame decodes exactly
        try:
            self._c = av.open(path if self._data is None else io.BytesIO(self._data))
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BadClipError(
                path, f"cannot open file (truncated or corrupt?): {msg}", "corrupt_file"
            ) from e
        if not self._c.streams.audio:
            self._c.close()
            raise BadClipError(path, "no audio track in the file and no .wav beside it", "no_audio")
        self._st = self._c.streams.audio[0]

    def close(self) -> None:
        self._c.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._c.close()

    def read(self, a: int, b: int) -> np.ndarray:
        """Samples ``[a, b)`` at ``sample_rate``; zeros where the file has no audio.

        Each gapless run of decoded frames is averaged over its channels (the mean,
        not swresample's downmix), resampled in one call to FFmpeg's swresample and
        placed by its timestamp."""
        sr = self.sample_rate
        n_out = max(b - a, 0)
        out = np.zeros(n_out, np.float32)
        if n_out == 0:
            return out
        t0, t1 = a / sr, b / sr  # clip time
        target = t0 - self.SEEK_MARGIN + self._origin  # container time
        runs: list[tuple[int, list[np.ndarray]]] = []  # (first pts, planar arrays) per gapless run
        next_pts = None
        try:
            if target <= self._a0:  # from the start: decode from a fresh open, never seek
                if not self._fresh:
                    self._c.close()
                    self._open()
            else:
                self._c.seek(int(target / self._st.time_base), stream=self._st, backward=True)
            self._fresh = False
            st, tb = self._st, float(self._st.time_base)  # floats: Fractions cost per frame
            scale = tb * self._rate  # stream time base -> native samples
            stop = (t1 + 0.05 + self._origin) / tb
            for fr in self._c.decode(st):
                if fr.pts is None:
                    continue
                if fr.pts >= stop:
                    break
                x = fr.to_ndarray()
                if not fr.format.is_planar:
                    x = x.reshape(-1, len(fr.layout.channels)).T
                p = round(fr.pts * scale)
                if next_pts is None or abs(p - next_pts) > 1:
                    runs.append((p, []))
                runs[-1][1].append(_to_float(x))
                next_pts = p + x.shape[1]
            got_end = t0
            origin = round(self._origin * sr)
            for p0, parts in runs:  # one swresample call per gapless run
                mono = np.concatenate(parts, 1).mean(0, keepdims=True)  # mean, then resample
                for g in _resample_run(mono, self._rate, sr, p0):
                    x = g.to_ndarray()[0]
                    i0 = g.pts - origin - a  # g.pts counts samples at sr (container time)
                    lo, hi = max(i0, 0), min(i0 + len(x), n_out)
                    if hi > lo:
                        out[lo:hi] = x[lo - i0 : hi - i0]
                    got_end = max(got_end, (g.pts - origin + len(x)) / sr)
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BadClipError(self.path, f"cannot decode audio: {msg}", "corrupt_file") from e
        want_end = min(t1, self.duration)
        if got_end < want_end - 0.1:
            raise BadClipError(
                self.path,
                f"audio data ends at {got_end:.2f} s but the track lasts {self.duration:.2f} s "
                "(truncated file?)",
                "corrupt_file",
            )
        return out


def _to_float(x: np.ndarray) -> np.ndarray:
    """Decoded samples (float, or integer PCM such as s16/s32/u8) -> float32 in [-1, 1]."""
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    return x.astype(np.float32, copy=False)


def _resample_run(x: np.ndarray, rate: int, sr: int, pts: int) -> list:
    """Mono float (1, N) at ``rate`` starting at sample ``pts`` -> AudioFrames resampled
    by swresample at ``sr`` (pts in samples at ``sr``)."""
    import fractions

    import av

    fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x), format="fltp", layout="mono")
    fr.sample_rate, fr.pts, fr.time_base = rate, pts, fractions.Fraction(1, rate)
    rs = av.AudioResampler(format="fltp", layout="mono", rate=sr)
    return [*rs.resample(fr), *rs.resample(None)]


def _stream_start(st) -> float:
    return float(st.start_time * st.time_base) if st.start_time is not None else 0.0


def _stream_duration(container, st) -> float | None:
    if st.duration is not None and st.duration > 0:
        return float(st.duration * st.time_base)
    if container.duration:  # in microseconds
        return container.duration / 1e6 - _stream_start(st)
    return None


def sidecar_wav(path: str) -> str | None:
    """``<stem>.wav`` (else ``<stem>.flac``) beside ``path`` if it exists."""
    for ext in (".wav", ".flac"):
        p = Path(path).with_suffix(ext)
        if p.is_file() and p != Path(path):
            return str(p)
    return None


def open_audio(
    path: str,
    sample_rate: int = SAMPLE_RATE,
    data: bytes | None = None,
    sidecar: tuple[str, bytes] | None = None,
) -> AudioSource:
    """Open the audio of a clip: the sidecar ``<stem>.wav`` (or ``.flac``) when it exists
    and reads, else the file's own audio track (a failing sidecar never hides a good track).

    From memory (shards): ``data`` holds the file's bytes and ``sidecar`` the
    sidecar's (extension, bytes) or None; ``path`` only names them in messages."""
    if data is None:
        wav = sidecar_wav(path)
        side = None if wav is None else (wav, None)
    else:
        side = (
            None if sidecar is None else (str(Path(path).with_suffix("." + sidecar[0])), sidecar[1])
        )
    sidecar_error = None
    if side is not None:
        try:
            return _WavSource(side[0], sample_rate, side[1])
        except BadClipError as e:
            sidecar_error = e
    if data is None and not os.path.isfile(path):
        if os.path.isdir(path):
            raise BadClipError(path, "is a folder, not a media file", "missing_file")
        raise BadClipError(path, "file does not exist", "missing_file")
    if path.lower().endswith((".wav", ".flac")):
        return _WavSource(path, sample_rate, data)
    try:
        src = ContainerAudio(path, sample_rate, data)
    except BadClipError as e:
        if sidecar_error is not None:
            raise BadClipError(
                path, f"{sidecar_error.reason} ({side[0]}), and {e.reason}", sidecar_error.kind
            ) from e
        raise
    if sidecar_error is not None:
        log.warning("%s: using the file's own audio track", sidecar_error)
    return src


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
        raise ConfigError(f"align must be 'shift' or 'center', got {align!r}")
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
    a = max(ws, round(clip_start_s * sr), src.start_sample, 0)
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


def window_wave(
    src: AudioSource, ws_s: float, clip_start_s: float, clip_end_s: float, target_length: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`window_fbank` computes its fbank from, for :func:`batched_fbank` on the
    training device: ``(wave, span)`` with ``wave`` (N,) float32, N =
    :func:`window_samples`, holding the window's ``L`` usable samples at its start (zeros
    after), and ``span`` = ``(L, offset)`` int64: the fbank frames of those samples go
    to frames ``offset, offset + 1, ...`` of the window (L < 400: no audio, all zeros)."""
    sr = src.sample_rate
    n_win = window_samples(target_length)
    ws = round(ws_s * sr)
    a = max(ws, round(clip_start_s * sr), src.start_sample, 0)
    b = min(ws + n_win, round(clip_end_s * sr), src.num_samples)
    wave = torch.zeros(n_win)
    n = 0
    if b - a >= WIN:
        x = torch.from_numpy(np.ascontiguousarray(src.read(a, b), dtype=np.float32))
        n = x.numel()
        wave[:n] = x
    return wave, torch.tensor([n if n >= WIN else 0, round((a - ws) / HOP)], dtype=torch.int64)


def batched_fbank(
    wave: torch.Tensor,
    span: torch.Tensor,
    target_length: int,
    num_mel_bins: int = 128,
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """:func:`window_fbank` for a batch, on ``wave``'s device: (B, N) waves and (B, 2) spans
    of :func:`window_wave` -> (B, target_length, num_mel_bins).

    The operations of ``torchaudio.compliance.kaldi.fbank`` with :func:`fbank`'s options
    (whose single-waveform API cannot batch), on all windows at once: the mean of each
    clip's usable samples removed; 25 ms frames every 10 ms; each frame's mean removed;
    pre-emphasis 0.97; a symmetric Hann window; the power spectrum of the frame
    zero-padded to 512; torchaudio's mel banks (20 Hz to Nyquist); ``log(max(e, eps))``.
    Frames past the usable samples, or before the offset, are zeros as in
    :func:`window_fbank`. Equal to it within float32 rounding (tested).
    """
    from torchaudio.compliance.kaldi import get_mel_banks

    dev, B, N = wave.device, wave.shape[0], wave.shape[1]
    wave = wave.float()
    length, offset = span[:, 0].to(dev), span[:, 1].to(dev)
    usable = torch.arange(N, device=dev) < length[:, None]
    mean = (wave * usable).sum(1) / length.clamp(min=1)
    x = (wave - mean[:, None]) * usable
    frames = x.unfold(1, WIN, HOP)  # (B, M, 400)
    frames = frames - frames.mean(-1, keepdim=True)
    prev = torch.cat([frames[..., :1], frames[..., :-1]], -1)
    frames = (frames - 0.97 * prev) * torch.hann_window(WIN, periodic=False, device=dev)
    spec = torch.fft.rfft(frames, n=512).abs().pow(2.0)  # (B, M, 257)
    banks = get_mel_banks(num_mel_bins, 512, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)[0]
    banks = torch.nn.functional.pad(banks.to(dev, torch.float32), (0, 1))  # (F, 257)
    mel = torch.matmul(spec, banks.T)
    mel = torch.clamp_min(mel, torch.finfo(torch.float32).eps).log()  # (B, M, F)
    count = torch.where(length >= WIN, 1 + (length - WIN) // HOP, 0)
    src_t = torch.arange(target_length, device=dev)[None] - offset[:, None]  # (B, T)
    ok = (src_t >= 0) & (src_t < count[:, None])
    idx = src_t.clamp(0, mel.shape[1] - 1)[..., None].expand(B, target_length, num_mel_bins)
    return torch.gather(mel, 1, idx) * ok[..., None]


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
