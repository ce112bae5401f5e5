"""Unusable clips found early: ``mmt-fast check-data`` test-decodes every clip of a
config's manifests (real files broken in known ways: zero bytes, truncated, missing,
without an audio track) and reports each with its kind; during training, clips that
fail to load are counted per kind at once and ``data.max_bad_fraction`` stops the
epoch as soon as it is certain to be exceeded."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers_media import synthetic_clip, truncate

from mmt_fast.cli import main
from mmt_fast.data.check import check_clips
from mmt_fast.data.dataset import data_config
from mmt_fast.data.manifests import read_manifest
from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.run.checkpoint import CheckpointManager

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A copy of a 24-clip synthetic set with four train clips broken, and the truth."""
    src = make_synthetic(tmp_path_factory.mktemp("syn"), num_clips=24, size=32, duration=1.0)
    d = tmp_path_factory.mktemp("broken") / "media"
    shutil.copytree(src.parent, d)
    rows = list(csv.DictReader(open(d / "manifest.csv")))
    train = [r["path"] for r in rows if r["split"] == "train"]
    (d / train[1]).write_bytes(b"\x00" * 4096)
    truncate(src.parent / train[2], d / train[2], 0.6)
    (d / train[3]).unlink()
    synthetic_clip(d / train[5], duration=1.0, audio=False)
    truth = {
        str(d / train[1]): "corrupt_file",
        str(d / train[2]): "corrupt_file",
        str(d / train[3]): "missing_file",
        str(d / train[5]): "no_audio",
    }
    return d / "manifest.csv", truth, train


def _data(m):
    return [f"data.train={m}", f"data.val={m}", f"data.test={m}"]


def test_check_clips_finds_each_broken_file(broken):
    m, truth, _ = broken
    recs = [r for r in read_manifest(m) if r.split == "train"]
    probs = check_clips(recs, data_config("tiny"), workers=2, progress=False)
    assert {p.path: p.kind for p in probs} == truth
    assert [p.index for p in probs] == sorted(recs.index(r) for r in recs if r.path in truth)
    assert all(p.reason for p in probs)


def test_check_data_command_reports_and_exit_codes(broken, tmp_path, capsys):
    m, truth, _ = broken
    out = tmp_path / "report.json"
    rc = main(["check-data", "--config", str(DEMO), "--workers", "2", "--out", str(out), *_data(m)])
    err = capsys.readouterr().err
    assert rc == 3 and "mmt-fast: data error: unusable clips: train 4/16" in err
    assert "train: 16 clips, 4 unusable (corrupt_file 2, missing_file 1, no_audio 1)" in err
    assert "val: 4 clips, 0 unusable" in err and "clip/s" in err  # the progress bar
    r = json.loads(out.read_text())
    assert r["splits"]["train"] == {
        "clips": 16,
        "unusable": 4,
        "per_kind": {"corrupt_file": 2, "missing_file": 1, "no_audio": 1},
    }
    assert r["splits"]["test"]["unusable"] == 0
    assert {u["path"]: u["kind"] for u in r["unusable"]} == truth
    # one split, tolerated fraction, CSV, in this process
    out_csv = tmp_path / "report.csv"
    rc = main(
        ["check-data", "--config", str(DEMO), "--workers", "0", "--out", str(out_csv),
         "--max-bad-fraction", "0.25", "--no-progress", *_data(m), "--split", "train"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out_csv)))
    assert {r["path"]: r["kind"] for r in rows} == truth and {r["split"] for r in rows} == {"train"}
    rc = main(["check-data", "--config", str(DEMO), "--workers", "-1", *_data(m)])
    assert rc == 2 and "--workers=-1" in capsys.readouterr().err


FAST = [
    "data.num_workers=0",
    "data.cache=false",
    "train.torch_threads=1",
    "train.tensorboard=false",
    "train.epochs=1",
    "train.batch_size=4",  # 16 train clips: 4 steps
    "train.ckpt_every=null",
    "train.eval_every=0",
    "train.log_every=1",
]


def test_training_counts_bad_clips_per_kind_at_once(broken, tmp_path, capsys):
    m, truth, _ = broken
    out = tmp_path / "run"
    rc = main(["train", "--config", str(DEMO), *_data(m), f"train.out_dir={out}", *FAST,
               "train.progress=false"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "clips that fail to load so far:" in err
    s = json.loads((out / "train_summary.json").read_text())
    assert {p: b["kind"] for p, b in s["bad_clips"].items()} == truth
    assert s["skipped_clips"] == {"corrupt_file": 2, "missing_file": 1, "no_audio": 1}


def test_max_bad_fraction_stops_during_the_epoch(broken, tmp_path, capsys):
    """10 of 16 train clips unusable, at most 25 %: after 3 of the 4 steps at least
    6 bad clips were drawn, more than 4, so the run stops before the epoch ends."""
    m, _, train = broken
    d = tmp_path / "media"
    shutil.copytree(Path(m).parent, d)
    for name in train[6:12]:
        (d / name).write_bytes(b"")
    out = tmp_path / "run"
    rc = main(["train", "--config", str(DEMO), *_data(d / "manifest.csv"), f"train.out_dir={out}",
               *FAST, "data.max_bad_fraction=0.25", "train.progress=true"])  # fmt: skip
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("mmt-fast: ")][-1]
    assert rc == 3 and "max_bad_fraction=0.25" in line and "of the 16 clips" in line, err
    step = int(line.split(", step ")[1].split(":")[0])
    assert step <= 3  # not at the end of the epoch
    assert "bad=corrupt_file" in err  # shown in the progress line as they came
    assert not CheckpointManager(out / "checkpoints").steps()
