"""mmt_fast.inference's loop and recorder on real (untrained) tiny models, against
independent computations: per-view forward passes of each encoder, and the heads
applied by hand to the recorded head input. The PyTorch reference ops throughout
(the fused kernels have their own tests; under Triton's interpreter they are slow)."""

import pytest
import torch

from mmt_fast import create_model
from mmt_fast.inference import RECORDABLE, Recorder, run_model
from mmt_fast.kernels import dispatch

N, V = 4, 2


def _batches(model, views: int):
    torch.manual_seed(1)
    audio = torch.randn(N, views, 1, 32, 64)
    video = torch.randn(N, views, 3, 4, 32, 32)
    labels = torch.randint(0, 4, (N,))
    out = []
    for idx in (torch.tensor([3, 0]), torch.tensor([2, 1])):
        b = {"index": idx, "batch_size": len(idx), "label": labels[idx], "skipped": {}}
        if "audio" in model.modalities:
            b["audio"] = audio[idx]
        if "video" in model.modalities:
            b["video"] = video[idx]
        out.append(b)
    return out, audio, video


@pytest.fixture(autouse=True)
def _reference_ops():
    with dispatch.use("reference"):
        yield


@pytest.mark.parametrize("preset", ["MMT-tiny", "MMT-tiny-avg", "MMT-tiny-audio"])
def test_recorded_embeddings_are_the_encoders_and_the_heads(preset):
    torch.manual_seed(0)
    model = create_model(preset).eval()
    batches, audio, video = _batches(model, V)
    out = run_model(model, batches, torch.device("cpu"), record=RECORDABLE)
    order = out.index.tolist()
    assert order == [3, 0, 2, 1] and not model.training
    expect = {"audio", "video", "head"} & ({*model.modalities, "head"})
    assert set(out.embeddings) == expect
    with torch.no_grad():
        for m in model.modalities:  # the encoder's CLS embedding, averaged over the views
            enc = getattr(model, f"{m}_encoder")
            x = {"audio": audio, "video": video}[m][order]
            ref = torch.stack([enc.embed(x[:, k]) for k in range(V)], 1).mean(1)
            torch.testing.assert_close(out.embeddings[m], ref, atol=1e-5, rtol=1e-4)
        # the head input: the head applied to each view's recorded input gives the logits
        batches1, _, _ = _batches(model, 1)
        one = run_model(model, batches1, torch.device("cpu"), record=("head",))
        h = one.embeddings["head"]
        if hasattr(model, "head_audio"):  # avg fusion: [audio CLS, video CLS] in call order
            da = model.audio_encoder.num_features
            la = model.head_audio(h[:, :da])["label"].softmax(-1)
            lv = model.head_video(h[:, da:])["label"].softmax(-1)
            probs = (la + lv) / 2
        else:
            probs = model.head(h)["label"].softmax(-1)
        torch.testing.assert_close(one.probs["label"], probs, atol=1e-5, rtol=1e-4)
    # the recorder leaves the model as it found it
    for m in model.modalities:
        assert "forward_features" not in vars(getattr(model, f"{m}_encoder"))
    assert not any(mod._forward_pre_hooks for mod in model.modules())


def test_recorder_rejects_unknown_names():
    with pytest.raises(ValueError, match="cannot record"):
        Recorder(create_model("MMT-tiny-audio"), ["fused"])
