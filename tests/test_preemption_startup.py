"""Preemption signals outside the training loop: during start-up (reading the data,
building the model) and between start-up and the first step. Real signals sent to this
process at those moments; the CLI's exit code and the marker a job script reads. Also
the epoch the stop line names."""

import json
import os
import signal
from pathlib import Path

import pytest
from config_helpers import as_overrides

from mmt_fast.cli import main
from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.run import builders as B
from mmt_fast.train import preemption

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), num_clips=12, size=32, duration=1.0)


@pytest.fixture
def handlers():
    """The signal handlers as they were: a stopped run ignores the signals until exit."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _args(manifest, out, **extra):
    o = {
        "data.train": str(manifest), "data.val": str(manifest), "data.test": str(manifest),
        "data.num_workers": 0, "data.cache": False, "train.out_dir": str(out),
        "train.batch_size": 2, "train.epochs": 2, "train.eval_every": 0,
        "train.torch_threads": 1, "train.progress": False, "train.tensorboard": False,
        "train.ckpt_every": 100,
    }  # fmt: skip
    return ["train", "--config", str(DEMO), *as_overrides({**o, **extra})]


def test_sigterm_during_startup_exits_75_with_a_marker(manifest, tmp_path, monkeypatch,
                                                       handlers, capsys):  # fmt: skip
    real = B.build_model

    def build_model_signalled(*a, **k):  # start-up, after the data has been read
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(B, "build_model", build_model_signalled)
    out = tmp_path / "run"
    assert main(_args(manifest, out)) == 75
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["exit_code"] == 75 and marker["step"] is None
    assert marker["signal"] == "SIGTERM (received by rank 0 during start-up)"
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert "stopped before the first step" in capsys.readouterr().err


def test_signal_between_startup_and_the_loop_stops_after_one_step(manifest, tmp_path,
                                                                  monkeypatch, handlers):  # fmt: skip
    real = preemption.StopWatch.__enter__

    def enter_signalled(self):  # start-up is over, the loop's handlers not yet installed
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(self)

    monkeypatch.setattr(preemption.StopWatch, "__enter__", enter_signalled)
    out = tmp_path / "run"
    assert main(_args(manifest, out)) == 75
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["step"] == 1 and marker["signal"].startswith("SIGUSR1")
    assert Path(marker["checkpoint"]).is_dir()


def test_stop_line_names_the_epoch_it_stopped_in(manifest, tmp_path, capsys):
    # 4 training clips / batch 1 = 4 steps per epoch: step 6 is in the second epoch
    extra = {"train.stop_at_step": 6, "train.batch_size": 1}
    assert main(_args(manifest, tmp_path / "run", **extra)) == 0
    err = capsys.readouterr().err
    assert "stopped at step 6/8 (in epoch 2/2)" in err, err
