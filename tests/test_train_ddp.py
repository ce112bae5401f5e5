"""DDP under ``torchrun --nproc_per_node=2`` (gloo on the CPU), every run compared with
one uninterrupted run of the same config:

- a few steps of MMT-tiny with a distributed sampler: the parameters are identical on
  both ranks and equal to the checkpoint rank 0 wrote; stopped and resumed, the run
  ends with the uninterrupted run's weights;
- preemption: SIGUSR1 sent to rank 1 alone stops both ranks after the same step with
  a checkpoint and exit code 75; ``train.auto_resume`` continues it exactly;
- elastic restart: with ``torchrun --max-restarts 1`` a worker killed by SIGKILL
  mid-epoch is restarted with its group, which resumes from the newest checkpoint
  (``train.auto_resume``, no flag typed) and ends with the same weights.

Real processes and signals throughout; worker processes are found from torchrun's
process tree (``/proc``) by their ``RANK``.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.run import load_checkpoint, load_config
from mmt_fast.run.checkpoint import CheckpointManager

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"
STEPS = 6  # 16 train clips / 2 ranks / batch 2 = 4 micro-batches = 2 steps per epoch, 3 epochs

RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from mmt_fast.run import load_config
    from mmt_fast.train import Trainer
    from mmt_fast.run import distributed as D

    cfg = load_config(sys.argv[1], sys.argv[3:])
    resume = sys.argv[2] == "resume"
    t = Trainer(cfg, resume=resume)
    res = t.fit()
    state = {k: v.detach().cpu() for k, v in t.core.state_dict().items()}
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    rank = int(os.environ["RANK"])
    out = {"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "hash": h.hexdigest(),
           "step": res["step"], "backend": t.dist.backend,
           "sampler": t.sampler.epoch_indices()}
    with open(os.path.join(cfg.train.out_dir, f"rank{rank}_{sys.argv[2]}.json"), "w") as f:
        json.dump(out, f)
    torch.save(state, os.path.join(cfg.train.out_dir, f"rank{rank}_{sys.argv[2]}.pt"))
    D.cleanup()
""")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun_cmd(*args, restarts=0):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        *args,
    ]


def _cli(cfg_path, *overrides, restarts=0):
    return _torchrun_cmd(
        "-m", "mmt_fast.cli", "train", "--config", str(cfg_path), *overrides, restarts=restarts
    )


def _run(cmd, expect=0):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == expect, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _torchrun(tmp_path, cfg_path, mode, *overrides):
    """RANK_SCRIPT under torchrun (2 processes): ``mode`` first|resume; each rank writes
    ``rank<r>_<mode>.json`` (weights hash, step, sampler order) to the run's out_dir."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return _run(_torchrun_cmd(str(script), str(cfg_path), mode, *overrides))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    manifest = make_synthetic(tmp / "syn", num_clips=24, size=32, duration=1.0)
    m = str(manifest)
    cfg = load_config(
        DEMO,
        [
            f"data.train={m}",
            f"data.val={m}",
            f"data.test={m}",
            "data.num_workers=1",
            "data.cache=false",
            f"train.out_dir={tmp / 'unused'}",
            "train.batch_size=2",
            "train.grad_accum=2",
            "train.epochs=3",
            "train.ckpt_every=1",
            "train.keep_last=10",
            "train.torch_threads=1",
            "train.progress=false",
            "train.tensorboard=false",
            "train.deterministic=true",
        ],
    )
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml())
    ref = tmp / "reference"
    _run(_cli(cfg_path, f"train.out_dir={ref}"))  # uninterrupted
    ref_weights = load_checkpoint(ref, which="latest")
    assert ref_weights.step == STEPS
    return cfg_path, ref_weights.model


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise


def _children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _worker_pid(agent_pid, rank, timeout=120):
    """The pid of torchrun's worker of rank ``rank`` (from its environment in /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        todo = _children(agent_pid)
        while todo:
            pid = todo.pop()
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
                return pid
            todo += _children(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under pid {agent_pid}")


def _start(cmd, tmp_path, name, **env):
    log = open(tmp_path / f"{name}.log", "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**ENV, **env})
    return p, log


def _wait_for_checkpoint(p, mgr, timeout=180):
    deadline = time.time() + timeout
    while not mgr.steps() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)


@pytest.mark.distributed
def test_ddp_two_processes_gloo(setup, tmp_path):
    cfg_path, ref = setup
    out = tmp_path / "run"
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    base = [str(script), str(cfg_path)]
    _run(_torchrun_cmd(*base, "first", f"train.out_dir={out}", "train.stop_at_step=3"))
    r = [json.loads((out / f"rank{i}_first.json").read_text()) for i in range(2)]
    assert [x["world"] for x in r] == [2, 2] and r[0]["backend"] == "gloo"
    assert r[0]["step"] == r[1]["step"] == 3
    assert r[0]["hash"] == r[1]["hash"]  # DDP kept the replicas identical
    # the distributed sampler splits the epoch: disjoint halves of the 16 clips
    assert not set(r[0]["sampler"]) & set(r[1]["sampler"])
    assert sorted(r[0]["sampler"] + r[1]["sampler"]) == list(range(16))
    # step 3 checkpoint (written by rank 0) holds the replicas' weights
    ck = load_checkpoint(out, which="latest")
    assert ck.step == 3 and len(ck.state["rng"]) == 2
    local = torch.load(out / "rank1_first.pt", weights_only=True)
    for k, v in ck.model.items():
        assert torch.equal(v, local[k]), k
    # resume on two processes from step 3 to the end: the uninterrupted run's weights
    _run(_torchrun_cmd(*base, "resume", f"train.out_dir={out}"))
    r2 = [json.loads((out / f"rank{i}_resume.json").read_text()) for i in range(2)]
    assert r2[0]["step"] == r2[1]["step"] == STEPS and r2[0]["hash"] == r2[1]["hash"]
    final = load_checkpoint(out, which="latest")
    assert final.step == STEPS
    _assert_same(ref, final.model)


@pytest.mark.distributed
def test_ddp_signal_to_one_rank_stops_both(setup, tmp_path):
    cfg_path, ref = setup
    out = tmp_path / "sig"
    mgr = CheckpointManager(out / "checkpoints")
    # no periodic step checkpoints: the only ones are the epoch ends (steps 2, 4) and the
    # preemption's, so a checkpoint past the last one written before the signal is its
    p, log = _start(_cli(cfg_path, f"train.out_dir={out}", "train.ckpt_every=100"), tmp_path,
                    "sig")  # fmt: skip
    try:
        rank1 = _worker_pid(p.pid, 1)
        _wait_for_checkpoint(p, mgr)  # the end of epoch 1: step 2
        before = mgr.steps()[-1]
        os.kill(rank1, signal.SIGUSR1)  # rank 1 alone: rank 0 writes the checkpoint
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    text = (tmp_path / "sig.log").read_text()
    marker = json.loads((out / "preempted.json").read_text())
    stop = marker["step"]
    assert "preempted by SIGUSR1 (received by rank 1)" in text, text[-3000:]
    assert before == 2 and before < stop < STEPS and mgr.steps()[-1] == stop
    # both workers exit with 75 (torchrun, whose workers did not succeed, exits with 1)
    assert p.returncode == 1 and text.count("exitcode  : 75") == 2, text[-3000:]
    # continue without --resume: train.auto_resume
    res = _run(_cli(cfg_path, f"train.out_dir={out}", "train.auto_resume=true"))
    assert f"resumed from {mgr.path_of(stop)}" in res.stderr + res.stdout
    assert not (out / "preempted.json").exists()
    _assert_same(ref, load_checkpoint(out, which="latest").model)


@pytest.mark.distributed
def test_elastic_restart_after_sigkill_resumes_automatically(setup, tmp_path):
    cfg_path, ref = setup
    out = tmp_path / "elastic"
    mgr = CheckpointManager(out / "checkpoints")
    cmd = _cli(cfg_path, f"train.out_dir={out}", "train.auto_resume=true", restarts=1)
    # a fresh store per restart (pytorch/pytorch#135712: with the rendezvous store shared,
    # the restarted group can read the dead group's addresses and fail to connect)
    p, log = _start(cmd, tmp_path, "elastic", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        rank1 = _worker_pid(p.pid, 1)
        _wait_for_checkpoint(p, mgr)  # step 1, mid-epoch
        os.kill(rank1, signal.SIGKILL)
        killed_after = mgr.steps()[-1]
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    text = (tmp_path / "elastic.log").read_text()
    assert p.returncode == 0, text[-3000:]
    assert killed_after < STEPS
    assert "resumed from" in text and "elastic restart 1" in text, text[-3000:]
    _assert_same(ref, load_checkpoint(out, which="latest").model)
