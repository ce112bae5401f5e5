"""Manifest readers on small files in the official formats, and ClassIndex."""

import collections
import json

import pytest

from mmt_fast.data import (
    KINETICS_SOUNDS_CLASSES,
    BadClipError,
    ClassIndex,
    parse_timestamp,
    read_epic_kitchens,
    read_kinetics_sounds,
    read_manifest,
    read_vggsound,
)
from mmt_fast.errors import DataError


def test_vggsound_no_header_quoted_labels_and_path_rules(tmp_path):
    root = tmp_path / "vgg"
    (root / "test").mkdir(parents=True)
    (root / "---g-f_I2yQ_000001.mp4").touch()
    (root / "test" / "abc_000030.mp4").touch()
    (tmp_path / "vggsound.csv").write_text(
        "---g-f_I2yQ,1,people marching,test\n"
        'abc,30,"dog barking, growling",test\n'
        'xyz,7,"playing piano, keyboard",train\n'
    )
    recs = read_vggsound(tmp_path / "vggsound.csv", root)
    assert [r.clip_id for r in recs] == ["---g-f_I2yQ_000001", "abc_000030", "xyz_000007"]
    assert [r.label for r in recs] == [
        "people marching",
        "dog barking, growling",
        "playing piano, keyboard",
    ]
    assert recs[0].path == str(root / "---g-f_I2yQ_000001.mp4")
    assert recs[1].path == str(root / "test" / "abc_000030.mp4")  # second rule
    assert recs[2].path == str(root / "xyz_000007.mp4")  # missing: first candidate
    assert recs[0].start_s is None and recs[0].end_s is None
    assert [r.clip_id for r in read_vggsound(tmp_path / "vggsound.csv", root, split="train")] == [
        "xyz_000007"
    ]


def test_kinetics_sounds_headerless_paths_and_ids(tmp_path):
    (tmp_path / "playing_drums").mkdir()
    (tmp_path / "playing_drums" / "YT1.mp4").touch()
    (tmp_path / "ks.csv").write_text(
        'clips/a.mp4,"playing piano"\nYT1,playing drums\nYT2,singing\n'
    )
    recs = read_kinetics_sounds(tmp_path / "ks.csv", tmp_path)
    assert [(r.path, r.label) for r in recs] == [
        (str(tmp_path / "clips" / "a.mp4"), "playing piano"),
        (str(tmp_path / "playing_drums" / "YT1.mp4"), "playing drums"),
        (str(tmp_path / "YT2.mp4"), "singing"),
    ]


def test_kinetics_sounds_official_header_and_unknown_labels(tmp_path):
    (tmp_path / "train" / "playing organ").mkdir(parents=True)
    (tmp_path / "train" / "playing organ" / "abc_000010_000020.mp4").touch()
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "playing organ,abc,10,20,train\n"
        "abseiling,zzz,0,10,train\n"
    )
    with pytest.raises(BadClipError, match="abseiling") as e:
        read_kinetics_sounds(csv_path, tmp_path)
    assert e.value.kind == "unknown_label" and "zzz" in e.value.path
    skipped = collections.Counter()
    recs = read_kinetics_sounds(csv_path, tmp_path, on_error="skip", skipped=skipped)
    assert skipped == {"unknown_label": 1}
    assert len(recs) == 1 and recs[0].split == "train"
    assert recs[0].path == str(tmp_path / "train" / "playing organ" / "abc_000010_000020.mp4")
    assert len(read_kinetics_sounds(csv_path, tmp_path, classes=None)) == 2


def test_kinetics_sounds_default_classes():
    assert len(KINETICS_SOUNDS_CLASSES) == 32 == len(set(KINETICS_SOUNDS_CLASSES))


EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
    "start_frame,stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n"
)


def test_epic_kitchens(tmp_path):
    (tmp_path / "P01" / "videos").mkdir(parents=True)
    (tmp_path / "P01" / "videos" / "P01_01.MP4").touch()
    csv_path = tmp_path / "EPIC_100_train.csv"
    csv_path.write_text(
        EPIC_HEADER
        + "P01_01_0,P01,P01_01,00:00:01.089,00:00:00.14,00:00:03.37,8,202,open door,open,3,"
        "door,8,['door'],[8]\n"
        + 'P02_03_7,P02,P02_03,00:01:02.00,01:02:03.50,01:02:05.25,1,2,"take plate, cup",'
        "take,0,plate,2,\"['plate', 'cup']\",\"[2, 7]\"\n"
    )
    recs = read_epic_kitchens(csv_path, tmp_path)
    assert recs[0].path == str(tmp_path / "P01" / "videos" / "P01_01.MP4")
    assert recs[1].path == str(tmp_path / "P02" / "videos" / "P02_03.MP4")  # first candidate
    assert (recs[0].verb, recs[0].noun, recs[1].verb, recs[1].noun) == (3, 8, 0, 2)
    assert recs[0].start_s == pytest.approx(0.14) and recs[0].end_s == pytest.approx(3.37)
    assert recs[1].start_s == pytest.approx(3723.5) and recs[1].end_s == pytest.approx(3725.25)
    assert recs[1].clip_id == "P02_03_7" and recs[0].label is None
    (tmp_path / "P02_03.mp4").touch()  # flat layout
    assert read_epic_kitchens(csv_path, tmp_path)[1].path == str(tmp_path / "P02_03.mp4")


def test_parse_timestamp():
    assert parse_timestamp("00:00:01.089") == pytest.approx(1.089)
    assert parse_timestamp("01:02:03.5") == pytest.approx(3723.5)
    assert parse_timestamp("2.5") == 2.5


def test_plain_csv_and_jsonl(tmp_path):
    (tmp_path / "m.csv").write_text(
        'path,label,start_s,end_s,split\na.mp4,"x, y",1.5,3,train\n/abs/b.mp4,z,,,val\n'
    )
    recs = read_manifest(tmp_path / "m.csv")
    assert recs[0].path == str(tmp_path / "a.mp4") and recs[0].label == "x, y"
    assert (recs[0].start_s, recs[0].end_s, recs[0].split) == (1.5, 3.0, "train")
    assert recs[1].path == "/abs/b.mp4" and recs[1].start_s is None
    assert [r.label for r in read_manifest(tmp_path / "m.csv", split="val")] == ["z"]
    lines = [
        {"path": "v/c.mp4", "verb": 4, "noun": 17, "start": 2.0, "end": 4.0},
        {"path": "v/d.mp4", "verb": "cut", "noun": "onion"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    recs = read_manifest(tmp_path / "m.jsonl", root=tmp_path / "data")
    assert recs[0].path == str(tmp_path / "data" / "v" / "c.mp4")
    assert (recs[0].verb, recs[0].noun, recs[0].start_s, recs[0].end_s) == (4, 17, 2.0, 4.0)
    assert (recs[1].verb, recs[1].noun, recs[1].label) == ("cut", "onion", None)
    (tmp_path / "bad.csv").write_text("path,foo\na.mp4,1\n")
    with pytest.raises(ValueError, match="neither 'label'"):
        read_manifest(tmp_path / "bad.csv")


def test_class_index(tmp_path):
    ci = ClassIndex.from_labels(["dog", "cat", "dog", "bird"])
    assert ci.names == ["bird", "cat", "dog"] and ci.index("dog") == 2 and ci.name(0) == "bird"
    assert ClassIndex.from_labels(["10", "2", "1"]).names == ["1", "2", "10"]
    explicit = ClassIndex(["z", "a"])
    assert explicit.index("z") == 0 and "a" in explicit and "q" not in explicit
    assert ClassIndex.from_json(ci.to_json()) == ci
    ci.save(tmp_path / "classes.json")
    assert ClassIndex.load(tmp_path / "classes.json") == ci
    with pytest.raises(KeyError, match="'fish' not in the class list"):
        ci.index("fish")
    with pytest.raises(ValueError, match="duplicate"):
        ClassIndex(["a", "a"])


def test_manifest_bom_crlf_and_spaces(tmp_path):
    text = "path, label, split, start_s\r\na.mp4, dog, train, 1.5\r\nb.mp4, cat, val,\r\n"
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # spreadsheet export
    recs = read_manifest(tmp_path / "m.csv")
    assert [(r.path, r.label, r.split, r.start_s) for r in recs] == [
        (str(tmp_path / "a.mp4"), "dog", "train", 1.5),
        (str(tmp_path / "b.mp4"), "cat", "val", None),
    ]


@pytest.mark.parametrize(
    "row,words",
    [
        ("a.mp4,dog,nan,", "start time nan s is not a finite number"),
        ("a.mp4,dog,inf,", "start time inf s"),
        ("a.mp4,dog,-2,", "start time -2.0 s"),
        ("a.mp4,dog,3,2", "end time 2.0 s is not after the start time 3.0 s"),
        ("a.mp4,dog,abc,", "start_s='abc' is not a number"),
        (",dog,1,", "row has no 'path'"),
    ],
)
def test_manifest_bad_times_name_the_line(tmp_path, row, words):
    (tmp_path / "m.csv").write_text(f"path,label,start_s,end_s\nok.mp4,cat,0,1\n{row}\n")
    with pytest.raises(DataError) as e:
        read_manifest(tmp_path / "m.csv")
    assert str(tmp_path / "m.csv") + ":3:" in str(e.value) and words in str(e.value)
