"""Time-correct decoding on real files written by PyAV: delayed audio, variable frame
rate, MPEG-TS, stereo, sidecar wavs of every common layout, audio-only files."""

import numpy as np
import pytest
import soundfile
import torch
from helpers_media import SR, synthetic_clip, timed_clip, truncate

from mmt_fast.data import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    AVClipDataset,
    BadClipError,
    ClipRecord,
    DataConfig,
)
from mmt_fast.data.audio import open_audio

EVENTS = [12, 30, 47]
CFR = [k * 0.1 for k in range(60)]  # 10 fps
VFR = list(np.cumsum([0.0] + [0.1 if k % 2 == 0 else 0.05 for k in range(59)]).round(3))


def click_times(path, sr=SR):
    """Start times (s) of the clicks in a file's audio as the project reads it."""
    src = open_audio(str(path))
    x = np.zeros(src.num_samples, np.float32)
    a = max(src.start_sample, 0)
    x[a:] = src.read(a, src.num_samples)
    loud = np.abs(x) > 0.2
    starts = np.flatnonzero(loud & ~np.r_[False, loud[:-1]])
    starts = starts[np.r_[True, np.diff(starts) > 800]]  # one per click
    return starts / sr, np.abs(x).max()


def expected_clicks(times):
    ends = [*times[1:], 2 * times[-1] - times[-2]]
    return [(times[f] + ends[f]) / 2 - 0.005 for f in EVENTS]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("timing")
    return {
        "delayed": timed_clip(d / "delayed.mp4", CFR, EVENTS, audio_start=0.98),
        "vfr": timed_clip(d / "vfr.mp4", VFR, EVENTS),
        "stereo": timed_clip(d / "stereo.mp4", CFR, EVENTS, channels=2),
        "mono": timed_clip(d / "mono.mp4", CFR, EVENTS),
        "ts": timed_clip(d / "clip.ts", CFR, EVENTS, fmt="mpegts"),
        "dir": d,
    }


@pytest.mark.parametrize("name,times", [("delayed", CFR), ("vfr", VFR), ("mono", CFR)])
def test_clicks_land_at_their_time(media, name, times):
    got, _ = click_times(media[name])
    assert np.allclose(got, expected_clicks(times), atol=0.004), got


def _positions(item):
    """(flash seen, click seen, flash position, click position) per view, positions in [0, 1)."""
    out = []
    for v, a in zip(item["video"], item["audio"]):
        bright = v.mean(dim=(0, 2, 3))
        energy = a[0][a[0].amax(dim=1).argmax()]  # the 1 kHz click's mel bin over time
        pad = (0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)  # a zero (no audio) fbank frame
        energy = energy.masked_fill(torch.isclose(a[0], torch.tensor(pad)).all(dim=0), -9.0)
        flash = bool(bright.max() > bright.min() + 1.0)
        click = bool(energy.max() > energy.median() + 1.0)
        vpos = (bright.argmax().item() + 0.5) / v.shape[1]
        apos = (energy.argmax().item() + 0.5) / a.shape[-1]
        out.append((flash, click, vpos, apos))
    return out


@pytest.mark.parametrize("name,times", [("delayed", CFR), ("vfr", VFR)])
def test_flash_and_click_at_the_same_time(media, name, times):
    """In every test view, the time of the flash (from the frame it is in) equals the time
    of the click (from the fbank frame it is in): audio and video windows share one clock."""
    cfg = DataConfig(
        mode="test", num_views=7, num_frames=16, stride=1, crop_size=16, target_length=160,
        audio_align="center",
    )  # fmt: skip
    item = AVClipDataset([ClipRecord(str(media[name]), name, label="a")], cfg)[0]
    ends = [*times[1:], 2 * times[-1] - times[-2]]
    span = (159 * 160 + 400) / SR
    seen = 0
    for k, (flash, _, vpos, _) in enumerate(_positions(item)):
        first = round(k * (60 - 16) / 6)
        f = first + int(vpos * 16)
        t0, t1 = times[first], ends[first + 15]
        ft = (t0 + t1) / 2 - span / 2 + 0.01 * np.arange(160) + 0.0125  # fbank frame centres
        a = item["audio"][k, 0]
        pad = torch.isclose(a, torch.tensor((0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD))).all(0)
        inside = torch.from_numpy((ft > t0) & (ft < t1)) & ~pad  # real audio in the video span
        energy = a[a.amax(dim=1).argmax()].masked_fill(~inside, -9.0)
        if flash:
            t_video = (times[f] + ends[f]) / 2
            t_audio = ft[energy.argmax().item()]
            assert energy.max() > energy[inside].median() + 1.0, k
            assert abs(t_video - t_audio) < 0.02, (k, t_video, t_audio)
            seen += 1
    assert seen >= 3


def test_vfr_segment_uses_frame_timestamps(media):
    # frames start at 0, .1, .15, .25, .3, ...: [0.9, 1.5) s holds frames 12..19
    cfg = DataConfig(mode="test", num_views=1, num_frames=8, stride=1, crop_size=16,
                     modalities="video")  # fmt: skip
    r = ClipRecord(str(media["vfr"]), "v", label="a", start_s=0.9, end_s=1.5)
    v = AVClipDataset([r], cfg)[0]["video"]
    bright = v.mean(dim=(0, 2, 3))
    assert bright.argmax().item() == 0 and bright[0] > bright[1:].max() + 1.0  # frame 12 first


def test_mpeg_ts_is_refused(media):
    ds = AVClipDataset([ClipRecord(str(media["ts"]), "t", label="a")], DataConfig(crop_size=16))
    with pytest.raises(BadClipError, match=r"MPEG-TS.*remux") as e:
        ds[0]
    assert e.value.kind == "unsupported_format"


def test_channels_are_averaged(media, tmp_path):
    """Right = left / 2: mono is the mean (0.75 x left) for container audio and wavs alike."""
    _, peak_mono = click_times(media["mono"])
    _, peak_stereo = click_times(media["stereo"])
    assert peak_stereo / peak_mono == pytest.approx(0.75, rel=0.05)
    tone = 0.8 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR).astype(np.float32)
    soundfile.write(tmp_path / "st.wav", np.stack([tone, tone / 2], 1), SR)
    src = open_audio(str(tmp_path / "st.wav"))
    assert np.abs(src.read(0, SR)).max() == pytest.approx(0.6, rel=1e-3)


LAYOUTS = [
    ("PCM_U8", 1, 1 / 64),
    ("PCM_16", 1, 1e-4),
    ("PCM_24", 2, 1e-6),
    ("PCM_32", 6, 1e-7),
    ("FLOAT", 2, 1e-7),
    ("DOUBLE", 4, 1e-7),
]


@pytest.mark.parametrize("subtype,channels,tol", LAYOUTS)
def test_sidecar_wav_layouts(tmp_path, subtype, channels, tol):
    rng = np.random.default_rng(0)
    x = (0.5 * rng.uniform(-1, 1, (SR // 2, channels))).astype(np.float64)
    path = synthetic_clip(tmp_path / "v.mp4", duration=0.5, audio=False)
    soundfile.write(tmp_path / "v.wav", x, SR, subtype=subtype)  # 6 ch: WAVE_FORMAT_EXTENSIBLE
    src = open_audio(str(path))
    got = src.read(0, src.num_samples)
    assert got.shape == (SR // 2,) and np.abs(got - x.mean(1)).max() < tol


def test_failing_sidecar_falls_back_to_the_track(media, tmp_path):
    clip = timed_clip(tmp_path / "c.mp4", CFR, EVENTS)
    cfg = DataConfig(mode="test", num_views=1, num_frames=4, crop_size=16, target_length=128)
    ref = AVClipDataset([ClipRecord(str(clip), "c", label="a")], cfg)[0]["audio"]
    (tmp_path / "c.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    got = AVClipDataset([ClipRecord(str(clip), "c", label="a")], cfg)[0]["audio"]
    assert torch.equal(got, ref)
    silent = synthetic_clip(tmp_path / "s.mp4", audio=False)
    (tmp_path / "s.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(BadClipError, match=r"s\.wav.*no audio track") as e:
        AVClipDataset([ClipRecord(str(silent), "s", label="a")], cfg)[0]
    assert e.value.kind == "corrupt_file"


def _audio_only_m4a(path):
    import av

    with av.open(str(path), "w", format="mp4") as c:
        st = c.add_stream("aac", rate=SR)
        st.layout = "mono"
        x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
        for s in range(0, SR, 1024):
            fr = av.AudioFrame.from_ndarray(x[None, s : s + 1024].copy(), format="fltp",
                                            layout="mono")  # fmt: skip
            fr.sample_rate, fr.pts = SR, s
            for p in st.encode(fr):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return path


def test_audio_only_m4a_and_folder_named_mp4(tmp_path):
    m4a = _audio_only_m4a(tmp_path / "song.m4a")
    r = ClipRecord(str(m4a), "s", label="a")
    with pytest.raises(BadClipError, match=r"no video stream.*audio-only model") as e:
        AVClipDataset([r], DataConfig(crop_size=16, target_length=128))[0]
    assert e.value.kind == "no_video"
    item = AVClipDataset([r], DataConfig(modalities="audio", target_length=128))[0]
    assert item["audio"].shape == (1, 128, 128)
    (tmp_path / "folder.mp4").mkdir()
    for modalities in ("av", "audio"):
        r = ClipRecord(str(tmp_path / "folder.mp4"), "f", label="a")
        with pytest.raises(BadClipError, match="is a folder") as e:
            AVClipDataset([r], DataConfig(modalities=modalities, target_length=128))[0]
        assert e.value.kind == "missing_file"


def test_audio_only_rejects_negative_start_and_truncation(tmp_path):
    cfg = DataConfig(modalities="audio", target_length=128)
    m4a = _audio_only_m4a(tmp_path / "a.m4a")
    with pytest.raises(BadClipError, match="not a finite time") as e:
        AVClipDataset([ClipRecord(str(m4a), "a", label="a", start_s=-1.0)], cfg)[0]
    assert e.value.kind == "bad_segment"
    import av

    fast = tmp_path / "fast.mp4"  # moov first: a truncated copy still opens
    with (
        av.open(str(m4a)) as src,
        av.open(str(fast), "w", options={"movflags": "faststart"}) as dst,
    ):
        st = dst.add_stream_from_template(src.streams.audio[0])
        for p in src.demux(src.streams.audio[0]):
            if p.dts is not None:
                p.stream = st
                dst.mux(p)
    bad = truncate(fast, tmp_path / "cut.mp4", 0.5)
    with pytest.raises(BadClipError) as e:
        AVClipDataset([ClipRecord(str(bad), "c", label="a")], cfg)[0]
    assert e.value.kind == "corrupt_file"


@pytest.mark.parametrize("codec,fmt", [("pcm_s16le", "s16"), ("pcm_s32le", "s32"), ("flac", "s16")])
def test_integer_pcm_tracks_are_scaled(tmp_path, codec, fmt):
    """A .mov/.mkv with integer PCM or FLAC audio reads as floats in [-1, 1] (AAC decodes to float)."""
    import av

    path = tmp_path / f"{codec}.mkv"
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)).astype(np.float32)
    ints = {"s16": (x * 32767).astype(np.int16), "s32": (x * 2**31).astype(np.int32)}[fmt]
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=SR)
        st.layout = "mono"
        for s in range(0, SR, 1024):
            fr = av.AudioFrame.from_ndarray(
                ints[None, s : s + 1024].copy(), format=fmt, layout="mono"
            )
            fr.sample_rate, fr.pts = SR, s
            for p in st.encode(fr):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    src = open_audio(str(path))
    got = src.read(0, SR)
    assert np.abs(got - x).max() < 1e-3
