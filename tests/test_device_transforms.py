"""Batched device transforms against the CPU path: bit-identical test transform on real
clips of different sizes, bit-identical train transform under the same RNG state, the
parameter distributions against independent references (torchvision's
RandomResizedCrop, torchaudio's masking), and exact resume of a run that uses them."""

import math

import numpy as np
import pytest
import torch
import torchaudio
import torchvision
from config_helpers import as_overrides
from helpers_media import flash_click_clip, synthetic_clip
from test_train_resume import DEMO, _assert_same

from mmt_fast.data import AVClipDataset, ClipRecord, collate_clips, data_config
from mmt_fast.data.audio import normalize_fbank, spec_augment
from mmt_fast.data.device_transforms import DeviceTransform, _draw
from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.data.video import transform_frames
from mmt_fast.run import load_checkpoint, load_config
from mmt_fast.run.sampling import run_seeded
from mmt_fast.train import train


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("devtf")
    return [
        synthetic_clip(d / "a.mp4", motion=1, seed=1),  # 32 x 32
        flash_click_clip(d / "b.mp4", [5, 20], num_frames=30, size=(32, 48)),  # 32 x 48
        flash_click_clip(d / "c.mp4", [7], num_frames=30, size=(40, 24)),  # portrait 40 x 24
    ]


def _records(clips):
    return [ClipRecord(str(p), p.stem, label="x") for p in clips]


@pytest.mark.parametrize("views", [1, 3])
def test_test_transform_is_bit_identical(clips, views):
    kw = dict(mode="test", num_views=views, crop_size=24)
    cpu = AVClipDataset(_records(clips), data_config("tiny", **kw))
    dev = AVClipDataset(_records(clips), data_config("tiny", device_transforms=True, **kw))
    batch = collate_clips([dev[i] for i in range(len(clips))])
    sizes = batch["video_size"].tolist()  # two decoded sizes (one shared): padded, grouped
    assert batch["video"].dtype == torch.uint8 and len({tuple(x) for x in sizes}) == 2
    assert list(batch["video"].shape[-3:-1]) == [max(x[0] for x in sizes), max(x[1] for x in sizes)]
    out = DeviceTransform(dev.config)(batch)
    for i in range(len(clips)):
        ref = cpu[i]
        assert out["video"][i].shape == ref["video"].shape
        assert torch.equal(out["video"][i], ref["video"]), i
        # the fbank computed batched (audio.batched_fbank) against kaldi.fbank per window:
        # float32 rounding, normalised by 2 x 4.57
        torch.testing.assert_close(out["audio"][i], ref["audio"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("flip_prob", [0.5, 0.0])
def test_train_transform_is_bit_identical_under_the_same_rng(flip_prob):
    """The device path draws its parameters with the CPU path's functions in the CPU
    path's order: under the same seed both produce the same tensors."""
    cfg = data_config("tiny", mode="train", device_transforms=True, flip_prob=flip_prob)
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 36, 52), (4, 52, 36), (4, 40, 40)]
    frames = [torch.randint(0, 256, (*s, 3), dtype=torch.uint8, generator=g) for s in shapes]
    fbanks = [torch.randn(1, 128, 128, generator=g) * 3 - 4 for _ in shapes]
    tf = DeviceTransform(cfg)
    for seed in range(6):
        refs, params = [], []
        for b, (fr, fb) in enumerate(zip(frames, fbanks, strict=True)):
            s = seed * 10 + b
            torch.manual_seed(s)
            v = transform_frames(
                fr, cfg.crop_size, True, cfg.mean, cfg.std,
                cfg.train_scale, cfg.train_ratio, cfg.flip_prob,
            )  # fmt: skip
            a = normalize_fbank(spec_augment(fb.clone(), cfg.freqm, cfg.timem))
            refs.append((v, a))
            h, w = fr.shape[1:3]
            params.append(run_seeded(s, _draw, cfg, h, w, 128, 128))
        batch = collate_clips(
            [
                {"video": fr, "video_size": torch.tensor(fr.shape[1:3]), "audio": fb,
                 "index": torch.tensor(i)}
                for i, (fr, fb) in enumerate(zip(frames, fbanks, strict=True))
            ]
        )  # fmt: skip
        out = tf(batch, "cpu", params=params)
        for b, (v, a) in enumerate(refs):
            assert torch.equal(out["video"][b], v), (seed, b)
            assert torch.equal(out["audio"][b], a), (seed, b)


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )  # fmt: skip


def _ks_limit(n: int, m: int) -> float:
    return 1.95 * math.sqrt((n + m) / (n * m))  # alpha = 0.001


def test_parameter_distributions_match_independent_references():
    """Crop boxes vs torchvision's RandomResizedCrop.get_params, flips vs Bernoulli(p),
    mask widths and starts vs torchaudio's own masking, over 3000 clips."""
    n, (h, w), (F, T) = 3000, (180, 320), (128, 1024)
    cfg = data_config("paper", mode="train", device_transforms=True)
    batch = {
        "index": torch.arange(n),
        "video_size": torch.tensor([[h, w]] * n),
        "audio": torch.zeros(n, 1, F, T),
    }
    ps = DeviceTransform(cfg, seed=3).params(batch, epoch=2)
    assert len({p["box"] for p in ps}) > n * 0.9  # per-clip draws, not one shared draw
    torch.manual_seed(123)
    ref = [
        torchvision.transforms.RandomResizedCrop.get_params(
            torch.empty(1, h, w), list(cfg.train_scale), list(cfg.train_ratio)
        )
        for _ in range(n)
    ]
    for k, what in enumerate(("top", "left", "height", "width")):
        d = _ks([p["box"][k] for p in ps], [r[k] for r in ref])
        assert d < _ks_limit(n, n), (what, d)
    flips = sum(p["flip"] for p in ps)
    assert abs(flips - n * cfg.flip_prob) < 4 * math.sqrt(n * 0.25)
    # torchaudio's masks on a ones-spectrogram: measured start and width of the zeroed band
    torch.manual_seed(321)
    ones = torch.ones(1, F, 8)
    fm = torchaudio.transforms.FrequencyMasking(cfg.freqm)
    widths, starts = [], []
    for _ in range(n):
        zero = (fm(ones)[0, :, 0] == 0).nonzero().flatten()
        widths.append(len(zero))
        starts.append(int(zero[0]) if len(zero) else -1)
    mine_w = [p["freq"][1] - p["freq"][0] for p in ps]
    assert _ks(mine_w, widths) < _ks_limit(n, n)
    mine_s = [p["freq"][0] for p in ps if p["freq"][1] > p["freq"][0]]
    ref_s = [s for s in starts if s >= 0]
    assert _ks(mine_s, ref_s) < _ks_limit(len(mine_s), len(ref_s))
    assert max(p["time"][1] - p["time"][0] for p in ps) < cfg.timem
    assert max(mine_w) < cfg.freqm


def test_batched_masks_equal_torchaudio_per_clip():
    """Applying the drawn masks batched gives what torchaudio gives clip by clip."""
    cfg = data_config("tiny", mode="train", device_transforms=True, modalities="audio")
    g = torch.Generator().manual_seed(1)
    spec = torch.randn(5, 1, 128, 128, generator=g)
    params = [run_seeded(i, _draw, cfg, 0, 0, 128, 128) for i in range(5)]
    out = DeviceTransform(cfg).audio(spec, params, torch.device("cpu"))
    for i in range(5):
        torch.manual_seed(i)
        ref = normalize_fbank(spec_augment(spec[i].clone(), cfg.freqm, cfg.timem))
        assert torch.equal(out[i], ref)


def test_training_with_device_transforms_resumes_exactly(tmp_path):
    m = make_synthetic(tmp_path / "syn", num_clips=12, size=32, duration=1.0, val_frac=0.34,
                       test_frac=0)  # fmt: skip
    o = {
        "data.train": str(m), "data.val": str(m), "data.test": str(m),
        "data.num_workers": 0, "data.cache": False, "data.device_transforms": True,
        "data.overrides": {"flip_prob": 0.5},
        "train.batch_size": 2, "train.epochs": 2, "train.ckpt_every": 1,
        "train.eval_every": 1, "train.deterministic": True, "train.torch_threads": 1,
        "train.progress": False, "train.tensorboard": False, "schedule.warmup_steps": 1,
    }  # fmt: skip

    def cfg(out, **extra):
        d = {**o, "train.out_dir": str(out), **extra}
        return load_config(DEMO, as_overrides(d))

    ref = train(cfg(tmp_path / "ref"))
    assert ref["step"] == 8 and ref["last_val"]["num_clips"] == 4
    res = train(cfg(tmp_path / "run", **{"train.stop_at_step": 3}))
    assert res["interrupted"]
    res = train(cfg(tmp_path / "run"), resume=True)
    assert res["step"] == 8 and res["last_val"] == ref["last_val"]
    _assert_same(load_checkpoint(tmp_path / "ref", which="latest").model,
                 load_checkpoint(tmp_path / "run", which="latest").model)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_within_a_grey_level(clips):
    cfg = data_config("tiny", mode="test", num_views=2, crop_size=24, device_transforms=True)
    ds = AVClipDataset(_records(clips), cfg)
    batch = collate_clips([ds[i] for i in range(len(clips))])
    tf = DeviceTransform(cfg)
    a, b = tf(batch, "cpu"), tf(batch, "cuda")
    tol = 1.01 / 255 / min(cfg.std)
    torch.testing.assert_close(b["video"].cpu(), a["video"], rtol=0, atol=tol)
    torch.testing.assert_close(b["audio"].cpu(), a["audio"], rtol=0, atol=1e-4)  # FFTs differ


def test_batched_fbank_equals_kaldi_per_window():
    """audio.batched_fbank over windows with every kind of span (whole, clipped at either
    end, offset, too short for a frame, no audio) against audio.window_fbank, which calls
    torchaudio.compliance.kaldi.fbank on each window; and the items' waves and spans."""
    from mmt_fast.data.audio import batched_fbank, window_fbank, window_wave

    class Samples:  # the part of audio.AudioSource the window functions read
        sample_rate, start_sample = 16000, 0

        def __init__(self, x):
            self.x, self.num_samples = x, len(x)

        def read(self, a, b):
            return self.x[a:b]

    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    src = Samples(x.astype(np.float32))
    windows = [(0.0, 0.0, 3.0), (0.5, 0.7, 3.0), (-0.3, 0.0, 2.5), (2.6, 0.0, 3.0),
               (1.0, 1.0, 1.01), (1.0, 1.0, 1.03), (5.0, 0.0, 3.0)]  # fmt: skip
    T = 200
    waves, spans = zip(*(window_wave(src, ws, a0, a1, T) for ws, a0, a1 in windows))
    out = batched_fbank(torch.stack(waves), torch.stack(spans), T, 128)
    for k, (ws, a0, a1) in enumerate(windows):
        ref = window_fbank(src, ws, a0, a1, T, 128)
        torch.testing.assert_close(out[k], ref, rtol=0, atol=1e-3, msg=str(windows[k]))
        assert torch.equal(out[k] == 0, ref == 0), windows[k]  # the same frames without audio
