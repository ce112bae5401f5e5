"""The data-loader benchmark's pieces on a one-second source (the full run is not in CI)."""

import av
import pytest

from benchmarks import data as bench
from mmt_fast.data.video import decode_size


@pytest.mark.parametrize(
    "h,w,train,expected",
    [
        (360, 640, False, (224, 448)),  # short side 224, width 398 rounded up to 64s
        (360, 640, True, None),  # 360 px is not worth shrinking to 320 in the decoder
        (720, 1280, True, (320, 576)),
        (200, 300, False, None),  # never upscaled
    ],
)
def test_decode_size(h, w, train, expected):
    assert decode_size(h, w, 224, train, 320) == expected


def test_source_and_breakdown(tmp_path):
    path = bench.make_source(tmp_path / "s.mp4", "360p-10s", seconds=1.0)
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.codec_context.width, v.codec_context.height) == (640, 360)
        assert v.average_rate == 25 and v.frames == 25
        assert a.codec_context.sample_rate == 44100 and a.codec_context.channels == 2
    for pipeline in ("before", "after"):
        st = bench.breakdown(path, "test", pipeline, reps=1)
        assert set(st) == {"probe_open", "seek", "decode", "resize_transform", "audio_decode",
                           "fbank"} and min(st.values()) >= 0  # fmt: skip
    r = bench.time_items([path], "train", "after", items=1)
    assert r["clips_per_s"] > 0 and bench.workers_per_gpu(2.0, 40.0) == 20.0


def test_prepared_sources_and_demand(tmp_path):
    src = bench.make_source(tmp_path / "360p-10s-1s-0.mp4", "360p-10s", seconds=1.0)
    for mode, short in (("train", 320), ("test", 224)):
        out, secs = bench.prepared_sources(tmp_path, {"360p-10s": [src]}, mode)
        (path,) = out["360p-10s"]
        with av.open(str(path)) as c:
            v = c.streams.video[0]
            assert (v.codec_context.height, v.codec_context.width) == (
                short,
                round(640 * short / 360 / 2) * 2,
            )
            assert v.frames == 25 and not c.streams.audio  # audio: the wav beside it
        assert path.with_suffix(".wav").is_file() and secs["360p-10s"] > 0
        again, secs = bench.prepared_sources(tmp_path, {"360p-10s": [src]}, mode)
        assert again == out and secs["360p-10s"] == 0.0  # reused, not prepared again
    r = bench.time_items(out["360p-10s"], "test", "after", items=1)
    assert r["clips_per_s"] > 0
    st = bench.breakdown(out["360p-10s"][0], "test", "after", reps=1)  # the packet reader
    assert st["seek"] == 0 and st["decode"] > 0
    (h200, a100) = bench.demand_estimates({"MMT": 159.552})
    # 159.552 GMACs forward -> 6 x 159.552 GFLOP per training clip (forward + backward)
    assert h200["clips_per_s"] == pytest.approx(790e12 * 0.30 / (6 * 159.552e9))  # ~248
    assert a100["clips_per_s"] == pytest.approx(312e12 * 0.35 / (6 * 159.552e9))  # ~114
    assert "estimate" in h200["method"] and h200["tflop_per_clip"] == pytest.approx(0.957, abs=1e-3)
