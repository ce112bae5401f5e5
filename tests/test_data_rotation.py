"""Rotated phone videos: a file stored sideways with a display matrix (written with
PyAV, as phones write it) is decoded upright, at the displayed proportions, before it is
cropped. The reference is the upright picture itself, put through the same transform."""

import fractions

import numpy as np
import pytest
import torch

from mmt_fast.data.dataset import AVClipDataset, data_config
from mmt_fast.data.manifests import ClipRecord
from mmt_fast.data.video import display_rotation, probe_video, transform_frames

H, W = 192, 128  # the upright (displayed) picture: portrait, as a phone held upright
CROP = 64


def upright() -> np.ndarray:
    """Four coloured quadrants, each in horizontal bands of two brightnesses."""
    y, x = np.mgrid[:H, :W]
    colours = np.array([[[230, 40, 40], [40, 200, 40]], [[40, 40, 230], [220, 220, 220]]])
    img = colours[(y >= H // 2).astype(int), (x >= W // 2).astype(int)].astype(np.float32)
    img *= np.where((y // 24) % 2 == 0, 1.0, 0.55)[..., None]
    return img.astype(np.uint8)


def write_rotated(path, rotation: int, faststart: bool = False, n: int = 8):
    """The upright picture stored turned by ``rotation`` degrees clockwise, with a
    display matrix saying "turn it ``rotation`` degrees counter-clockwise"."""
    import av

    stored = np.ascontiguousarray(np.rot90(upright(), k=-(rotation // 90)))
    h, w = stored.shape[:2]
    opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=opts) as c:
        vs = c.add_stream("libx264", rate=10)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "8", "threads": "1"}
        vs.codec_context.time_base = fractions.Fraction(1, 10)
        if rotation:
            vs.set_display_rotation(rotation)
        for _ in range(n):
            for p in vs.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    return path


def _centre_crop(frames: np.ndarray) -> torch.Tensor:
    """transform_frames' test crop of uint8 (T, h, w, 3) frames, in [0, 1]."""
    x = transform_frames(torch.from_numpy(frames), CROP, False, (0, 0, 0), (1, 1, 1))
    return x[:, 0]  # (3, S, S)


def _dataset_crop(path, decoder_resize=True) -> torch.Tensor:
    cfg = data_config(
        "tiny",
        mode="test",
        num_views=1,
        modalities="video",
        crop_size=CROP,
        num_frames=2,
        stride=1,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        decoder_resize=decoder_resize,
    )
    ds = AVClipDataset([ClipRecord(path=str(path), clip_id="c", label="a")], cfg)
    return ds[0]["video"][:, 0]


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize("faststart", [False, True])
def test_display_rotation_is_read_from_the_header(tmp_path, rotation, faststart):
    import av

    p = write_rotated(tmp_path / f"r{rotation}.mp4", rotation, faststart, n=2)
    with av.open(str(p)) as c:  # PyAV's reading of the matrix (on a decoded frame)
        ref = next(c.decode(video=0)).rotation % 360
    assert display_rotation(str(p)) == ref == rotation
    info = probe_video(str(p))  # the displayed size, whatever the stored one
    assert (info.height, info.width, info.rotation) == (H, W, rotation)


@pytest.mark.parametrize("decoder_resize", [True, False])
@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_video_is_cropped_upright(tmp_path, rotation, decoder_resize):
    p = write_rotated(tmp_path / f"r{rotation}.mp4", rotation)
    got = _dataset_crop(p, decoder_resize)
    frames = np.broadcast_to(upright(), (2, H, W, 3)).copy()
    want = _centre_crop(frames)
    err = (got - want).abs().mean().item()
    assert err < 0.03, err
    # the test can tell: the picture as stored, or squeezed into the stored
    # proportions, is far from it
    stored = np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2)))
    assert (_centre_crop(stored) - want).abs().mean().item() > 0.15
    squeezed = torch.nn.functional.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(W, H), mode="bilinear"
    )
    squeezed = squeezed.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()
    assert (_centre_crop(squeezed) - want).abs().mean().item() > 0.1
