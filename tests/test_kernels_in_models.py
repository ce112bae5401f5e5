"""The fused ops inside the models: the same loss and gradients as the
reference path (kernels interpreted on the CPU), FLOP counting and memory
estimates that see them, and the dispatch switch."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import cpu_kernels

from mmt_fast import MAT, create_model
from mmt_fast.config import BottleneckConfig, mat_tiny, mvit_tiny
from mmt_fast.kernels import dispatch
from mmt_fast.kernels.relpos_attention import relpos_attention
from mmt_fast.profiling import count_flops, estimate_train_memory

# small enough for Triton's interpreter: 4x8 audio tokens, 1x4x4 video tokens
MICRO_AUDIO = dict(
    input_size=(16, 32), depths=(1, 1), embed_dim=(8, 16), num_heads=(1, 2),
    stride_q=((1, 1), (2, 2)), stride_kv=((2, 2), (1, 1)),
)  # fmt: skip
MICRO_VIDEO = dict(
    input_size=(2, 16, 16), depths=(1, 1), embed_dim=(8, 16), num_heads=(1, 2),
    stride_q=((1, 1, 1), (1, 2, 2)), stride_kv=((1, 2, 2), (1, 1, 1)),
)  # fmt: skip


def micro_mmt():
    torch.manual_seed(0)
    return create_model(
        "MMT-tiny",
        audio=mat_tiny(**MICRO_AUDIO),
        video=mvit_tiny(**MICRO_VIDEO),
        bottleneck=BottleneckConfig(num_blocks=1, num_tokens=2, dim=16, num_heads=2),
    )


def loss_and_grads(model, batch, targets, mode):
    model.zero_grad(set_to_none=True)
    with dispatch.use(mode):
        out = model(**batch) if isinstance(batch, dict) else model(batch)
        loss = model.loss(out, targets)[0] if isinstance(batch, dict) else out.logsumexp(-1).sum()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(ref, got, rtol=1e-4, atol=1e-5):
    (l0, g0), (l1, g1) = ref, got
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=atol)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=rtol, atol=atol, msg=name)


@cpu_kernels
def test_mat_with_kernels_is_a_drop_in():
    """Same parameters, same state dict, same outputs and gradients."""
    torch.manual_seed(0)
    mat = MAT(num_classes=5, cfg=mat_tiny(**MICRO_AUDIO))
    x = torch.randn(2, 1, 16, 32)
    ref = loss_and_grads(mat, x, None, "reference")
    got = loss_and_grads(mat, x, None, "triton")
    assert dispatch.last_refusal("relpos_attention") == []
    assert dispatch.last_refusal("pooled_qkv") == []
    assert_same(ref, got)


@cpu_kernels
def test_mmt_with_kernels_matches_reference():
    model = micro_mmt()
    batch = {"audio": torch.randn(3, 1, 16, 32), "video": torch.randn(3, 3, 2, 16, 16)}
    targets = {"label": torch.tensor([0, 1, 0])}
    ref = loss_and_grads(model, batch, targets, "reference")
    got = loss_and_grads(model, batch, targets, "triton")
    assert dispatch.last_refusal("bottleneck_attention") == []
    assert_same(ref, got)


@pytest.mark.slow
@cpu_kernels
def test_selective_checkpointing_through_the_fused_ops():
    """Selective recomputation with the Triton path (interpreted): the fused ops' outputs
    come from the policy's cache or the recomputation, the gradients are those of no
    checkpointing (fp32, drop path on: its masks are replayed)."""
    from mmt_fast.models.checkpointing import set_activation_checkpointing

    torch.manual_seed(0)
    one_stage = dict(input_size=(16, 32), depths=(2,), embed_dim=(8,), num_heads=(1,),
                     stride_q=((1, 1),), stride_kv=((2, 2),))  # fmt: skip
    mat = MAT(num_classes=5, cfg=mat_tiny(**one_stage, drop_path_rate=0.3))
    x = torch.randn(2, 1, 16, 32)
    torch.manual_seed(1)
    ref = loss_and_grads(mat, x, None, "triton")
    set_activation_checkpointing(mat, "selective")
    assert mat.checkpoint_selective and mat.checkpoint_blocks == {0, 1}
    torch.manual_seed(1)
    got = loss_and_grads(mat, x, None, "triton")
    assert dispatch.last_refusal("relpos_attention") == []
    assert_same(ref, got, rtol=0, atol=0)


class RelPosModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(7, 8)), torch.nn.Parameter(torch.randn(9, 8))]
        )

    def forward(self, q, k, v):
        return relpos_attention(q, k, v, list(self.tables), (4, 5), (2, 3), True, 8**-0.5)


@cpu_kernels
def test_relpos_custom_op_flops_match_the_reference_count():
    q = torch.randn(1, 2, 21, 8)
    kv = torch.randn(1, 2, 7, 8)
    module = RelPosModule()
    ref = count_flops(module, (q, kv, kv))
    with dispatch.use("triton"):
        fused = count_flops(module, (q, kv, kv), path="auto")
    assert "relpos_attention_fwd" in fused
    assert fused["total"] == ref["total"] == 2 * 2 * 21 * 7 * 8 + 2 * 20 * (2 + 3) * 8


def test_memory_estimate_sees_the_kernels():
    """The fused ops' fake implementations allocate no queries x keys tensor."""

    def build():
        return create_model("MAT-tiny", num_classes=10)

    shapes = {"x": (1, 32, 64)}
    # bf16 autocast, as on a GPU: fp32 attention takes the reference there (FP32_ON_CUDA)
    ref = estimate_train_memory(build, shapes, 8, 10, precision="bf16")
    fused = estimate_train_memory(build, shapes, 8, 10, kernels=True, precision="bf16")
    assert fused.breakdown["activations"] < 0.8 * ref.breakdown["activations"]
    assert fused.breakdown["parameters"] == ref.breakdown["parameters"]
    # in fp32 the rel-pos attention takes the reference on a GPU, and so in the estimate
    ref32 = estimate_train_memory(build, shapes, 8, 10)
    fused32 = estimate_train_memory(build, shapes, 8, 10, kernels=True)
    assert fused32.peak_bytes > 0.8 * ref32.peak_bytes


def test_dispatch_switch(monkeypatch):
    monkeypatch.setenv("MMT_FAST_KERNELS", "fast")
    with pytest.raises(ValueError, match="not one of auto, triton, reference"):
        dispatch.mode()
    monkeypatch.setenv("MMT_FAST_KERNELS", "auto")
    q = torch.randn(1, 1, 3, 4)
    relpos_attention(q, q, q, [], (3,), (3,), False, 0.5)
    # on the CPU the automatic choice is the reference, and it says why
    reasons = dispatch.last_refusal("relpos_attention")
    assert reasons and ("CPU" in reasons[0] or "not CUDA" in reasons[0])


@cpu_kernels
def test_fvcore_counts_every_fused_op_like_its_reference():
    """Counting with the kernels active gives the reference path's FLOPs."""
    model = micro_mmt()
    batch = {"audio": torch.randn(1, 1, 16, 32), "video": torch.randn(1, 3, 2, 16, 16)}
    ref = count_flops(model, batch)
    with dispatch.use("triton"):
        fused = count_flops(model, batch, path="auto")
    for op in ("pooled_qkv_fwd", "relpos_attention_fwd", "bottleneck_attention_fwd"):
        assert fused.get(op, 0) > 0, op
    assert fused["total"] == pytest.approx(ref["total"], rel=1e-5)


@pytest.mark.slow
def test_mmt_with_kernels_in_fp16_matches_the_float64_model():
    """The drop-in path in fp16, the dtype the compiled kernels run on a GPU (on CUDA, or
    interpreted on the CPU): MMT-micro (all three fused ops) with the kernels, against the
    same model in float64, within twice the error of the reference path in fp16 plus a few
    fp16 roundings of the largest gradient (gradients normalised by it: some are exactly zero
    in exact arithmetic and carry only rounding)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = micro_mmt().to(device)
    g = torch.Generator().manual_seed(7)
    batch = {"audio": torch.randn(1, 1, 16, 32, generator=g),
             "video": torch.randn(1, 3, 2, 16, 16, generator=g)}  # fmt: skip
    targets = {"label": torch.tensor([1], device=device)}

    def run(dtype, mode):
        inputs = {k: v.to(device, dtype) for k, v in batch.items()}
        return loss_and_grads(model.to(dtype), inputs, targets, mode)

    loss64, grads64 = run(torch.float64, "reference")
    loss16, grads16 = run(torch.float16, "reference")
    lossk, gradsk = run(torch.float16, "triton")
    for op in ("relpos_attention", "pooled_qkv", "bottleneck_attention"):
        assert dispatch.last_refusal(op) == [], op
    scale = max(t.abs().max().item() for t in grads64.values())
    eps = torch.finfo(torch.float16).eps
    assert abs(lossk.double() - loss64) <= 2 * abs(loss16.double() - loss64) + 8 * eps * abs(loss64)
    for name, want in grads64.items():
        err = (gradsk[name].double() - want).abs().max().item()
        base = (grads16[name].double() - want).abs().max().item()
        assert err <= 2 * base + 8 * eps * scale, (name, err, base, scale)
