"""Training-memory estimates: the fast tracker against torch's MemTracker, the
CUDA autocast policy, AST with SDPA, and activation checkpointing (gradients
unchanged, memory down)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmt_fast import create_model
from mmt_fast.models.checkpointing import set_activation_checkpointing
from mmt_fast.profiling import (
    CudaAutocastPolicy,
    count_params,
    estimate_train_memory,
)

SHAPES = {"x": (1, 32, 64)}


def _mat():
    return create_model("MAT-tiny", num_classes=10)


def test_peak_tracker_equals_memtracker():
    """Both trackers see the same fp16-autocast step; the fast one also counts
    the batch itself (made before MemTracker starts): they differ by its bytes."""
    fast = estimate_train_memory(_mat, SHAPES, 4, 10, precision="fp16")
    ref = estimate_train_memory(_mat, SHAPES, 4, 10, precision="fp16", tracker="memtracker")
    inputs = 4 * 32 * 64 * 4 + 4 * 8  # fp32 spectrograms + int64 labels
    assert fast.breakdown["inputs"] == inputs
    assert sum(fast.breakdown.values()) == fast.peak_bytes
    assert fast.peak_bytes - inputs == ref.peak_bytes
    assert fast.breakdown["parameters"] == ref.breakdown["Parameter"] == 4 * count_params(_mat())
    assert fast.breakdown["optimizer_state"] == ref.breakdown["Optstate"]


def test_cuda_autocast_policy_casts_as_cuda_does():
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with CudaAutocastPolicy(torch.float16):
        h = lin(x)
        assert h.dtype == torch.float16  # matmul-like: lower precision
        assert (h @ h.T).dtype == torch.float16
        assert h.softmax(-1).dtype == torch.float32  # CUDA: fp32 (the CPU's autocast keeps fp16)
        assert F.layer_norm(h, (8,)).dtype == torch.float32
        assert torch.cat([h, x]).dtype == torch.float32  # promote to the widest
        assert (h + h).dtype == torch.float16  # everything else as it comes
        w1 = lin.weight.__class__  # casts of a weight are cached: one copy per region
        assert lin(x).dtype == torch.float16 and w1 is torch.nn.Parameter
    h.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_policy_matches_torch_autocast_on_cuda():
    lin = nn.Linear(8, 8).cuda()
    x = torch.randn(2, 8, device="cuda")

    def ops(h):
        h = lin(h)
        return [h, h @ h.T, h.softmax(-1), F.layer_norm(h, (8,)), torch.cat([h, x]), h + h]

    with torch.autocast("cuda", dtype=torch.float16):
        want = [t.dtype for t in ops(x)]
    with CudaAutocastPolicy(torch.float16):
        got = [t.dtype for t in ops(x)]
    assert got == want


def test_ast_sdpa_equals_eager_and_stores_no_score_matrix():
    torch.manual_seed(0)
    eager = create_model("AST-tiny", num_classes=5).double()
    sdpa = create_model("AST-tiny", num_classes=5, attn_impl="sdpa").double()
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(2, 1, 32, 64, dtype=torch.float64)
    torch.testing.assert_close(sdpa(x), eager(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="attention impl"):
        create_model("AST-tiny", attn_impl="flash")

    def build(impl):
        # 128 tokens wide enough that the (N x N) scores dominate
        return lambda: create_model("AST-tiny", num_classes=5, attn_impl=impl, input_size=(64, 256))

    shapes = {"x": (1, 64, 256)}
    e = estimate_train_memory(build("eager"), shapes, 8, 5, precision="fp16")
    s = estimate_train_memory(build("sdpa"), shapes, 8, 5, precision="fp16")
    assert s.breakdown["activations"] < 0.6 * e.breakdown["activations"]


@pytest.mark.parametrize(
    "name, mode",
    [
        ("MAT-tiny", "stage1"),
        ("AST-tiny", "blocks"),
        ("MMT-tiny", "blocks"),
        ("MAT-tiny", "selective"),
        ("AST-tiny", "selective"),
        ("MMT-tiny", "selective"),
    ],
)
def test_activation_checkpointing_keeps_gradients(name, mode):
    """Same loss and gradients (float64, drop-path on: the RNG is replayed)."""
    kw = {"drop_path_rate": 0.2} if "MMT" not in name else {"audio__drop_path_rate": 0.2}
    if "MMT" not in name:
        kw["num_classes"] = 5
    torch.manual_seed(0)
    ref = create_model(name, **kw).double()
    ckpt = create_model(name, **kw).double()
    ckpt.load_state_dict(ref.state_dict())
    set_activation_checkpointing(ckpt, mode)
    assert any(getattr(m, "checkpoint_blocks", ()) for m in ckpt.modules())
    if "MMT" in name:
        cfg = ref.cfg
        inputs = {
            "audio": torch.randn(2, 1, *cfg.audio.input_size, dtype=torch.float64),
            "video": torch.randn(2, 3, *cfg.video.input_size, dtype=torch.float64),
        }
        labels = torch.tensor([0, 0])
    else:
        inputs = {"x": torch.randn(4, 1, 32, 64, dtype=torch.float64)}
        labels = torch.tensor([0, 1, 2, 3])
    losses = []
    for model in (ref, ckpt):
        torch.manual_seed(1)
        out = model(**inputs) if "MMT" in name else model(inputs["x"])
        loss = model.loss(out, {"label": labels})[0] if "MMT" in name else out.sum()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        assert b.grad is not None, n
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_activation_checkpointing_lowers_the_estimate():
    def build(mode):
        return lambda: set_activation_checkpointing(_mat(), mode)

    est = {
        m: estimate_train_memory(build(m), SHAPES, 16, 10, precision="bf16").breakdown[
            "activations"
        ]
        for m in ("none", "stage1", "blocks", "selective")
    }
    assert est["blocks"] < est["stage1"] < est["none"]
    assert est["blocks"] < est["selective"] < est["none"]
    with pytest.raises(ValueError, match="activation checkpointing"):
        set_activation_checkpointing(_mat(), "all")


def test_selective_policy_saves_matmuls_and_fused_attention_only():
    """What one selective block keeps: the outputs of its projections (addmm) and
    of the fused rel-pos attention, nothing element-wise, and never the pooling."""
    from torch.utils.checkpoint import CheckpointPolicy

    from mmt_fast.models.checkpointing import selective_policy

    aten = torch.ops.aten
    save, recompute = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    x = torch.empty(2, 8, 4, 4)
    assert selective_policy(None, aten.addmm.default) == save
    assert selective_policy(None, aten.mm.default) == save
    assert selective_policy(None, torch.ops.mmt_fast.relpos_attention_fwd.default) == save
    assert selective_policy(None, torch.ops.mmt_fast.bottleneck_attention_fwd.default) == save
    assert selective_policy(None, torch.ops.mmt_fast.pooled_qkv_fwd.default) == recompute
    dense = (x, None, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    depthwise = (x, None, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 8)
    assert selective_policy(None, aten.convolution.default, *dense) == save
    assert selective_policy(None, aten.convolution.default, *depthwise) == recompute
    for op in (aten.native_layer_norm.default, aten.gelu.default, aten.add.Tensor,
               aten._to_copy.default, aten.mul.Tensor):  # fmt: skip
        assert selective_policy(None, op) == recompute


def test_trainer_config_field():
    from mmt_fast.run.config import config_from_dict

    cfg = config_from_dict({"train": {"activation_checkpointing": "stage1"}})
    assert cfg.train.activation_checkpointing == "stage1"
    cfg = config_from_dict({"train": {"activation_checkpointing": "selective"}})
    assert cfg.train.activation_checkpointing == "selective"
    with pytest.raises(ValueError, match="activation checkpointing"):
        config_from_dict({"train": {"activation_checkpointing": "yes"}})


def test_trainer_with_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    """Two optimizer steps of the demo config with and without
    ``train.activation_checkpointing``: the same weights, bit for bit (the
    recomputation repeats the same CPU ops), and the blocks did go through
    ``torch.utils.checkpoint`` (counted around the real function)."""
    from pathlib import Path

    from safetensors.torch import load_file

    import mmt_fast.models.checkpointing as ckpt_mod
    from mmt_fast.cli import main

    calls = []
    real = ckpt_mod.checkpoint

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(ckpt_mod, "checkpoint", counted)

    data = tmp_path / "syn"
    args = ["--out", str(data), "--num-clips", "8", "--size", "32", "--duration", "1.0"]
    assert main(["make-synthetic", *args]) == 0
    demo = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"
    weights = {}
    for mode in ("none", "blocks"):
        out = tmp_path / mode
        ov = [
            f"data.train={data / 'manifest.csv'}",
            f"data.val={data / 'manifest.csv'}",
            f"data.test={data / 'manifest.csv'}",
            f"train.out_dir={out}",
            f"train.activation_checkpointing={mode}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.eval_every=0",
            "train.progress=false",
            "train.tensorboard=false",
            "train.torch_threads=1",
            "data.num_workers=0",
        ]
        calls.clear()
        assert main(["train", "--config", str(demo), *ov]) == 0
        assert bool(calls) == (mode == "blocks")
        ckpts = sorted((out / "checkpoints").glob("step_*/model.safetensors"))
        weights[mode] = load_file(str(ckpts[-1]))
    assert weights["none"].keys() == weights["blocks"].keys()
    for k, v in weights["none"].items():
        assert torch.equal(v, weights["blocks"][k]), k
