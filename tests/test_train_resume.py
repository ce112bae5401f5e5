"""Kill-and-resume: an interrupted run, resumed, ends with the same weights as an
uninterrupted one (deterministic CPU settings), including a mid-epoch stop with
gradient accumulation, drop-path RNG, augmentation and multi-process loading."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.train import load_checkpoint, load_config, train
from mmt_fast.train.checkpoint import CheckpointManager

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
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in o.items()
    ]


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
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mgr = CheckpointManager(out / "checkpoints")
    try:
        deadline = time.time() + 180
        while not mgr.steps() and time.time() < deadline and p.poll() is None:
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    if p.returncode != -signal.SIGKILL:
        pytest.skip(f"the run ended (rc {p.returncode}) before it could be killed")
    killed_at = mgr.steps()
    assert killed_at and killed_at[-1] < 8
    rc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "resumed from" in rc.stderr
    _assert_same(_final_weights(ref_dir), _final_weights(out))
