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
