"""Training that never lies: unusable splits, runs without a valid batch, non-finite
losses, bad config values and damaged checkpoints end with a clear one-line error and
an exit code that says who must act (2 config, 3 data, 4 runtime), and the work done
so far is kept."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmt_fast.cli import main
from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.errors import CheckpointError
from mmt_fast.run.checkpoint import CheckpointManager, load_checkpoint, load_latest_loadable

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"
FAST = [
    "data.num_workers=0",
    "train.torch_threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.epochs=1",
    "train.batch_size=4",
    "train.ckpt_every=null",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # 24 clips: 16 train, 4 val, 4 test
    return make_synthetic(tmp_path_factory.mktemp("syn"), num_clips=24, size=32, duration=1.0)


def _rows(manifest):
    return list(csv.DictReader(open(manifest)))


def _write(path, rows, fields=None):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows({k: r[k] for k in (fields or r)} for r in rows)
    return path


def _run(manifest, out, *extra, capsys=None, train=None, val=None, root=None):
    manifest = Path(manifest)
    ov = [
        f"data.train={train or manifest}",
        f"data.val={val or manifest}",
        f"data.test={manifest}",
        f"data.root={manifest.parent}",  # the manifests written by the tests sit elsewhere
        f"train.out_dir={out}",
        *FAST,
        *extra,
    ]
    rc = main(["train", "--config", str(DEMO), *ov])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def _error_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("mmt-fast: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unusable_val_split_stops_before_training(manifest, tmp_path, capsys):
    rows = _rows(manifest)
    for r in rows:
        if r["split"] == "val":
            r["label"] = r["label"] + "x"  # a spelling difference: no val label is known
    m = _write(manifest.parent / f"{tmp_path.name}_m.csv", rows)
    rc, err = _run(m, tmp_path / "run", "data.cache=false", capsys=capsys)
    line = _error_line(err)
    assert rc == 3 and "data error" in line and "val split" in line
    assert "unknown_label" in line and "clip_" in line  # counts per kind and first files
    # stopped before training: no checkpoint, no metric, no model built
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.csv").exists() and "model MMT" not in err


def test_wrong_root_is_a_data_error(manifest, tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    rc, err = _run(manifest, tmp_path / "run", f"data.root={root}", capsys=capsys)
    line = _error_line(err)
    assert rc == 3 and "train split has no usable clip" in line and "missing_file" in line


def test_all_clips_corrupt_fails_without_checkpoint(manifest, tmp_path, capsys):
    d = tmp_path / "corrupt"
    d.mkdir()
    rows = _rows(manifest)
    for r in rows:
        (d / Path(r["path"]).name).write_bytes(b"\x00" * 2048)
    rc, err = _run(manifest, tmp_path / "run", f"data.root={d}", "data.cache=false", capsys=capsys)
    line = _error_line(err)
    assert rc == 3 and "no training step saw a valid clip" in line and "corrupt_file" in line
    assert not CheckpointManager(tmp_path / "run" / "checkpoints").steps()


def test_val_failure_after_the_epoch_keeps_its_checkpoint(manifest, tmp_path, capsys):
    d = tmp_path / "media"
    shutil.copytree(manifest.parent, d)
    for r in _rows(manifest):
        if r["split"] == "val":
            (d / r["path"]).write_bytes(b"\x00" * 2048)  # present but undecodable
    m = d / "manifest.csv"
    rc, err = _run(m, tmp_path / "run", "data.cache=false", "train.eval_every=1", capsys=capsys)
    line = _error_line(err)
    assert rc == 3 and "no clip of the val split could be loaded" in line
    steps = CheckpointManager(tmp_path / "run" / "checkpoints").steps()
    assert steps == [4]  # 16 clips / batch 4: the epoch's checkpoint is on disk


def test_nonfinite_loss_stops_without_nan_weights(manifest, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _run(manifest, out, "optim.lr=1.0e6", "train.epochs=3", capsys=capsys)
    line = _error_line(err)
    assert rc == 4 and "runtime error" in line and "non-finite" in line
    for step in CheckpointManager(out / "checkpoints").steps():
        ck = load_checkpoint(out / "checkpoints" / f"step_{step:09d}")
        assert all(torch.isfinite(v).all() for v in ck.model.values())


def test_nonfinite_skip_counts_and_gives_up(manifest, tmp_path, capsys, caplog):
    rc, err = _run(
        manifest, tmp_path / "run", "optim.lr=1.0e6", "train.epochs=3",
        "train.nonfinite=skip", "train.max_nonfinite=2", capsys=capsys,
    )  # fmt: skip
    line = _error_line(err)
    assert rc == 4 and "2 updates in a row" in line and "skipping the update" in caplog.text


@pytest.mark.parametrize(
    "override,words",
    [
        ("train.log_every=0", "train.log_every=0; expected >= 1"),
        ("optim.lr=-1", "optim.lr=-1.0"),
        ("train.nonfinite=maybe", "train.nonfinite"),
        ("train.bogus=1", "unknown key"),
        ("data.train=/no/such/manifest.csv", "/no/such/manifest.csv does not exist"),
    ],
)
def test_config_errors_are_found_up_front(manifest, tmp_path, capsys, override, words):
    rc, err = _run(manifest, tmp_path / "run", override, capsys=capsys)
    line = _error_line(err)
    assert rc == 2 and "config error" in line and words in line, line
    assert not (tmp_path / "run").exists()  # found before anything was built or written


def test_unwritable_out_dir_is_found_up_front(manifest, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, err = _run(manifest, tmp_path / "file" / "run", capsys=capsys)
    assert rc == 2 and "train.out_dir: cannot write" in _error_line(err)
    assert "model MMT" not in err  # before the data is read or the model built


def test_debug_prints_the_traceback(manifest, tmp_path, capsys):
    rc, err = _run(manifest, tmp_path / "run", "train.log_every=0", "--debug", capsys=capsys)
    assert rc == 2 and "Traceback" in err and "ConfigError" in err


def test_shared_manifest_without_split_column(manifest, tmp_path, capsys):
    m = _write(manifest.parent / f"{tmp_path.name}_nosplit.csv", _rows(manifest), ["path", "label"])
    rc, err = _run(m, tmp_path / "run", capsys=capsys)
    line = _error_line(err)
    assert rc == 3 and "no 'split' column" in line and "data.val" in line


def test_resume_falls_back_to_the_newest_loadable_checkpoint(manifest, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    rc, _ = _run(manifest, out, "train.epochs=2", "train.eval_every=0", capsys=capsys)
    assert rc == 0
    mgr = CheckpointManager(out / "checkpoints")
    assert mgr.steps() == [4, 8]
    newest = mgr.path_of(8) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged
    rc, err = _run(manifest, out, "train.epochs=3", "train.eval_every=0", "--resume",
                   capsys=capsys)  # fmt: skip
    assert rc == 0, err
    assert "skipping a checkpoint" in caplog.text
    assert "step_000000008/model.safetensors" in caplog.text
    assert "resumed from" in err and "step_000000004" in err
    assert mgr.steps()[-1] == 12
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["step"] == 12 and summary["nonfinite_steps"] == 0


def test_missing_state_names_the_file(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model = {"w": torch.ones(2)}
    for step in (1, 2):
        mgr.save(step, model, {"step": step, "epoch": 0, "batch_in_epoch": 0,
                               "optimizer": {}, "scheduler": {}, "rng": []})  # fmt: skip
    (mgr.path_of(2) / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_000000002/state\.pt is missing"):
        load_checkpoint(mgr.path_of(2), require_state=True)
    ck, skipped = load_latest_loadable(mgr)
    assert ck.step == 1 and len(skipped) == 1 and "state.pt is missing" in skipped[0]
    (mgr.path_of(1) / "model.safetensors").write_bytes(b"junk")
    ck, skipped = load_latest_loadable(mgr)
    assert ck is None and len(skipped) == 2
    assert load_file(str(mgr.path_of(2) / "model.safetensors"))["w"].sum() == 2


def test_evaluate_counts_each_skipped_clip_once(manifest, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(manifest, out, "train.eval_every=0", capsys=capsys)[0] == 0
    rows = _rows(manifest)
    test_rows = [r for r in rows if r["split"] == "test"]
    test_rows[0] = {**test_rows[0], "path": "gone.mp4"}
    test_rows.append({**test_rows[1], "label": "never-seen"})
    m = _write(manifest.parent / "eval.csv", [r for r in rows if r["split"] != "test"] + test_rows)
    res = tmp_path / "eval.json"
    rc = main(["evaluate", "--config", str(DEMO), "--checkpoint", str(out), "--no-plot",
               "--out", str(res), f"data.test={m}", f"data.train={m}", "data.val=null",
               "data.num_workers=0", "data.test_views=1", "train.progress=false"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = json.loads(res.read_text())
    assert r["num_clips"] == 3 and r["skipped"] == {"missing_file": 1, "unknown_label": 1}
    # a test split whose labels are all unknown: a data error before any decoding
    bad = [{**row, "label": row["label"] + "x"} for row in rows if row["split"] == "test"]
    keep = [row for row in rows if row["split"] != "test"]
    m2 = _write(manifest.parent / "eval_bad.csv", keep + bad)
    rc = main(
        [
            "evaluate",
            "--config",
            str(DEMO),
            "--checkpoint",
            str(out),
            "--no-plot",
            f"data.test={m2}",
            f"data.train={m2}",
            "data.val=null",
            "data.num_workers=0",
        ]
    )
    line = _error_line(capsys.readouterr().err)
    assert rc == 3 and "the test split has no usable clip" in line and "unknown_label" in line
