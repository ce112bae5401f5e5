"""DDP under ``torchrun --nproc_per_node=2`` (gloo on the CPU): a few steps of
MMT-tiny with a distributed sampler; the parameters are identical on both ranks
afterwards and equal to the checkpoint rank 0 wrote; the resumed run matches too."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.train import load_checkpoint, load_config

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"

RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from mmt_fast.train import Trainer, load_config
    from mmt_fast.train import distributed as D

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


def _torchrun(tmp_path, cfg_path, mode, *overrides):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(cfg_path),
        mode,
        *overrides,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.distributed
def test_ddp_two_processes_gloo(tmp_path):
    manifest = make_synthetic(tmp_path / "syn", num_clips=24, size=32, duration=1.0)
    out = tmp_path / "run"
    m = str(manifest)
    cfg = load_config(
        DEMO,
        [
            f"data.train={m}",
            f"data.val={m}",
            f"data.test={m}",
            "data.num_workers=1",
            "data.cache=false",
            f"train.out_dir={out}",
            "train.batch_size=2",
            "train.grad_accum=2",
            "train.epochs=2",
            "train.ckpt_every=1",
            "train.torch_threads=1",
            "train.progress=false",
            "train.tensorboard=false",
            "train.deterministic=true",
        ],
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(cfg.to_yaml())
    # 16 train clips / 2 ranks / batch 2 = 4 micro-batches = 2 steps per epoch
    _torchrun(tmp_path, cfg_path, "first", "train.stop_at_step=3")
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
    # resume on two processes from step 3 to the end
    _torchrun(tmp_path, cfg_path, "resume")
    r2 = [json.loads((out / f"rank{i}_resume.json").read_text()) for i in range(2)]
    assert r2[0]["step"] == r2[1]["step"] == 4 and r2[0]["hash"] == r2[1]["hash"]
    assert load_checkpoint(out, which="latest").step == 4
