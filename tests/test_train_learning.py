"""Learning: on the synthetic task (label = motion x pitch, so each modality alone
is right at most half of the time) a tiny MMT trained on the CPU beats its
audio-only and video-only counterparts by a wide margin on held-out clips.

About 1-1.5 minutes on 2 cores: 320 generated 2-second clips (224 train, 48 test),
three models of 8 epochs (112 steps of 16 clips) each, decoded clips cached in
memory, the final weights evaluated (no selection on held-out clips).
"""

from pathlib import Path

import pytest

from mmt_fast.data.synthetic import make_synthetic
from mmt_fast.train import evaluate_checkpoint, load_config, train

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_synthetic(
        tmp_path_factory.mktemp("syn"), num_clips=320, seed=0, size=32, duration=2.0
    )


def _train_and_test(manifest, out_dir, preset):
    m = str(manifest)
    cfg = load_config(
        DEMO,
        [
            f"data.train={m}",
            f"data.test={m}",
            "data.val=null",
            "data.cache=true",
            "data.num_workers=0",
            f"model.preset={preset}",
            f"train.out_dir={out_dir}",
            "train.epochs=8",
            "train.eval_every=0",
            "train.ckpt_every=null",
            "train.torch_threads=1",
            "train.progress=false",
            "train.tensorboard=false",
            "train.seed=0",
        ],
    )
    res = train(cfg)
    assert res["step"] == res["total_steps"] == 8 * 14
    ev = evaluate_checkpoint(cfg, out_dir, split="test", views=1, plot=False)
    assert ev["num_clips"] == 48
    return ev["top1"]


def test_mmt_beats_each_modality_alone(manifest, tmp_path):
    acc = {
        p: _train_and_test(manifest, tmp_path / p, p)
        for p in ("MMT-tiny", "MMT-tiny-audio", "MMT-tiny-video")
    }
    print("held-out top-1:", acc)
    single = max(acc["MMT-tiny-audio"], acc["MMT-tiny-video"])
    # each modality alone can be right on at most ~50% of the clips (2 x 2 classes)
    assert acc["MMT-tiny"] >= 80.0, acc
    assert single <= 75.0, acc
    assert acc["MMT-tiny"] - single >= 20.0, acc
