"""Kill-and-resume: an interrupted run, resumed, ends with the same weights as an
uninterrupted one (deterministic CPU settings), including a mid-epoch stop with
gradient accumulation, drop-path RNG, augmentation and multi-process loading; a run
killed with SIGKILL; a run preempted with SIGTERM (checkpoint, exit code 75); and
time-based checkpoints."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from config_helpers import as_overrides

from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.run import load_checkpoint, load_config
from mmt_fast.run.checkpoint import CheckpointManager
from mmt_fast.train import train

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # 24 clips: 16 train, 4 val, 4 test
    return make_synthetic(
        tmp_path_factory.mktemp("syn"), num_clips=24, size=32, duration=1.0, fps=16
    )


def _overrides(manifest, out_dir, **extra):
    o = {
        "data.train": str(manifest),
        "data.val": str(manifest),
        "data.test": str(manifest),
        "data.num_workers": 0,
        "data.cache": False,  # real augmentation: random windows, crops, SpecAugment
        "model.overrides": {"audio__drop_path_rate": 0.2, "video__drop_path_rate": 0.2},
        "train.out_dir": str(out_dir),
        "train.batch_size": 2,
        "train.grad_accum": 2,  # 8 micro-batches = 4 steps per epoch
        "train.epochs": 2,
        "train.ckpt_every": 3,  # step 3 and 6 fall mid-epoch
        "train.log_every": 2,
        "train.eval_every": 1,
        "train.deterministic": True,
        "train.torch_threads": 1,
        "train.progress": False,
        "train.tensorboard": False,
        "schedule.warmup_steps": 2,
    }
    o.update(extra)
    return as_overrides(o)


def _wait_for_checkpoint(p, mgr, timeout=180):
    """Until ``mgr`` holds a checkpoint or ``p`` has ended (no time limit on the run
    itself: the deadline only stops a hung test)."""
    deadline = time.time() + timeout
    while not mgr.steps() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def _val_rows(out_dir):
    """{step: val/top1} of a run's metrics.csv (the last row of each step)."""
    rows = csv.DictReader(open(Path(out_dir) / "metrics.csv"))
    return {int(r["step"]): r["value"] for r in rows if r["name"] == "val/top1"}


def _final_weights(out_dir):
    return load_checkpoint(out_dir, which="latest").model


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = train(load_config(DEMO, _overrides(manifest, out)))
    assert res["step"] == 8 and not res["interrupted"]
    return out, res


def test_stop_and_resume_matches_uninterrupted(manifest, reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "run"
    # interrupted after step 7 (mid-epoch 1): the last checkpoint is step 6
    res = train(load_config(DEMO, _overrides(manifest, out, **{"train.stop_at_step": 7})))
    assert res["interrupted"] and res["step"] == 7
    assert CheckpointManager(out / "checkpoints").steps()[-1] == 6
    # resume with two loader workers: augmentation is seeded per clip, not per worker
    res2 = train(
        load_config(DEMO, _overrides(manifest, out, **{"data.num_workers": 2})), resume=True
    )
    assert res2["step"] == 8 and not res2["interrupted"]
    _assert_same(_final_weights(ref_dir), _final_weights(out))
    # optimizer state and best-checkpoint bookkeeping are restored too
    a = load_checkpoint(ref_dir, which="latest").state
    b = load_checkpoint(out, which="latest").state
    for k, v in a["optimizer"]["state"].items():
        torch.testing.assert_close(
            v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"], rtol=0, atol=1e-9
        )
    assert a["scheduler"] == b["scheduler"]
    assert a["best"] == b["best"] and a["best"] is not None


def test_sigkill_and_resume_matches_uninterrupted(manifest, reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(load_config(DEMO, _overrides(manifest, out)).to_yaml())
    cmd = [sys.executable, "-m", "mmt_fast.cli", "train", "--config", str(cfg_file)]
    log = tmp_path / "stderr.txt"
    mgr = CheckpointManager(out / "checkpoints")
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait_for_checkpoint(p, mgr)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    # anything else (a crash before the first checkpoint, rc 1) is a failure, not a skip
    assert p.returncode == -signal.SIGKILL, f"rc {p.returncode}: {log.read_text()[-2000:]}"
    killed_at = mgr.steps()
    assert killed_at and killed_at[-1] < 8
    rc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "resumed from" in rc.stderr
    _assert_same(_final_weights(ref_dir), _final_weights(out))


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(manifest, reference, tmp_path):
    """SIGTERM to the whole process group (as SLURM sends it: the loader worker gets it
    too), then more SIGTERMs until the process is gone, so some arrive during the save:
    the step in flight ends, one complete checkpoint is written, the exit code is 75 and
    --resume reaches the uninterrupted run's weights and validation results."""
    ref_dir, _ = reference
    out = tmp_path / "term"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        load_config(DEMO, _overrides(manifest, out, **{"data.num_workers": 1})).to_yaml()
    )
    cmd = [sys.executable, "-m", "mmt_fast.cli", "train", "--config", str(cfg_file)]
    log = tmp_path / "stderr.txt"
    mgr = CheckpointManager(out / "checkpoints")
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            _wait_for_checkpoint(p, mgr)  # step 3 (train.ckpt_every: 3)
            sent = 0
            while p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                    sent += 1
                time.sleep(0.005)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = log.read_text()
    assert p.returncode == 75, f"rc {p.returncode}: {text[-2000:]}"
    assert sent > 1 and "preempted by SIGTERM (received by rank 0)" in text
    marker = json.loads((out / "preempted.json").read_text())
    stop = marker["step"]
    assert 3 < stop < 8 and marker["exit_code"] == 75 and marker["signal"].startswith("SIGTERM")
    assert mgr.steps()[-1] == stop and Path(marker["checkpoint"]) == mgr.path_of(stop)
    assert not [q.name for q in mgr.dir.iterdir() if q.name.startswith(".tmp-")]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["preempted"].startswith("SIGTERM") and summary["step"] == stop

    rc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert f"resumed from {mgr.path_of(stop)}" in rc.stderr
    assert not (out / "preempted.json").exists()
    _assert_same(_final_weights(ref_dir), _final_weights(out))
    # an epoch end reached just before the stop is validated by the resumed run
    assert _val_rows(out) == _val_rows(ref_dir) and len(_val_rows(ref_dir)) == 2


def test_time_based_checkpoints(manifest, tmp_path):
    """train.ckpt_every_minutes beside (here: instead of) the step interval: an interval
    shorter than a step writes a checkpoint after every step."""
    out = tmp_path / "timed"
    ov = {"train.ckpt_every": None, "train.ckpt_every_minutes": 1e-6, "train.epochs": 1}
    ov.update({"train.keep_last": 10, "train.eval_every": 0, "model.overrides": {}})
    before = signal.getsignal(signal.SIGTERM)
    res = train(load_config(DEMO, _overrides(manifest, out, **ov)))
    assert res["step"] == 4 and res["preempted"] is None
    assert CheckpointManager(out / "checkpoints").steps() == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers put back after the run
    with pytest.raises(ValueError, match=r"train\.ckpt_every_minutes"):
        load_config(DEMO, _overrides(manifest, out, **{"train.ckpt_every_minutes": 0}))
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        load_config(DEMO, _overrides(manifest, out, **{"train.preempt_signals": ["SIGKILL"]}))
