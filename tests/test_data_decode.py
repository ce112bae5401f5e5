"""Decoding real mp4 files: shapes, value ranges, fbank, normalisation, A/V alignment."""

import numpy as np
import pytest
import torch
import torchaudio
from helpers_media import SR, flash_click_clip, solid_clip, synthetic_clip, write_wav

from mmt_fast.data import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    AVClipDataset,
    ClipRecord,
    DataConfig,
    collate_clips,
    window_fbank,
)
from mmt_fast.data.audio import open_audio

EVENTS = [12, 30, 47]  # flash/click frames at 10 fps: 1.25 s, 3.05 s, 4.75 s
PAD_VALUE = (0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)  # a zero fbank frame, normalised


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "flash": flash_click_clip(d / "flash.mp4", EVENTS),
        "solid": solid_clip(d / "solid.mp4", (200, 100, 50)),
        "syn": synthetic_clip(d / "syn.mp4", duration=3.0),
        "short": synthetic_clip(d / "short.mp4", duration=1.0, seed=3),
        "dir": d,
    }


def rec(path, **kw):
    return ClipRecord(str(path), path.stem, label="a", **kw)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_shapes_and_dtypes(media, mode):
    cfg = DataConfig(
        mode=mode, num_frames=8, stride=2, crop_size=24, num_views=3, target_length=256
    )
    item = AVClipDataset([rec(media["syn"])], cfg)[0]
    v = 3 if mode == "test" else None
    vshape, ashape = (3, 8, 24, 24), (1, 128, 256)
    assert item["video"].shape == ((v, *vshape) if v else vshape)
    assert item["audio"].shape == ((v, *ashape) if v else ashape)
    assert item["video"].dtype == item["audio"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    assert item["index"].item() == 0 and item["warnings"] == ()
    assert torch.isfinite(item["video"]).all() and torch.isfinite(item["audio"]).all()
    batch = collate_clips([item, item])
    assert batch["video"].shape[0] == 2 and batch["batch_size"] == 2 and batch["skipped"] == {}


@pytest.mark.parametrize("modalities", ["audio", "video"])
def test_single_modality(media, modalities):
    cfg = DataConfig(modalities=modalities, num_frames=4, crop_size=16, target_length=128)
    item = AVClipDataset([rec(media["syn"])], cfg)[0]
    assert ("video" in item) == (modalities == "video") and ("audio" in item) == (
        modalities == "audio"
    )


def test_video_normalisation_values(media):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = DataConfig(
        mode="test", num_views=1, num_frames=4, stride=2, crop_size=16, mean=mean, std=std
    )
    video = AVClipDataset([rec(media["solid"])], cfg)[0]["video"]
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    got = video.mean(dim=(1, 2, 3))
    assert torch.allclose(got, expected, atol=0.1), (got, expected)  # codec error ~ 3/255 / std
    assert video.std(dim=(1, 2, 3)).max() < 0.1


def test_fbank_matches_ast_recipe(media):
    """Audio of a clip shorter than the window equals AST's own recipe, computed independently."""
    src = open_audio(str(media["syn"]))
    fb = window_fbank(src, 0.0, 0.0, src.duration, target_length=1024, num_mel_bins=128)
    assert fb.shape == (1024, 128)  # (time, frequency) before transposing
    w = torch.from_numpy(src.read(0, src.num_samples)).reshape(1, -1)
    ref = torchaudio.compliance.kaldi.fbank(
        w - w.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
    )  # fmt: skip
    n = ref.shape[0]
    assert n == 1 + (src.num_samples - 400) // 160 < 1024
    assert torch.allclose(fb[:n], ref, atol=1e-4) and (fb[n:] == 0).all()
    cfg = DataConfig(mode="test", modalities="audio", num_views=1)
    audio = AVClipDataset([rec(media["syn"])], cfg)[0]["audio"]
    assert audio.shape == (1, 128, 1024)
    expected = (torch.nn.functional.pad(ref, (0, 0, 0, 1024 - n)) - AUDIOSET_MEAN) / (
        2 * AUDIOSET_STD
    )
    assert torch.allclose(audio[0], expected.t(), atol=1e-4)


def test_specaugment_train_only(media):
    base = dict(modalities="audio", target_length=320)  # 3.2 s window > 3 s clip
    test_audio = AVClipDataset([rec(media["syn"])], DataConfig(mode="test", num_views=1, **base))[0]
    torch.manual_seed(0)
    plain = AVClipDataset([rec(media["syn"])], DataConfig(freqm=0, timem=0, **base))[0]
    assert torch.equal(plain["audio"], test_audio["audio"])  # clip < window: same window
    torch.manual_seed(0)
    masked = AVClipDataset([rec(media["syn"])], DataConfig(freqm=40, timem=60, **base))[0]["audio"]
    changed = ~torch.isclose(masked, plain["audio"])
    assert changed.any()
    assert torch.allclose(masked[changed], torch.tensor(PAD_VALUE))


def _event_positions(item):
    """Relative positions (0..1) of the flash in each video view and the click in each audio view."""
    video, audio = item["video"], item["audio"]
    if video.dim() == 4:
        video, audio = video[None], audio[None]
    out = []
    for v, a in zip(video, audio):
        bright = v.mean(dim=(0, 2, 3))  # (T,)
        energy = a[0].mean(dim=0)  # (Tt,)
        # zero (padding) fbank frames normalise to PAD_VALUE, above log-silence: ignore them
        padding = torch.isclose(a[0], torch.tensor(PAD_VALUE)).all(dim=0)
        flash = bright.max() > bright.min() + 1.0
        click = energy[~padding].max() > energy[~padding].median() + 0.3
        energy = energy.masked_fill(padding, float("-inf"))
        vpos = (bright.argmax().item() + 0.5) / v.shape[1]
        apos = (energy.argmax().item() + 0.5) / a.shape[-1]
        out.append((flash, click, vpos, apos))
    return out


@pytest.mark.parametrize("align", ["shift", "center"])
def test_audio_video_alignment_test_views(media, align):
    # video window 16 frames at stride 1 = 1.6 s; audio window 160 frames = 1.615 s
    cfg = DataConfig(
        mode="test", num_views=5, num_frames=16, stride=1, crop_size=16,
        target_length=160, audio_align=align,
    )  # fmt: skip
    item = AVClipDataset([rec(media["flash"])], cfg)[0]
    seen = 0
    for flash, click, vpos, apos in _event_positions(item):
        if flash and 0.1 < vpos < 0.9:
            assert click and abs(vpos - apos) < 1 / 16, (vpos, apos)
            seen += 1
    assert seen >= 3


def test_audio_video_alignment_train_jitter(media):
    cfg = DataConfig(num_frames=16, stride=1, crop_size=16, target_length=160, freqm=0, timem=0)
    ds = AVClipDataset([rec(media["flash"])], cfg)
    torch.manual_seed(1)
    seen = 0
    for _ in range(6):
        ((flash, click, vpos, apos),) = _event_positions(ds[0])
        if flash and 0.1 < vpos < 0.9:
            assert click and abs(vpos - apos) < 1 / 16, (vpos, apos)
            seen += 1
    assert seen >= 1


def test_segment_uses_only_its_time_span(media):
    """An Epic-style segment [2.0, 4.0) s: every view holds the 3.05 s event at the same
    position in video and audio, and the segment's edges bound both windows."""
    cfg = DataConfig(
        mode="test", num_views=3, num_frames=16, stride=1, crop_size=16, target_length=160
    )
    item = AVClipDataset([rec(media["flash"], start_s=2.0, end_s=4.0)], cfg)[0]
    # windows start at frames 20, 22, 24: the flash (frame 30) is sample 10, 8, 6
    for k, (flash, click, vpos, apos) in enumerate(_event_positions(item)):
        assert flash and click
        assert vpos == pytest.approx((10 - 2 * k + 0.5) / 16)
        assert abs(vpos - apos) < 1 / 16, (vpos, apos)


def test_short_clip_is_padded_and_counted(media):
    cfg = DataConfig(num_frames=8, stride=2, crop_size=16, target_length=128)  # needs 15 frames
    ds = AVClipDataset([rec(media["short"])], cfg)  # 10 frames
    item = ds[0]
    assert item["warnings"] == ("short_clip",) and ds.warning_counts["short_clip"] == 1
    v = item["video"]
    assert torch.equal(v[:, -1], v[:, -2])  # last frame repeated
    assert collate_clips([item])["warnings"] == {"short_clip": 1}


def test_sidecar_wav_is_used_and_resampled(media, tmp_path):
    t = np.arange(int(2.0 * 8000)) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 500 * t)
    path = synthetic_clip(tmp_path / "noaudio.mp4", duration=2.0, audio=False)
    write_wav(tmp_path / "noaudio.wav", tone, 8000)  # 8 kHz: resampled to 16 kHz
    cfg = DataConfig(mode="test", num_views=1, num_frames=4, crop_size=16, target_length=128)
    audio = AVClipDataset([rec(path)], cfg)[0]["audio"]
    ref_wave = np.sin(2 * np.pi * 500 * np.arange(2 * SR) / SR).astype(np.float32)
    write_wav(tmp_path / "ref.wav", 0.5 * ref_wave, SR)
    ref = AVClipDataset(
        [rec(tmp_path / "ref.wav")],
        DataConfig(mode="test", num_views=1, modalities="audio", target_length=128),
    )[0]["audio"]
    assert audio[0].mean(1).argmax() == ref[0].mean(1).argmax()  # same peak mel bin
