"""Checkpoints: atomic writes, keep-last-k and best, loading without executing code."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from mmt_fast import create_model
from mmt_fast.errors import CheckpointError
from mmt_fast.run.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    model_state_for_saving,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)


def _save(mgr, step, value=0.0, **kw):
    return mgr.save(
        step,
        {"w": torch.full((3,), float(step))},
        {"step": step, "value": value, "opt": {"exp_avg": torch.ones(2) * step}},
        classes={"kind": "label", "names": ["a", "b"]},
        config_yaml="train: {}\n",
        **kw,
    )


def test_save_load_round_trip_with_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("MMT-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(audio=torch.randn(2, 1, 32, 64), video=torch.randn(2, 3, 4, 32, 32)).logits[
        "label"
    ].sum().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    mgr.save(
        5,
        model_state_for_saving(model),
        {"optimizer": opt.state_dict(), "step": 5},
        classes={"kind": "label", "names": list("abcd")},
        meta={"epoch": 1},
    )
    ck = load_checkpoint(tmp_path)  # run folder -> latest (no best yet)
    assert ck.step == 5 and ck.meta["epoch"] == 1 and ck.classes["names"] == list("abcd")
    other = create_model("MMT-tiny")
    other.load_state_dict(ck.model)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.state["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_state_file_is_loaded_with_weights_only(tmp_path):
    """state.pt holds only tensors and plain values; a file that would run code is refused."""
    mgr = CheckpointManager(tmp_path)
    d = _save(mgr, 1)
    torch.load(d / "state.pt", weights_only=True)  # loads under the restricted unpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(d / "state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"state\.pt cannot be read") as e:
        load_checkpoint(d)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    import random

    random.seed(1)
    st = rng_state()
    torch.save(st, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_keep_last_k_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _save(mgr, step)
    assert mgr.steps() == [20, 30]
    assert mgr.update_best(20, "val/top1", 55.0)
    assert not mgr.update_best(30, "val/top1", 50.0)  # worse: best stays at 20
    for step in (40, 50):
        _save(mgr, step)
    assert mgr.steps() == [20, 40, 50]  # last two plus the best
    assert mgr.update_best(50, "val/top1", 60.0)
    assert mgr.steps() == [40, 50]  # the old best is pruned once superseded
    assert resolve_checkpoint(tmp_path, "best") == mgr.path_of(50)
    assert resolve_checkpoint(tmp_path, "latest") == mgr.path_of(50)
    assert resolve_checkpoint(mgr.path_of(40) / "model.safetensors") == mgr.path_of(40)


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1)

    class NotSerialisable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated by an object that cannot be written)")

    with pytest.raises(RuntimeError, match="disk full"):
        mgr.save(2, {"w": torch.zeros(3)}, {"bad": NotSerialisable()})
    assert mgr.steps() == [1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and torch.equal(ck.model["w"], torch.full((3,), 1.0))


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """A process writing large checkpoints in a loop is SIGKILLed at an arbitrary
    moment; every checkpoint that is visible afterwards is complete and loads."""
    script = tmp_path / "writer.py"
    script.write_text(
        textwrap.dedent(f"""
        import torch, sys
        from mmt_fast.run.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path / "ckpt")!r}, keep_last=2)
        big = torch.randn(4_000_000)  # 16 MB per file
        for step in range(1, 10_000):
            mgr.save(step, {{"w": big + step}}, {{"opt": big * step, "step": step}})
            print(step, flush=True)
    """)
    )
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # wait until a few checkpoints exist, then kill mid-stream
            assert p.stdout.readline(), "writer died"
        time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.steps(), "no complete checkpoint survived"
    ck = load_checkpoint(tmp_path / "ckpt", which="latest")
    s = ck.state["step"]
    assert s == ck.step
    torch.testing.assert_close(ck.model["w"] - s, ck.state["opt"] / s, rtol=0, atol=1e-3)
    _save(mgr, 10**6)  # the next save cleans up the killed writer's temporary folder
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "ckpt").iterdir())
