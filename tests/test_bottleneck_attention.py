"""Tests of kernels/bottleneck_attention.py (Triton path through the CPU interpreter)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import ATOL, DEVICE, KERNEL_DTYPE, fp32_attention, needs_interpreter
from torch._subclasses.fake_tensor import FakeTensorMode

from mmt_fast.kernels import dispatch
from mmt_fast.kernels.bottleneck_attention import (
    _bwd_op,
    _fwd_op,
    bottleneck_attention,
    bottleneck_attention_ref,
)


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")


def _inputs(B, H, Nm, L, D, dtype=torch.float64, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Nm, D)] * 3 + [(B, H, L, D)] * 3
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def _concat_attention(qm, km, vm, qe, ke, ve, scale):
    """Independent formulation: explicit cat, full score matrix, softmax."""
    q = torch.cat([qm, qe], 2)
    k = torch.cat([km, ke], 2)
    v = torch.cat([vm, ve], 2)
    p = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * scale, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    return out.split([qm.shape[2], qe.shape[2]], dim=2)


def _run(fn, inputs, grads_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves, leaves[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, leaves, grads_out)
    return [o.detach() for o in out], list(grads)


def _check_rule(name, kernel, ref64, torch_lowp, atol):
    err = (kernel.double() - ref64).abs().max().item()
    base = (torch_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: kernel err {err:.3g}, torch err {base:.3g}"


@pytest.mark.parametrize(("Nm", "L"), [(37, 4), (21, 1), (2, 4)])
def test_ref_matches_concat_formulation(Nm: int, L: int) -> None:
    inputs = _inputs(2, 3, Nm, L, 24)
    for got, want in zip(bottleneck_attention_ref(*inputs, 0.3), _concat_attention(*inputs, 0.3)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, marks=fp32_attention), torch.float16]
)
@pytest.mark.parametrize(
    ("B", "H", "Nm", "L", "D"),
    [(2, 2, 37, 4, 24), (1, 3, 21, 1, 16), (2, 1, 3, 4, 24), (1, 2, 45, 4, 48), (1, 1, 70, 3, 96)],
    ids=["odd-Nm-L4", "L1-3heads", "Nm-lt-L", "head-dim-32+16", "head-dim-64+32"],
)
def test_kernel_vs_fp64(force_triton, dtype, B, H, Nm, L, D) -> None:
    inputs = _inputs(B, H, Nm, L, D)
    g = torch.Generator().manual_seed(1)
    grads_out = [
        torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(DEVICE) for n in (Nm, L)
    ]
    out64, grads64 = _run(bottleneck_attention_ref, inputs, grads_out)
    low = [t.to(dtype) for t in inputs]
    low_go = [t.to(dtype) for t in grads_out]
    out_t, grads_t = _run(bottleneck_attention_ref, low, low_go)
    out_k, grads_k = _run(bottleneck_attention, low, low_go)
    assert dispatch.last_refusal("bottleneck_attention") == []
    for i, name in enumerate(["out_main", "out_extra"]):
        assert out_k[i].dtype == dtype and out_k[i].shape == out64[i].shape
        _check_rule(name, out_k[i], out64[i], out_t[i], ATOL[dtype])
    names = ["dq_main", "dk_main", "dv_main", "dq_extra", "dk_extra", "dv_extra"]
    for name, gk, g64, gt in zip(names, grads_k, grads64, grads_t):
        assert gk.dtype == dtype
        _check_rule(name, gk, g64, gt, ATOL[dtype])


@needs_interpreter
@pytest.mark.parametrize(("Nm", "L"), [(5, 2), (3, 1)])
def test_gradcheck_fp64(force_triton, Nm: int, L: int) -> None:
    inputs = [t.requires_grad_() for t in _inputs(1, 2, Nm, L, 8, seed=3)]
    assert torch.autograd.gradcheck(
        lambda *a: bottleneck_attention(*a, 0.5), inputs, fast_mode=True
    )


def _check_all(got_out, got_grads, inputs, grads_out, dtype) -> None:
    """The flash-attention rule for both outputs and all six gradients (float64 reference;
    PyTorch's own error in ``dtype``), from inputs of any layout."""
    out64, grads64 = _run(bottleneck_attention_ref, [t.double() for t in inputs],
                          [g.double() for g in grads_out])  # fmt: skip
    low = [t.detach().to(dtype) for t in inputs]
    out_t, grads_t = _run(bottleneck_attention_ref, low, [g.to(dtype) for g in grads_out])
    for name, k, r, t in zip(["out_main", "out_extra"], got_out, out64, out_t):
        _check_rule(name, k, r, t, ATOL[dtype])
    names = ["dq_main", "dk_main", "dv_main", "dq_extra", "dk_extra", "dv_extra"]
    for name, k, r, t in zip(names, got_grads, grads64, grads_t):
        _check_rule(name, k, r, t, ATOL[dtype])


# Non-contiguous inputs and torch.compile: in fp16 on CUDA (fp32 takes the reference there)
# and under the interpreter in both dtypes.


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
def test_non_contiguous_inputs(force_triton, dtype) -> None:
    B, H, Nm, L, D = 2, 2, 19, 3, 24
    g = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    # (B, N, H, D) storage viewed as (B, H, N, D); v_extra is a column slice.
    main = [rand(B, Nm, H, D).transpose(1, 2) for _ in range(3)]
    extra = [rand(B, L, H, D).transpose(1, 2) for _ in range(2)]
    extra.append(rand(B, H, L, 2 * D)[..., ::2])
    inputs = main + extra
    assert not any(t.is_contiguous() for t in inputs)
    go = [rand(B, Nm, H, D).transpose(1, 2), rand(B, H, L, D)]
    out_k, grads_k = _run(bottleneck_attention, inputs, go)
    assert dispatch.last_refusal("bottleneck_attention") == []
    _check_all(out_k, grads_k, inputs, go, dtype)


def test_fake_tensor_shapes() -> None:
    with FakeTensorMode():
        qm, km, vm, qe, ke, ve = _inputs(2, 3, 37, 4, 24, dtype=torch.float16)
        om, oe, lse = _fwd_op(qm, km, vm, qe, ke, ve, 0.2)
        assert om.shape == (2, 3, 37, 24) and oe.shape == (2, 3, 4, 24)
        assert om.dtype == oe.dtype == torch.float16
        assert lse.shape == (2, 3, 41) and lse.dtype == torch.float32
        grads = _bwd_op(qm, km, vm, qe, ke, ve, om, oe, lse, om, oe, 0.2)
        assert [g.shape for g in grads] == [t.shape for t in (qm, km, vm, qe, ke, ve)]


@needs_interpreter
def test_fake_tensor_autograd_through_public_api(force_triton) -> None:
    """FakeTensor tracing (as MemTracker does) runs forward and backward via the custom ops."""
    with FakeTensorMode():
        inputs = [t.requires_grad_() for t in _inputs(1, 2, 9, 3, 16, dtype=torch.float32)]
        out_main, out_extra = bottleneck_attention(*inputs, 0.25)
        (out_main.sum() + out_extra.sum()).backward()
        assert [t.grad.shape for t in inputs] == [t.shape for t in inputs]


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
def test_torch_compile_fullgraph(force_triton, dtype) -> None:
    inputs = _inputs(1, 2, 21, 2, 48, dtype=dtype)
    compiled = torch.compile(bottleneck_attention, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = compiled(*leaves, 48**-0.5)
    g = torch.Generator().manual_seed(6)
    go = [torch.randn(o.shape, generator=g).to(DEVICE, dtype) for o in out]
    grads = torch.autograd.grad(out, leaves, go)
    _check_all([o.detach() for o in out], list(grads), inputs, go, dtype)


def test_opcheck() -> None:
    inputs = _inputs(1, 1, 5, 2, 16, dtype=KERNEL_DTYPE)
    torch.library.opcheck(_fwd_op, (*inputs, 0.25))
    om, oe, lse = _fwd_op(*inputs, 0.25)
    torch.library.opcheck(_bwd_op, (*inputs, om, oe, lse, om.clone(), oe.clone(), 0.25))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda t: t.__setitem__(0, t[0][0]), ValueError, "rank 4"),
        (lambda t: t.__setitem__(1, t[1][:1]), ValueError, "k_main has shape"),
        (lambda t: t.__setitem__(4, t[4][:, :1]), ValueError, "k_extra has shape"),
        (lambda t: t.__setitem__(5, t[5][..., :8]), ValueError, "v_extra has shape"),
        (lambda t: t.__setitem__(2, t[2][:, :, :3]), ValueError, "v_main has shape"),
        (lambda t: t.__setitem__(3, t[3].double()), TypeError, "dtype mismatch"),
        (lambda t: t.__setitem__(slice(0, 6), [x.int() for x in t]), TypeError, "unsupported"),
        (lambda t: t.__setitem__(5, t[5].to("meta")), ValueError, "device mismatch"),
    ],
    ids=["rank", "batch", "heads", "head-dim", "tokens", "dtype", "int-dtype", "device"],
)
def test_guards(mutate, error, match) -> None:
    inputs = _inputs(2, 2, 5, 3, 16, dtype=torch.float32)
    mutate(inputs)
    with pytest.raises(error, match=match):
        bottleneck_attention(*inputs, 0.25)


def test_forced_triton_unsupported_raises(force_triton) -> None:
    inputs = _inputs(1, 1, 4, 2, 300, dtype=torch.float32)
    with pytest.raises(dispatch.KernelUnsupportedError, match="head dim 300"):
        bottleneck_attention(*inputs, 0.25)


@pytest.mark.skipif(not dispatch.interpreting(), reason="bf16 is supported on a real GPU")
def test_forced_triton_bf16_in_interpreter_raises(force_triton) -> None:
    inputs = _inputs(1, 1, 4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(dispatch.KernelUnsupportedError, match="bfloat16"):
        bottleneck_attention(*inputs, 0.25)


def test_reference_mode_and_refusal_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    inputs = _inputs(1, 1, 4, 2, 16, dtype=torch.float32)
    out = bottleneck_attention(*inputs, 0.25)
    assert dispatch.last_refusal("bottleneck_attention") == [f"{dispatch.ENV_VAR}=reference"]
    for a, b in zip(out, bottleneck_attention_ref(*inputs, 0.25)):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_fp32_takes_the_reference(force_triton) -> None:
    inputs = _inputs(1, 2, 17, 4, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(dispatch.KernelUnsupportedError, match="float32"):
        bottleneck_attention(*inputs, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("Nm", "L"), [(393, 4), (257, 4), (257, 1)], ids=["video", "audio", "L1"])
def test_gpu_real_sizes(force_triton, dtype, Nm, L) -> None:
    B, H, D = 4, 8, 96
    inputs = _inputs(B, H, Nm, L, D, device="cuda")
    g = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(B, H, n, D, generator=g).double().cuda() for n in (Nm, L)]
    out64, grads64 = _run(bottleneck_attention_ref, inputs, grads_out)
    low = [t.to(dtype) for t in inputs]
    low_go = [t.to(dtype) for t in grads_out]
    out_t, grads_t = _run(bottleneck_attention_ref, low, low_go)
    out_k, grads_k = _run(bottleneck_attention, low, low_go)
    for name, k, r, t in zip(["out_main", "out_extra"], out_k, out64, out_t):
        _check_rule(name, k, r, t, ATOL[dtype])
    names = ["dq_main", "dk_main", "dv_main", "dq_extra", "dk_extra", "dv_extra"]
    for name, k, r, t in zip(names, grads_k, grads64, grads_t):
        _check_rule(name, k, r, t, ATOL[dtype])
