"""`mmt-fast prepare` on real encoded files: A/V timing survives (delayed audio, early audio,
variable frame rate, cut segments), prepared and unprepared clips load the same up to the
resize, an interrupted run resumes without redoing finished clips, unusable inputs are
reported per kind."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_media import SR, synthetic_clip, timed_clip, truncate

from mmt_fast.cli import main as cli_main
from mmt_fast.data import AVClipDataset, ClipRecord, DataConfig, data_config, read_manifest
from mmt_fast.data import video as Vd
from mmt_fast.data.audio import open_audio
from mmt_fast.data.prepare import PrepareSettings, prepare_dataset, settings_for
from mmt_fast.data.synthetic import render_clip, write_clip

EVENTS = [12, 30, 47]
CFR = [k * 0.1 for k in range(60)]
VFR = list(np.cumsum([0.0] + [0.1 if k % 2 == 0 else 0.05 for k in range(59)]).round(3))
LATE = [0.5 + k * 0.1 for k in range(60)]  # video starts 0.5 s after the audio


def clicks(path):
    """Centres (s, on the clip's clock) of the clicks in the audio the loader reads."""
    src = open_audio(str(path))
    x = np.zeros(src.num_samples, np.float32)
    a = max(src.start_sample, 0)
    x[a:] = src.read(a, src.num_samples)
    loud = np.flatnonzero(np.abs(x) > 0.2)
    groups = np.split(loud, np.flatnonzero(np.diff(loud) > 800) + 1)
    return np.array([(g[0] + g[-1]) / 2 / SR for g in groups if len(g)])


def flashes(path):
    """(frame start times (n + 1,), indices of the white frames) as the loader decodes them:
    decord, or for a prepared clip its packet reader (``video.open_clip``)."""
    reader = Vd.open_clip(str(path))[1]
    vr = reader if reader is not None else Vd.open_video(str(path))
    times = Vd.frame_times(vr)
    bright = Vd.decode_frames(vr, np.arange(len(vr)), str(path)).numpy().mean(axis=(1, 2, 3))
    return times, np.flatnonzero(bright > 128)


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep_timing")
    src = {
        "delayed": timed_clip(d / "delayed.mp4", CFR, EVENTS, audio_start=0.98),
        "early": timed_clip(d / "early.mp4", LATE, EVENTS, channels=2),
        "vfr": timed_clip(d / "vfr.mp4", VFR, EVENTS),
    }
    recs = [ClipRecord(str(p), k, label="a", split="test") for k, p in src.items()]
    # a segment of the VFR clip (frames 12..19 start in [0.9, 1.5) s), cut with a 0.3 s margin
    recs.append(ClipRecord(str(src["vfr"]), "seg", label="a", start_s=0.9, end_s=1.5))
    out = d / "out"
    settings = PrepareSettings(short_side=320, gop=4, margin_s=0.3)
    report = prepare_dataset(recs, out, settings, workers=1, progress=False)
    return src, recs, out, report


def known_clicks(frame_times):
    """Where timed_clip put the clicks: the middle of each event frame's display interval,
    on the clock of the first frame (prepare's clock)."""
    ends = [*frame_times[1:], frame_times[-1] + (frame_times[-1] - frame_times[-2])]
    return np.array([(frame_times[f] + ends[f]) / 2 - frame_times[0] for f in EVENTS])


def test_timing_survives_prepare(timed):
    """Frame times identical, clicks where they were written (5 ms), and each click inside
    the display interval of its white frame (coincide within one frame) after prepare."""
    src, _, out, report = timed
    assert report["prepared"] == 4 and report["unusable_counts"] == {}
    rows = {r.clip_id: r for r in read_manifest(out / "manifest.csv")}
    for name, frame_times in (("delayed", CFR), ("early", LATE), ("vfr", VFR)):
        t_src, f_src = flashes(src[name])
        t_out, f_out = flashes(rows[name].path)
        assert np.array_equal(f_src, EVENTS) and np.array_equal(f_out, EVENTS), name
        assert np.abs(t_out - t_src).max() < 1e-6, name
        c_out, known = clicks(rows[name].path), known_clicks(frame_times)
        assert len(c_out) == 3 and np.abs(c_out - known).max() < 5e-3, (name, known, c_out)
        for f, c in zip(f_out, c_out):
            assert t_out[f] <= c < t_out[f + 1], (name, f, c, t_out[f : f + 2])
    # the delayed track keeps its start (no silence before it), the early one is trimmed at 0
    assert open_audio(rows["delayed"].path).start > 0.8
    assert open_audio(rows["early"].path).start == 0
    seg = rows["seg"]
    assert Path(seg.path).with_suffix(".wav").is_file()
    t_seg, f_seg = flashes(seg.path)
    f0 = Vd.segment_frames(np.array([*VFR, 3.05]), 0.6, None)[0]  # 0.6 s = 0.9 - margin
    off = VFR[f0]
    assert np.abs(t_seg[:-1] - (np.array(VFR[f0:]) - off)[: len(t_seg) - 1]).max() < 1e-6
    assert seg.start_s == pytest.approx(0.9 - off) and seg.end_s == pytest.approx(1.5 - off)
    assert VFR[EVENTS[0]] - off == pytest.approx(t_seg[f_seg[0]])  # the flash kept its time
    for f, c in zip(f_seg, clicks(seg.path)[: len(f_seg)]):
        assert t_seg[f] <= c < t_seg[f + 1]


def _pad_mask(audio):
    return (audio == audio.flatten()[0]).all(dim=-2)  # fbank frames with no audio: constant


@pytest.mark.parametrize("name", ["delayed", "early", "vfr", "seg"])
def test_prepared_items_match_unprepared(timed, name):
    """The dataset gives the same test views from both: same frames (re-encoding error only),
    the same audio window (identical no-audio frames, fbank equal where there is sound)."""
    _, recs, out, _ = timed
    rec = next(r for r in recs if r.clip_id == name)
    new = next(r for r in read_manifest(out / "manifest.csv") if r.clip_id == name)
    # a 7-frame window: the segment (8 frames) holds it, so no frame past the cut is needed
    cfg = DataConfig(mode="test", num_views=4, num_frames=4, stride=2, crop_size=32,
                     target_length=256)  # fmt: skip
    a = AVClipDataset([rec], cfg)[0]
    b = AVClipDataset([new], cfg)[0]
    assert (a["video"] - b["video"]).abs().mean() < 0.02
    bright_a, bright_b = a["video"].mean(dim=(1, 3, 4)), b["video"].mean(dim=(1, 3, 4))
    assert torch.equal(bright_a.argmax(-1), bright_b.argmax(-1))  # flashes in the same frames
    assert torch.equal(_pad_mask(a["audio"]), _pad_mask(b["audio"]))  # the same window
    loud = a["audio"] > 0.5  # bins with sound (normalised fbank)
    assert loud.any() and (a["audio"] - b["audio"])[loud].abs().max() < 0.05


def _textured(path, size, seconds=2.0, fps=10, seed=0):
    frames, x, _ = render_clip(1, 0, np.random.default_rng(seed), size, seconds, fps, SR)
    frames = np.repeat(frames, 2, axis=2)  # 2:1 aspect
    write_clip(path, frames, fps, x, SR, crf=12)
    return path


def test_resized_prepare_matches_up_to_interpolation(tmp_path):
    """A 128x256 clip prepared at short side 32: test views equal the unprepared ones up to
    the resize (the loader shrinks the source to 32; prepare shrank it once with area
    interpolation)."""
    src = _textured(tmp_path / "big.mp4", 128)
    rec = ClipRecord(str(src), "big", label="a")
    prepare_dataset([rec], tmp_path / "out", PrepareSettings(short_side=32, gop=8), progress=False)
    new = read_manifest(tmp_path / "out" / "manifest.csv")[0]
    vr = Vd.open_video(new.path)
    assert vr[0].shape == (32, 64, 3)
    cfg = DataConfig(mode="test", num_views=3, num_frames=8, stride=2, crop_size=32,
                     target_length=128)  # fmt: skip
    a, b = AVClipDataset([rec], cfg)[0], AVClipDataset([new], cfg)[0]
    err = (a["video"] - b["video"]).abs()
    assert err.mean() < 0.15 and err.mean() < 0.3 * a["video"].std()
    assert torch.allclose(a["audio"], b["audio"], atol=0.02)


def test_settings_follow_the_data_config():
    s = settings_for(data_config("paper"), train=True)
    assert (s.short_side, s.gop) == (320, 16)  # 61-frame window: keyframe every 16
    assert s.margin_s == 2.6  # the 61-frame window at 24 fps
    assert settings_for(data_config("paper"), train=False).short_side == 224
    assert settings_for(data_config("paper", crop_size=160), train=True).short_side == 229
    assert settings_for(data_config("paper"), True, short_side=256).short_side == 256


def _write_manifest(path, rows):
    lines = ["path,label,start_s,end_s"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_resume_after_kill(tmp_path):
    """Kill a real `mmt-fast prepare` mid-run, run it again: every clip verified and in the
    manifest, the clips finished before the kill not redone, no temporary file left."""
    _textured(tmp_path / "long.mp4", 96, seconds=8.0, fps=25)
    n = 30
    rows = [("long.mp4", f"c{k % 3}", f"{0.2 * k:.1f}", f"{0.2 * k + 1.0:.1f}") for k in range(n)]
    man = _write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmt_fast.cli", "prepare", "--manifest", str(man), "--out",
           str(out), "--workers", "1", "--margin", "0.5", "--short-side", "64", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), *sys.path])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("clips/*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.with_suffix(".mp4"): p.with_suffix(".mp4").stat().st_mtime_ns
                for p in out.glob("clips/*.json")}  # fmt: skip
    assert 3 <= len(finished) < n, "the run was not interrupted mid-way"
    assert not (out / "manifest.csv").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["done_before"] == len(finished)
    assert report["prepared"] == n - len(finished) and report["unusable_counts"] == {}
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # not redone
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    recs = read_manifest(out / "manifest.csv")
    assert len(recs) == n and len({r.path for r in recs}) == n
    cfg = DataConfig(mode="test", num_views=1, num_frames=4, stride=2, crop_size=32,
                     target_length=128, on_error="raise")  # fmt: skip
    ds = AVClipDataset(recs, cfg)
    for i in range(0, n, 7):
        assert ds[i]["video"].shape == (3, 4, 32, 32)
    for rec in recs:  # every output decodes whole at its size
        vr = Vd.open_video(rec.path)
        assert vr[len(vr) - 1].shape == (64, 128, 3)
    # a third run has nothing to do
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads((out / "prepare_report.json").read_text())["done_before"] == n


def test_unusable_inputs_are_reported(tmp_path, capsys):
    import av

    good = synthetic_clip(tmp_path / "good.mp4", seed=1)
    synthetic_clip(tmp_path / "mute.mp4", seed=2, audio=False)
    truncate(synthetic_clip(tmp_path / "full.mp4", seed=3), tmp_path / "cut.mp4", 0.4)
    timed_clip(tmp_path / "stream.ts", CFR, EVENTS, fmt="mpegts")
    (tmp_path / "folder.mp4").mkdir()
    with av.open(str(tmp_path / "song.m4a"), "w", format="mp4") as c:  # audio only
        st = c.add_stream("aac", rate=SR)
        st.layout = "mono"
        fr = av.AudioFrame.from_ndarray(np.zeros((1, SR), np.float32), format="fltp", layout="mono")
        fr.sample_rate, fr.pts = SR, 0
        for p in [*st.encode(fr), *st.encode(None)]:
            c.mux(p)
    rows = [
        ("good.mp4", "a", "", ""), ("mute.mp4", "a", "", ""), ("missing.mp4", "a", "", ""),
        ("folder.mp4", "a", "", ""), ("cut.mp4", "a", "", ""), ("stream.ts", "a", "", ""),
        ("song.m4a", "a", "", ""), ("good.mp4", "b", "30.0", "31.0"),
    ]  # fmt: skip
    man = _write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    code = cli_main(["prepare", "--manifest", str(man), "--out", str(out), "--workers", "2",
                     "--short-side", "32", "--no-progress"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert (
        "disk:" in err
        and "unusable: bad_segment 1, corrupt_file 1, missing_file 2, no_video 1, " in err
    )
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["unusable_counts"] == {
        "bad_segment": 1, "corrupt_file": 1, "missing_file": 2, "no_video": 1,
        "unsupported_format": 1,
    }  # fmt: skip
    paths = {k: sorted(Path(u["path"]).name for u in v) for k, v in report["unusable"].items()}
    assert paths["missing_file"] == ["folder.mp4", "missing.mp4"]
    assert paths["corrupt_file"] == ["cut.mp4"] and paths["unsupported_format"] == ["stream.ts"]
    assert paths["no_video"] == ["song.m4a"] and paths["bad_segment"] == ["good.mp4"]
    assert [Path(w["path"]).name for w in report["warnings"]["no_audio"]] == ["mute.mp4"]
    with open(out / "manifest.csv") as f:
        assert [Path(r["source"]).name for r in csv.DictReader(f)] == ["good.mp4", "mute.mp4"]
    assert report["bytes"]["prepared"] > 0 and good.is_file()
    # nothing usable: a data error (exit code 3) after the report is written
    man2 = _write_manifest(tmp_path / "m2.csv", [("missing.mp4", "a", "", "")])
    assert cli_main(["prepare", "--manifest", str(man2), "--out", str(tmp_path / "o2"),
                     "--no-progress"]) == 3  # fmt: skip
    assert (tmp_path / "o2" / "prepare_report.json").is_file()
    assert cli_main(["prepare", "--manifest", str(tmp_path / "nope.csv"), "--out", "x"]) == 2


def test_prepare_shards_load_like_the_folder(timed, tmp_path):
    """`prepare --shards`: the clips read from the shards (bytes in memory, the wav's start tag
    included) equal those read from the prepared folder."""
    from mmt_fast.data.shards import ShardClips

    src, _, _, _ = timed
    rows = ["path,label,split"] + [f"{src[k]},a,test" for k in ("delayed", "vfr")]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["prepare", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--split",
            "test", "--gop", "4", "--shards", "--workers", "1", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    cfg = DataConfig(mode="test", num_views=2, num_frames=4, stride=2, crop_size=32,
                     target_length=256)  # fmt: skip
    shards = ShardClips(out / "shards" / "test" / "index.json", "test", cfg)
    folder = AVClipDataset(read_manifest(out / "manifest.csv", split="test"), cfg)
    assert len(shards) == len(folder) == 2
    for i in range(2):
        a, b = shards[i], folder[i]
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    assert open_audio(folder.records[0].path).start > 0.8  # the delayed track's start survives


def test_flac_sidecar_and_changed_settings(timed, tmp_path):
    """FLAC sidecars keep the clock (and the late start); preparing again with other settings
    redoes the clip and leaves one sidecar."""
    src, _, _, _ = timed
    rec = ClipRecord(str(src["delayed"]), "d", label="a")
    flac = PrepareSettings(short_side=320, gop=4, audio_subtype="FLAC")
    prepare_dataset([rec], tmp_path, flac, progress=False)
    (new,) = read_manifest(tmp_path / "manifest.csv")
    assert Path(new.path).with_suffix(".flac").is_file()
    assert not Path(new.path).with_suffix(".wav").exists()
    assert open_audio(new.path).start > 0.8
    assert np.abs(clicks(new.path) - clicks(src["delayed"])).max() < 1e-3
    report = prepare_dataset(
        [rec], tmp_path, PrepareSettings(short_side=320, gop=4), progress=False
    )
    assert report["prepared"] == 1 and report["done_before"] == 0  # settings changed: redone
    assert Path(new.path).with_suffix(".wav").is_file()
    assert not Path(new.path).with_suffix(".flac").exists()


def test_prepare_from_a_config(tmp_path, capsys):
    """--config: the configured splits, the split column, sizes from the data settings."""
    from mmt_fast.data.synthetic import main as synthetic_main

    data = tmp_path / "syn"
    synthetic_main(["--out", str(data), "--num-clips", "20", "--size", "64", "--duration", "1"])
    cfg = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"
    man = data / "manifest.csv"
    over = [f"data.train={man}", f"data.val={man}", f"data.test={man}"]
    out = tmp_path / "out"
    assert cli_main(["prepare", "--config", str(cfg), "--out", str(out), "--workers", "1",
                     "--no-progress", *over]) == 0  # fmt: skip
    err = capsys.readouterr().err
    # the tiny preset: 32 px crops -> decode short side round(32 * 320 / 224) = 46 px
    assert (
        "short side 46 px, smaller sources kept at their size; keyframe every 4 frames" in err
        and "data.format=manifest" in err
    )
    assert "3 B-frames between references" in err  # the config's stride 4
    src = {r.clip_id: r for r in read_manifest(man)}
    new = read_manifest(out / "manifest.csv")
    assert sorted(r.clip_id for r in new) == sorted(src)
    for r in new:
        assert r.split == src[r.clip_id].split and r.label == src[r.clip_id].label
        assert Vd.open_video(r.path)[0].shape == (46, 46, 3)
    # only the test split: the crop size
    out2 = tmp_path / "out2"
    assert cli_main(["prepare", "--config", str(cfg), "--out", str(out2), "--split", "test",
                     "--workers", "1", "--no-progress", *over]) == 0  # fmt: skip
    new = read_manifest(out2 / "manifest.csv")
    assert {r.split for r in new} == {"test"} and len(new) == sum(
        r.split == "test" for r in src.values()
    )
    assert Vd.open_video(new[0].path)[0].shape == (32, 32, 3)


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_source_stays_upright(tmp_path, rotation):
    """A phone video stored sideways with a display matrix: the prepared copy keeps the
    matrix, so the loader's decoder returns the same upright picture from both."""
    import fractions

    import av

    upright = np.zeros((48, 80, 3), np.uint8)
    upright[:16, :40] = (255, 0, 0)  # a red block at the top left of the upright picture
    stored = np.ascontiguousarray(np.rot90(upright, k=-(rotation // 90)))
    src = tmp_path / "phone.mp4"
    with av.open(str(src), "w") as c:
        vs = c.add_stream("libx264", rate=10)
        vs.width, vs.height, vs.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "8", "threads": "1"}
        vs.codec_context.time_base = fractions.Fraction(1, 10)
        vs.set_display_rotation(rotation)
        for _ in range(6):
            for p in vs.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
    a = Vd.open_video(str(src))[0].asnumpy()
    assert a.shape == (48, 80, 3) and a[:16, :40, 0].mean() > 200  # decord turns it upright
    report = prepare_dataset([ClipRecord(str(src), "p", label="a")], tmp_path / "out",
                             PrepareSettings(short_side=320, gop=4), progress=False)  # fmt: skip
    assert report["unusable_counts"] == {}
    (new,) = read_manifest(tmp_path / "out" / "manifest.csv")
    b = Vd.open_video(new.path)[0].asnumpy()
    assert b.shape == a.shape and np.abs(b.astype(int) - a).mean() < 3
    # decord reads it (the packet reader does not turn frames upright): no B-frames
    assert Vd.open_clip(new.path)[1] is None
    with av.open(new.path) as c:
        assert all(p.pts == p.dts for p in c.demux(c.streams.video[0]) if p.size)


def test_epic_kitchens_segments_are_cut(tmp_path):
    """Epic-Kitchens narrations: each segment cut from the long video with the margin, its
    times shifted to the cut, verb and noun kept; the frames are the same as the source's."""
    _textured(tmp_path / "P01_01.mp4", 48, seconds=8.0, fps=25)
    rows = [
        "participant_id,video_id,narration_id,start_timestamp,stop_timestamp,verb_class,noun_class",
        "P01,P01_01,P01_01_0,00:00:01.00,00:00:02.50,3,7",
        "P01,P01_01,P01_01_1,00:00:05.20,00:00:06.00,1,12",
    ]
    (tmp_path / "EPIC_100_train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = ["prepare", "--manifest", str(tmp_path / "EPIC_100_train.csv"), "--format",
            "epic_kitchens", "--out", str(out), "--split", "train", "--margin", "0.8",
            "--short-side", "48", "--workers", "1", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    new = {r.clip_id: r for r in read_manifest(out / "manifest.csv")}
    assert (new["P01_01_0"].verb, new["P01_01_0"].noun, new["P01_01_1"].verb) == (3, 7, 1)
    for cid, (s, e) in {"P01_01_0": (1.0, 2.5), "P01_01_1": (5.2, 6.0)}.items():
        r = new[cid]
        vr = Vd.open_video(r.path)
        assert len(vr) == sum(s - 0.8 <= k / 25 < e + 0.8 for k in range(200))  # the cut
        off = s - 0.8
        assert r.start_s == pytest.approx(s - off) and r.end_s == pytest.approx(e - off)
        cfg = DataConfig(mode="test", num_views=2, num_frames=4, stride=2, crop_size=32,
                         target_length=128)  # fmt: skip
        src = ClipRecord(str(tmp_path / "P01_01.mp4"), cid, verb=0, noun=0, start_s=s, end_s=e)
        a, b = AVClipDataset([src], cfg)[0], AVClipDataset([r], cfg)[0]
        assert (a["video"] - b["video"]).abs().mean() < 0.1  # the same frames, re-encoded
        assert torch.allclose(a["audio"], b["audio"], atol=0.05)
