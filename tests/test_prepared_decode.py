"""Decoding prepared clips by skipping non-reference B-frames (``video.PacketReader``): the
frames equal, bit for bit, those of decoding every packet with PyAV's own demux + decode
loop; the skipped packets are exactly the B-frames; frame times equal decord's; files
without the prepare tag (sources, clips prepared by format 1) keep the decord path."""

import json

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmt_fast.data import AVClipDataset, ClipRecord, DataConfig, read_manifest
from mmt_fast.data import video as Vd
from mmt_fast.data.prepare import PrepareSettings, finished_meta, plan_jobs, prepare_dataset
from mmt_fast.data.synthetic import render_clip, write_clip

FPS, SECONDS = 25, 4.0  # 100 frames


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep_decode")
    frames, x, _ = render_clip(1, 0, np.random.default_rng(3), 48, SECONDS, FPS, 16000)
    src = d / "src.mp4"
    write_clip(src, np.repeat(frames, 2, axis=2), FPS, x, 16000, crf=18)  # 48 x 96, moving
    rec = ClipRecord(str(src), "c", label="a")
    settings = PrepareSettings(short_side=48, gop=16, bframes=3)
    report = prepare_dataset([rec], d / "out", settings, progress=False)
    assert report["unusable_counts"] == {}
    # a clip of format 1 is not "finished" under format 2: the next prepare redoes it
    (job,), _ = plan_jobs([rec], settings.margin_s)
    meta_path = d / "out" / f"{job.name}.json"
    meta = json.loads(meta_path.read_text())
    assert finished_meta(job, d / "out", settings) is not None and meta["key"]["version"] == 2
    old = {**meta, "key": {**meta["key"], "version": 1}}
    meta_path.write_text(json.dumps(old))
    assert finished_meta(job, d / "out", settings) is None
    meta_path.write_text(json.dumps(meta))
    return src, read_manifest(d / "out" / "manifest.csv")[0].path


def _all_frames(path):
    """Every frame through PyAV's ordinary demux + decode (no packet dropped), with its
    picture type, in display order."""
    with av.open(path) as c:
        st = c.streams.video[0]
        st.codec_context.thread_count = 1
        frames = sorted(c.decode(st), key=lambda f: f.pts)
        b = av.video.frame.PictureType.B
        return np.stack([f.to_ndarray(format="rgb24") for f in frames]), [
            "B" if f.pict_type == b else "IP" for f in frames
        ]


def test_skipping_b_frames_gives_the_same_frames(prepared):
    _, path = prepared
    ref, types = _all_frames(path)
    n = len(ref)
    assert n == FPS * SECONDS
    info, reader = Vd.open_clip(path)
    assert reader is not None and len(reader) == n and (info.height, info.width) == (48, 96)
    # the packets the reader may drop are the B-frames, 3 of every 4 frames
    nonref = {int(reader._rank[i]) for i in range(n) if not reader._is_ref(i)}
    assert nonref == {k for k, t in enumerate(types) if t == "B"}
    assert len(nonref) >= 0.6 * n
    windows = [list(range(s, s + 61, 4)) for s in (0, 1, 2, 3, 17, 39)]  # every phase
    windows.append(sorted({s + k for s in (0, 10, 20, 30, 39) for k in range(0, 61, 4)}))
    windows.append([5, 6, 7, 99])  # neighbours, the last frame
    for idx in windows:
        before = reader.decoded
        fast = reader.get_frames(idx)
        sent = reader.decoded - before
        full = reader.get_frames(idx, skip=False)
        assert torch.equal(fast, full) and torch.equal(fast, torch.from_numpy(ref[idx]))
        assert sent < reader.decoded - before - sent  # fewer pictures decoded
    # a 61-frame window at stride 4 from a keyframe: its 16 frames are references, and only
    # they are decoded (each GOP is reached at its keyframe, skipping the P-frame before it)
    before = reader.decoded
    reader.get_frames(list(range(16, 77, 4)))
    assert reader.decoded - before == 16
    # frames GOPs apart: two spans, the second from its own keyframe, nothing decoded between
    assert reader._spans([5, 99]) == [(0, int(reader._order[5])), (96, int(reader._order[99]))]
    assert reader._spans([5, 9]) == [(0, int(reader._order[9]))]  # one GOP: one span
    # scaled by the decoder (DataConfig.decoder_resize): FFmpeg's bilinear scaler, close to
    # an antialiased resize of the full-size frames
    small = reader.get_frames([10, 50], size=(24, 64)).permute(0, 3, 1, 2).float()
    full = torch.from_numpy(ref[[10, 50]]).permute(0, 3, 1, 2).float()
    expect = F.interpolate(full, size=(24, 64), mode="bilinear", antialias=True)
    assert small.shape == (2, 3, 24, 64) and (small - expect).abs().mean() < 3  # grey levels
    assert full.std() > 30  # (textured: a wrong scaling would differ by far more)
    # repeated and unsorted indices through decode_frames
    idx = np.array([9, 3, 3, 50])
    assert torch.equal(Vd.decode_frames(reader, idx, path), torch.from_numpy(ref[idx]))


def test_times_and_items_match_decord(prepared):
    """Frame times as decord reads them; the dataset's uint8 frames equal decord's."""
    _, path = prepared
    reader = Vd.open_clip(path)[1]
    vr = Vd.open_video(path)
    ts = np.asarray(vr.get_frame_timestamp(np.arange(len(vr))), dtype=np.float64)
    assert np.abs(reader.get_frame_timestamp(np.arange(len(vr)))[:, 0] - ts[:, 0]).max() < 1e-6
    assert np.abs(Vd.frame_times(reader)[:-1] - Vd.frame_times(vr)[:-1]).max() < 1e-6
    cfg = DataConfig(mode="test", num_views=3, num_frames=8, stride=4, crop_size=32,
                     target_length=128, device_transforms=True, decoder_resize=False)  # fmt: skip
    item = AVClipDataset([ClipRecord(path, "c", label="a")], cfg)[0]
    starts = Vd.window_starts(len(vr), cfg.window_frames, False, 3)
    idx = np.concatenate([Vd.frame_indices(0, len(vr), s, 8, 4) for s in starts])
    expect = torch.from_numpy(vr.get_batch(idx.tolist()).asnumpy())
    got = item["video"].reshape(-1, *item["video"].shape[-3:])
    # decord's FFmpeg and PyAV's may round the colour conversion differently by a level
    assert (got.int() - expect.int()).abs().max() <= 1


def test_untagged_files_keep_decord(prepared, tmp_path):
    src, path = prepared
    assert Vd.open_clip(str(src))[1] is None  # a source: decord
    # a clip prepared by format 1 (no tag in the container): still readable, by decord
    with av.open(path) as c, av.open(str(tmp_path / "old.mp4"), "w", format="mp4") as o:
        st = c.streams.video[0]
        out = o.add_stream_from_template(st)
        for p in c.demux(st):
            if p.size:
                p.stream = out
                o.mux(p)
    info, reader = Vd.open_clip(str(tmp_path / "old.mp4"))
    assert reader is None and (info.height, info.width) == (48, 96)
    cfg = DataConfig(mode="test", num_views=2, num_frames=4, stride=2, crop_size=32,
                     target_length=128, modalities="video", decoder_resize=False)  # fmt: skip
    a = AVClipDataset([ClipRecord(str(tmp_path / "old.mp4"), "c", label="a")], cfg)[0]
    b = AVClipDataset([ClipRecord(path, "c", label="a")], cfg)[0]
    assert (a["video"] - b["video"]).abs().max() < 0.02  # a grey level: 1 / 255 / 0.225
