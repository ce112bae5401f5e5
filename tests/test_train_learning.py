"""Learning: on the synthetic task (label = motion x pitch, so each modality alone
is right at most half of the time) a tiny MMT trained on the CPU beats its
audio-only and video-only counterparts by a wide margin on held-out clips, and
each of those learns its own factor (clearly above the 25% chance level).

About 1-1.5 minutes on 2 cores: 320 generated 2-second clips (224 train, 48 test),
three models of 8 epochs (112 steps of 16 clips) each, decoded clips cached in
memory, the final weights evaluated (no selection on held-out clips). The data
and the MMT-tiny run are the session's (tests/conftest.py), shared with
tests/test_analysis.py.
"""

from mmt_fast.inference import evaluate_checkpoint


def _test_accuracy(run) -> float:
    assert run.result["step"] == run.result["total_steps"] == 8 * 14
    ev = evaluate_checkpoint(run.cfg, run.out_dir, split="test", views=1, plot=False)
    assert ev["num_clips"] == 48
    return ev["top1"]


def test_mmt_beats_each_modality_alone(trained_synthetic):
    acc = {
        p: _test_accuracy(trained_synthetic(p))
        for p in ("MMT-tiny", "MMT-tiny-audio", "MMT-tiny-video")
    }
    print("held-out top-1:", acc)
    single = max(acc["MMT-tiny-audio"], acc["MMT-tiny-video"])
    # each modality alone can be right on at most ~50% of the clips (2 x 2 classes)
    assert acc["MMT-tiny"] >= 80.0, acc
    assert single <= 75.0, acc
    assert acc["MMT-tiny"] - single >= 20.0, acc
    # ... and each learns its own factor: clearly above chance (25%); by chance
    # (binomial, 48 clips, p = 0.25) 20 or more right has probability < 0.3%
    for p in ("MMT-tiny-audio", "MMT-tiny-video"):
        assert acc[p] >= 40.0, acc
