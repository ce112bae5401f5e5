"""Bad data: each case raises a clear BadClipError, or is skipped and counted."""

import pickle

import pytest
from helpers_media import synthetic_clip, truncate
from torch.utils.data import DataLoader

from mmt_fast.data import (
    AVClipDataset,
    BadClipError,
    BadItem,
    ClassIndex,
    ClipRecord,
    DataConfig,
    collate_clips,
)

CFG = dict(num_frames=4, stride=2, crop_size=16, target_length=128)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = synthetic_clip(d / "good.mp4")
    (d / "garbage.mp4").write_text("this is not a video\n")
    return {
        "good": good,
        "missing_file": d / "missing.mp4",
        "corrupt_file": truncate(good, d / "truncated.mp4", 0.5),
        "garbage": d / "garbage.mp4",
        "no_audio": synthetic_clip(d / "silent_film.mp4", audio=False),
        "short": synthetic_clip(d / "short.mp4", duration=0.5),  # 5 frames
    }


def rec(path, label="a", **kw):
    return ClipRecord(str(path), path.stem, label=label, **kw)


CASES = [
    ("missing_file", "missing_file", "does not exist", {}),
    ("corrupt_file", "corrupt_file", "truncated or corrupt", {}),
    ("garbage", "corrupt_file", "truncated or corrupt", {}),
    ("no_audio", "no_audio", "no audio track", {}),
    ("short", "short_clip", "the window needs 7", {"short_clip": "error"}),
    ("good", "bad_segment", "segment", {"_segment": (9.0, 12.0)}),
]


@pytest.mark.parametrize("name,kind,words", [c[:3] for c in CASES])
def test_raise_names_file_and_problem(clips, name, kind, words):
    extra = dict(next(c[3] for c in CASES if c[0] == name and c[1] == kind))
    seg = extra.pop("_segment", (None, None))
    r = rec(clips[name], start_s=seg[0], end_s=seg[1])
    ds = AVClipDataset([r], DataConfig(**CFG, **extra))
    with pytest.raises(BadClipError) as e:
        ds[0]
    assert e.value.kind == kind and e.value.path == str(clips[name])
    assert str(clips[name]) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("name,kind", [c[:2] for c in CASES])
def test_skip_returns_bad_item_and_counts(clips, name, kind):
    extra = dict(next(c[3] for c in CASES if c[0] == name and c[1] == kind))
    seg = extra.pop("_segment", (None, None))
    r = rec(clips[name], start_s=seg[0], end_s=seg[1])
    ds = AVClipDataset([r, rec(clips["good"])], DataConfig(**CFG, on_error="skip", **extra))
    bad = ds[0]
    assert isinstance(bad, BadItem) and bad.kind == kind and bad.path == str(clips[name])
    assert ds.skip_counts == {kind: 1}
    batch = collate_clips([bad, ds[1], None])
    assert batch["batch_size"] == 1 and batch["video"].shape[0] == 1
    assert batch["skipped"] == {kind: 1, "unknown": 1} and batch["bad"] == [bad]


def test_no_audio_is_fine_for_video_only(clips):
    item = AVClipDataset([rec(clips["no_audio"])], DataConfig(**CFG, modalities="video"))[0]
    assert "audio" not in item and item["video"].shape == (3, 4, 16, 16)


def test_unknown_label(clips):
    records = [rec(clips["good"], "a"), rec(clips["good"], "zebra")]
    ci = ClassIndex(["a", "b"])
    with pytest.raises(BadClipError, match="'zebra' is not in the class list") as e:
        AVClipDataset(records, DataConfig(**CFG), class_index=ci)
    assert e.value.kind == "unknown_label" and e.value.path == str(clips["good"])
    ds = AVClipDataset(records, DataConfig(**CFG, on_error="skip"), class_index=ci)
    assert len(ds) == 1 and ds.skip_counts == {"unknown_label": 1}
    vn = [ClipRecord(str(clips["good"]), "x", verb=120, noun=3)]
    with pytest.raises(BadClipError, match=r"verb class 120 outside \[0, 97\)"):
        AVClipDataset(vn, DataConfig(**CFG))


def test_verb_noun_targets(clips):
    ds = AVClipDataset([ClipRecord(str(clips["good"]), "x", verb=5, noun=299)], DataConfig(**CFG))
    item = ds[0]
    assert item["verb"].item() == 5 and item["noun"].item() == 299 and "label" not in item


def test_error_pickles():
    e = pickle.loads(pickle.dumps(BadClipError("/a.mp4", "broken", "corrupt_file")))
    assert (e.path, e.reason, e.kind) == ("/a.mp4", "broken", "corrupt_file")


def test_dataloader_workers_skip_and_count(clips):
    names = ["good", "missing_file", "corrupt_file", "garbage", "no_audio", "short", "good"]
    records = [rec(clips[n]) for n in names] * 2
    ds = AVClipDataset(records, DataConfig(**CFG, on_error="skip", short_clip="pad"))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_clips, timeout=60)
    total, skipped, warnings, seen = 0, {}, {}, []
    for batch in loader:
        total += batch["batch_size"]
        if batch["batch_size"]:
            seen += batch["index"].tolist()
        for src, dst in ((batch["skipped"], skipped), (batch["warnings"], warnings)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
    assert total == 6 and sorted(seen) == [0, 5, 6, 7, 12, 13]
    assert skipped == {"missing_file": 2, "corrupt_file": 4, "no_audio": 2}
    assert warnings == {"short_clip": 2}


def test_dataloader_workers_raise_names_file(clips):
    ds = AVClipDataset([rec(clips["good"]), rec(clips["corrupt_file"])], DataConfig(**CFG))
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_clips, timeout=60)
    with pytest.raises(Exception, match=r"truncated\.mp4"):
        for _ in loader:
            pass


def test_failed_load_in_parent_does_not_hang_forked_workers(clips):
    """Regression: decord readers kept alive by a stored traceback hung forked workers."""
    cfg = DataConfig(**CFG)
    ds = AVClipDataset([rec(clips["good"], start_s=9.0, end_s=12.0), rec(clips["good"])], cfg)
    errors = []
    for _ in range(3):
        try:
            ds[0]
        except BadClipError as e:
            errors.append(e)  # keep the tracebacks alive across the fork
    good = AVClipDataset([rec(clips["good"])] * 4, cfg)
    loader = DataLoader(good, batch_size=2, num_workers=2, collate_fn=collate_clips, timeout=60)
    assert sum(b["batch_size"] for b in loader) == 4 and len(errors) == 3
