"""The synthetic generator: real files that decode, labels that follow motion x pitch."""

import csv

import decord
import numpy as np
import pytest

from mmt_fast.data import AVClipDataset, ClassIndex, DataConfig, read_manifest
from mmt_fast.data.synthetic import PITCHES_HZ, factorize, main, make_synthetic


def _motion(frames: np.ndarray) -> str:
    """Direction of the square from decoded frames (T, H, W, 3), wrap-around aware."""
    size = frames.shape[1]
    pos = []
    for f in frames.astype(np.float32):
        diff = np.abs(f - np.median(f.reshape(-1, 3), axis=0)).sum(-1)
        ys, xs = np.nonzero(diff > 150)
        # circular mean copes with the square wrapping over an edge
        ang = 2 * np.pi / size
        pos.append([np.angle(np.exp(1j * ang * ys).mean()), np.angle(np.exp(1j * ang * xs).mean())])
    step = np.angle(np.exp(1j * np.diff(np.array(pos), axis=0))).mean(0)  # (dy, dx) radians
    dy, dx = step
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _pitch_band(path: str) -> int:
    x = decord.AudioReader(path, sample_rate=16000, mono=True)[:].asnumpy()[0]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak = np.fft.rfftfreq(len(x), 1 / 16000)[spectrum.argmax()]
    return int(np.argmin([abs(np.log(peak / p)) for p in PITCHES_HZ]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, make_synthetic(out, num_clips=12, seed=1, duration=2.0, fps=16, num_classes=4)


def test_files_decode_and_manifest(dataset):
    out, manifest = dataset
    rows = list(csv.DictReader(open(manifest)))
    assert list(rows[0]) == ["path", "label", "split", "motion", "pitch_hz"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows:
        vr = decord.VideoReader(str(out / r["path"]))
        assert len(vr) == 32 and vr[0].shape == (64, 64, 3) and vr.get_avg_fps() == 16
        assert decord.AudioReader(str(out / r["path"]), sample_rate=16000).duration() >= 1.9
    assert ClassIndex.load(out / "classes.json").names == [
        "left-300Hz",
        "left-700Hz",
        "right-300Hz",
        "right-700Hz",
    ]
    assert len(read_manifest(manifest, split="train")) == 4  # 3 rounds of 4: train, val, test


def test_labels_follow_motion_and_pitch(dataset):
    _, manifest = dataset
    for r in read_manifest(manifest):
        frames = decord.VideoReader(r.path).get_batch(list(range(0, 32, 2))).asnumpy()
        motion, pitch = _motion(frames), _pitch_band(r.path)
        assert r.label == f"{motion}-{PITCHES_HZ[pitch]:.0f}Hz", r.path


def test_dataset_over_synthetic(dataset):
    _, manifest = dataset
    cfg = DataConfig(
        num_frames=8, stride=4, crop_size=32, target_length=256
    )  # window 29 <= 32 frames
    ds = AVClipDataset(read_manifest(manifest), cfg)
    item = ds[5]
    assert item["video"].shape == (3, 8, 32, 32) and item["audio"].shape == (1, 128, 256)
    # clip 5: class 5 % 4 = 1 = (right, 700 Hz); the index sorts the names
    assert ds.class_index.names[item["label"].item()] == "right-700Hz"
    assert item["warnings"] == ()


def test_factorize_and_cli(tmp_path):
    assert factorize(4) == (2, 2) and factorize(6) == (3, 2) and factorize(16) == (4, 4)
    with pytest.raises(ValueError):
        factorize(5)
    assert (
        main(
            ["--out", str(tmp_path), "--num-clips", "3", "--duration", "0.5", "--num-classes", "6"]
        )
        == 0
    )
    assert len(read_manifest(tmp_path / "manifest.csv")) == 3
