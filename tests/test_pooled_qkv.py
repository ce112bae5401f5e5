"""Tests of kernels/pooled_qkv.py (Triton path through the CPU interpreter)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import ATOL, DEVICE, needs_interpreter
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mmt_fast.kernels import dispatch
from mmt_fast.kernels.pooled_qkv import _bwd_op, _fwd_op, pooled_grid, pooled_qkv, pooled_qkv_ref

LEAF_NAMES = ["x", "qkv_weight", "qkv_bias", "wq", "wk", "wv", "gq", "bq", "gk", "bk", "gv", "bv"]


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")


def _leaves(B, grid, has_cls, H, D, C_in, kernel=3, dtype=torch.float64, device=DEVICE, seed=0):
    """[x, qkv_weight, qkv_bias, wq, wk, wv, gq, bq, gk, bk, gv, bv]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(device, dtype)

    N = int(has_cls) + math.prod(grid)
    C = H * D
    k = (kernel,) * len(grid)
    return [
        rnd(B, N, C_in),
        rnd(3 * C, C_in, scale=C_in**-0.5),
        rnd(3 * C, scale=0.1),
        *(rnd(D, 1, *k, scale=0.3) for _ in range(3)),
        *(rnd(D, scale=0.1, shift=s) for _ in range(3) for s in (1.0, 0.0)),
    ]


def _call(fn, leaves, grid, has_cls, H, strides, eps=1e-6):
    x, w, b, wq, wk, wv, gq, bq, gk, bk, gv, bv = leaves
    return fn(x, w, b, grid, has_cls, H, (wq, wk, wv), strides, ((gq, bq), (gk, bk), (gv, bv)), eps)


def _timm_style(leaves, grid, has_cls, H, strides, eps=1e-6):
    """Independent formulation: nn.Linear, then per tensor F.conv2d/conv3d and F.layer_norm."""
    x, w, b, wq, wk, wv, gq, bq, gk, bk, gv, bv = leaves
    B, N, C_in = x.shape
    lin = nn.Linear(C_in, w.shape[0], dtype=x.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    D = w.shape[0] // 3 // H
    qkv = lin(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    conv = {2: F.conv2d, 3: F.conv3d}[len(grid)]
    outs, grids = [], []
    for t, pw, (gamma, beta), stride in zip(
        qkv, (wq, wk, wv), ((gq, bq), (gk, bk), (gv, bv)), (strides[0], strides[1], strides[1])
    ):
        cls_tok = t[:, :, :1] if has_cls else t[:, :, :0]
        sp = t[:, :, int(has_cls) :].reshape(B * H, *grid, D)
        sp = sp.permute(0, sp.dim() - 1, *range(1, sp.dim() - 1))  # (B*H, D, *grid)
        pad = [k // 2 for k in pw.shape[2:]]
        sp = conv(sp, pw, stride=stride, padding=pad, groups=D)
        grids.append(tuple(sp.shape[2:]))
        sp = sp.reshape(B, H, D, -1).transpose(2, 3)
        outs.append(F.layer_norm(torch.cat([cls_tok, sp], 2), (D,), gamma, beta, eps))
    return (*outs, grids[0], grids[1])


def _run(fn, leaves, grid, has_cls, H, strides, grads_out):
    leaves = [t.detach().requires_grad_() for t in leaves]
    out = _call(fn, leaves, grid, has_cls, H, strides)
    grads = torch.autograd.grad(out[:3], leaves, grads_out)
    return [o.detach() for o in out[:3]], out[3:], list(grads)


def _check_rule(name, kernel, ref64, torch_lowp, atol):
    err = (kernel.double() - ref64).abs().max().item()
    base = (torch_lowp.double() - ref64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: kernel err {err:.3g}, torch err {base:.3g}"


CASES = {
    # id: (B, grid, has_cls, H, D, C_in, (stride_q, stride_kv))
    "5x7-cls-q1-kv2x2": (1, (5, 7), True, 2, 24, 16, ((1, 1), (2, 2))),
    "5x7-nocls-q2x2-kv1": (1, (5, 7), False, 1, 16, 8, ((2, 2), (1, 1))),
    "1x13-cls-time-only": (2, (1, 13), True, 1, 24, 8, ((1, 2), (1, 2))),
    "2x5x3-cls-kv122": (1, (2, 5, 3), True, 2, 8, 8, ((1, 1, 1), (1, 2, 2))),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ref_matches_timm_style(case: str) -> None:
    B, grid, has_cls, H, D, C_in, strides = CASES[case]
    leaves = _leaves(B, grid, has_cls, H, D, C_in)
    got = _call(pooled_qkv_ref, leaves, grid, has_cls, H, strides)
    want = _timm_style(leaves, grid, has_cls, H, strides)
    assert got[3:] == want[3:]
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("grid", "kernel", "stride"),
    [((5, 7), (3, 3), (2, 2)), ((1, 13), (3, 3), (1, 2)), ((8, 14, 14), (3, 3, 3), (1, 4, 4))],
)
def test_pooled_grid_formula(grid, kernel, stride) -> None:
    x = torch.zeros(1, 1, *grid)
    w = torch.zeros(1, 1, *kernel)
    conv = {2: F.conv2d, 3: F.conv3d}[len(grid)]
    want = conv(x, w, stride=stride, padding=[k // 2 for k in kernel]).shape[2:]
    assert pooled_grid(grid, kernel, stride) == tuple(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_vs_fp64(force_triton, case: str, dtype: torch.dtype) -> None:
    B, grid, has_cls, H, D, C_in, strides = CASES[case]
    leaves = _leaves(B, grid, has_cls, H, D, C_in)
    shapes = [o.shape for o in _call(pooled_qkv_ref, leaves, grid, has_cls, H, strides)[:3]]
    g = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE) for s in shapes]
    out64, grids64, grads64 = _run(pooled_qkv_ref, leaves, grid, has_cls, H, strides, grads_out)
    low = [t.to(dtype) for t in leaves]
    low_go = [t.to(dtype) for t in grads_out]
    out_t, _, grads_t = _run(pooled_qkv_ref, low, grid, has_cls, H, strides, low_go)
    out_k, grids_k, grads_k = _run(pooled_qkv, low, grid, has_cls, H, strides, low_go)
    assert dispatch.last_refusal("pooled_qkv") == []
    assert grids_k == grids64
    for name, k, r, t in zip("qkv", out_k, out64, out_t):
        assert k.dtype == dtype and k.shape == r.shape and k.is_contiguous()
        _check_rule(name, k, r, t, ATOL[dtype])
    for name, k, r, t in zip(LEAF_NAMES, grads_k, grads64, grads_t):
        assert k.dtype == dtype
        _check_rule("d" + name, k, r, t, ATOL[dtype])


@pytest.mark.parametrize(
    ("grid", "has_cls", "strides", "wrt"),
    [
        # x (the d(projection) kernel), a strided conv weight, a gamma and a beta.
        ((3, 4), True, ((1, 1), (2, 2)), (0, 4, 6, 11)),
        ((2, 3, 3), False, ((1, 1, 1), (1, 2, 2)), (0, 5)),
    ],
    ids=["2d-cls", "3d-nocls"],
)
@needs_interpreter
def test_gradcheck_fp64(force_triton, grid, has_cls, strides, wrt) -> None:
    # Each input costs two interpreted forwards in fast mode and each output a backward,
    # so only a few inputs are checked and q, k, v are checked as one concatenated output.
    leaves = _leaves(1, grid, has_cls, 1, 3, 2, seed=2)
    inputs = [leaves[i].requires_grad_() for i in wrt]

    def fn(*inputs):
        full = list(leaves)
        for i, t in zip(wrt, inputs):
            full[i] = t
        return torch.cat(
            [t.flatten() for t in _call(pooled_qkv, full, grid, has_cls, 1, strides)[:3]]
        )

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_unused_outputs_get_zero_gradient(force_triton) -> None:
    """Only q reaches the loss: the backward receives no gradient for k and v."""
    B, grid, has_cls, H, D, C_in, strides = CASES["1x13-cls-time-only"]
    leaves = _leaves(B, grid, has_cls, H, D, C_in)
    grads = []
    for fn in (pooled_qkv, pooled_qkv_ref):
        leaves = [t.detach().requires_grad_() for t in leaves]
        q = _call(fn, leaves, grid, has_cls, H, strides)[0]
        grads.append(torch.autograd.grad(q.square().sum(), leaves, allow_unused=True))
    for a, b in zip(*grads):
        if b is None or not b.any():
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b)


def test_non_contiguous_inputs(force_triton) -> None:
    B, grid, has_cls, H, D, C_in, strides = CASES["5x7-cls-q1-kv2x2"]
    leaves = _leaves(B, grid, has_cls, H, D, C_in, dtype=torch.float32)
    x = leaves[0]
    leaves[0] = x.transpose(0, 1).contiguous().transpose(0, 1)  # (N, B, C) storage
    leaves[3] = leaves[3].permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    leaves[6] = torch.stack([leaves[6], leaves[6]], 1)[:, 0]
    assert not any(leaves[i].is_contiguous() for i in (3, 6))
    go = [
        torch.randn(o.shape, device=DEVICE)
        for o in _call(pooled_qkv_ref, leaves, grid, has_cls, H, strides)[:3]
    ]
    go[1] = go[1].transpose(2, 3).contiguous().transpose(2, 3)
    out_k, _, grads_k = _run(pooled_qkv, leaves, grid, has_cls, H, strides, go)
    out_r, _, grads_r = _run(pooled_qkv_ref, leaves, grid, has_cls, H, strides, go)
    for a, b in zip(out_k + grads_k, out_r + grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_strided_projection_in_custom_op() -> None:
    """The kernels read the projection through its strides (here a column slice)."""
    B, grid, has_cls, H, D, C_in, strides = CASES["1x13-cls-time-only"]
    leaves = _leaves(B, grid, has_cls, H, D, C_in, dtype=torch.float32)
    x, w, b, *params = leaves
    qkv = F.linear(x, w, b)
    wide = torch.randn(*qkv.shape[:2], 2 * qkv.shape[2], device=DEVICE)
    wide[..., ::2] = qkv
    strided = wide[..., ::2]
    args = (list(grid), has_cls, H, list(strides[0]), list(strides[1]), 1e-6)
    for a, b in zip(_fwd_op(strided, *params, *args), _fwd_op(qkv, *params, *args)):
        torch.testing.assert_close(a, b)


def test_fake_tensor_shapes() -> None:
    B, grid, has_cls, H, D, C_in, strides = CASES["2x5x3-cls-kv122"]
    args = (list(grid), has_cls, H, list(strides[0]), list(strides[1]), 1e-6)
    with FakeTensorMode():
        x, w, b, *params = _leaves(B, grid, has_cls, H, D, C_in, dtype=torch.float16)
        qkv = F.linear(x, w, b)
        q, k, v = _fwd_op(qkv, *params, *args)
        assert q.shape == (B, H, 1 + 2 * 5 * 3, D)
        assert k.shape == v.shape == (B, H, 1 + 2 * 3 * 2, D)
        assert q.dtype == torch.float16
        grads = _bwd_op(qkv, *params, q, k, v, *args)
        assert [g.shape for g in grads] == [t.shape for t in (qkv, *params)]


@needs_interpreter
def test_fake_tensor_autograd_through_public_api(force_triton) -> None:
    """FakeTensor tracing (as MemTracker does) runs forward and backward via the custom ops."""
    B, grid, has_cls, H, D, C_in, strides = CASES["5x7-cls-q1-kv2x2"]
    with FakeTensorMode():
        leaves = [t.requires_grad_() for t in _leaves(B, grid, has_cls, H, D, C_in)]
        q, k, v, q_grid, k_grid = _call(pooled_qkv, leaves, grid, has_cls, H, strides)
        assert q_grid == (5, 7) and k_grid == (3, 4)
        (q.sum() + k.sum() + v.sum()).backward()
        assert [t.grad.shape for t in leaves] == [t.shape for t in leaves]


def test_torch_compile_fullgraph(force_triton) -> None:
    grid, has_cls, H, strides = (2, 3), True, 1, ((1, 1), (2, 2))
    leaves = [t.requires_grad_() for t in _leaves(1, grid, has_cls, H, 4, 4, dtype=torch.float32)]

    def fn(*leaves):
        return _call(pooled_qkv, leaves, grid, has_cls, H, strides)[:3]

    q, k, v = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
    (q.sum() + k.square().sum() + v.sum()).backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    want = _call(pooled_qkv_ref, ref_leaves, grid, has_cls, H, strides)
    (want[0].sum() + want[1].square().sum() + want[2].sum()).backward()
    for a, b in zip((q, k, v), want[:3]):
        torch.testing.assert_close(a, b)
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-4, atol=1e-5)


def test_opcheck() -> None:
    grid, has_cls, H, strides = (2, 3), True, 1, ((1, 1), (2, 2))
    x, w, b, *params = _leaves(1, grid, has_cls, H, 4, 4, dtype=torch.float32)
    qkv = F.linear(x, w, b)
    args = (list(grid), has_cls, H, list(strides[0]), list(strides[1]), 1e-6)
    torch.library.opcheck(_fwd_op, (qkv, *params, *args))
    q, k, v = _fwd_op(qkv, *params, *args)
    torch.library.opcheck(_bwd_op, (qkv, *params, q.clone(), k.clone(), v.clone(), *args))


def _bad(index, fn):
    def mutate(leaves, kw):
        leaves[index] = fn(leaves[index])

    return mutate


def _bad_kw(key, value):
    def mutate(leaves, kw):
        kw[key] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (_bad(0, lambda t: t[0]), ValueError, r"\(B, N, C_in\)"),
        (_bad(0, lambda t: t[:, :-1]), ValueError, "N=35 tokens"),
        (_bad_kw("grid", (6, 6, 1, 1)), ValueError, "grid must be 2 or 3"),
        (_bad_kw("num_heads", 5), ValueError, "not divisible by num_heads"),
        (_bad(1, lambda t: t[:, :-1]), ValueError, "qkv_weight must be"),
        (_bad(2, lambda t: t[:-1]), ValueError, "qkv_bias must have shape"),
        (_bad(4, lambda t: t[:-1]), ValueError, "pool weight wk"),
        (_bad(5, lambda t: t[..., 0]), ValueError, "pool weight wv"),
        (_bad_kw("strides", ((1, 1), (2, 2, 2))), ValueError, "stride_kv must be 2"),
        (_bad(9, lambda t: t[:-1]), ValueError, r"gamma_k, beta_k"),
        (_bad(1, lambda t: t.double()), TypeError, "dtype mismatch: x is torch.float32"),
        (_bad(3, lambda t: t.half()), TypeError, "pool/norm parameters"),
        (_bad(0, lambda t: t.int()), TypeError, "unsupported dtype"),
        (_bad(7, lambda t: t.to("meta")), ValueError, "device mismatch"),
    ],
    ids=[
        "x-rank", "N-vs-grid", "grid-rank", "heads", "weight-shape", "bias-shape", "wk-D",
        "wv-rank", "stride-len", "norm-shape", "linear-dtype", "param-dtype", "int-dtype",
        "device",
    ],
)  # fmt: skip
def test_guards(mutate, error, match) -> None:
    B, grid, has_cls, H, D, C_in, strides = CASES["5x7-cls-q1-kv2x2"]
    leaves = _leaves(B, grid, has_cls, H, D, C_in, dtype=torch.float32)
    kw = {"grid": grid, "num_heads": H, "strides": strides}
    mutate(leaves, kw)
    x, w, b, wq, wk, wv, gq, bq, gk, bk, gv, bv = leaves
    norms = ((gq, bq), (gk, bk), (gv, bv))
    with pytest.raises(error, match=match):
        pooled_qkv(
            x, w, b, kw["grid"], has_cls, kw["num_heads"], (wq, wk, wv), kw["strides"], norms
        )


def test_fp32_params_with_fp16_activations(force_triton) -> None:
    """Autocast-style use: fp16 x and linear, fp32 pool/norm parameters."""
    B, grid, has_cls, H, D, C_in, strides = CASES["1x13-cls-time-only"]
    leaves = _leaves(B, grid, has_cls, H, D, C_in, dtype=torch.float32)
    leaves[:3] = [t.half() for t in leaves[:3]]
    out_k = _call(pooled_qkv, leaves, grid, has_cls, H, strides)
    out_r = _call(pooled_qkv_ref, leaves, grid, has_cls, H, strides)
    for a, b in zip(out_k[:3], out_r[:3]):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_forced_triton_unsupported_raises(force_triton) -> None:
    leaves = _leaves(1, (5, 5), False, 1, 4, 4, kernel=13, dtype=torch.float32)
    with pytest.raises(dispatch.KernelUnsupportedError, match="169 taps"):
        _call(pooled_qkv, leaves, (5, 5), False, 1, ((1, 1), (1, 1)))


@pytest.mark.skipif(not dispatch.interpreting(), reason="bf16 is supported on a real GPU")
def test_forced_triton_bf16_in_interpreter_raises(force_triton) -> None:
    leaves = _leaves(1, (3, 3), True, 1, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(dispatch.KernelUnsupportedError, match="bfloat16"):
        _call(pooled_qkv, leaves, (3, 3), True, 1, ((1, 1), (1, 1)))


def test_reference_mode_and_refusal_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    leaves = _leaves(1, (3, 3), True, 1, 4, 4, dtype=torch.float32)
    _call(pooled_qkv, leaves, (3, 3), True, 1, ((1, 1), (2, 2)))
    assert dispatch.last_refusal("pooled_qkv") == [f"{dispatch.ENV_VAR}=reference"]


GPU_CASES = {
    # MAT-like audio stage (F, T) and a video stage (T, H, W); D = 96.
    "audio-16x64": (2, (16, 64), True, 1, 96, 96, ((1, 1), (2, 2))),
    "audio-time-only": (2, (16, 64), True, 2, 96, 192, ((1, 2), (1, 4))),
    "video-8x14x14": (2, (8, 14, 14), True, 1, 96, 96, ((1, 2, 2), (1, 4, 4))),
    "video-8x56x56-kv188": (1, (8, 56, 56), True, 1, 96, 96, ((1, 1, 1), (1, 8, 8))),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_real_sizes(force_triton, case: str, dtype: torch.dtype) -> None:
    B, grid, has_cls, H, D, C_in, strides = GPU_CASES[case]
    leaves = _leaves(B, grid, has_cls, H, D, C_in, device="cuda")
    out64 = _call(pooled_qkv_ref, leaves, grid, has_cls, H, strides)[:3]
    g = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=g).double().cuda() for o in out64]
    out64, _, grads64 = _run(pooled_qkv_ref, leaves, grid, has_cls, H, strides, grads_out)
    low = [t.to(dtype) for t in leaves]
    low_go = [t.to(dtype) for t in grads_out]
    out_t, _, grads_t = _run(pooled_qkv_ref, low, grid, has_cls, H, strides, low_go)
    out_k, _, grads_k = _run(pooled_qkv, low, grid, has_cls, H, strides, low_go)
    for name, k, r, t in zip("qkv", out_k, out64, out_t):
        _check_rule(name, k, r, t, ATOL[dtype])
    for name, k, r, t in zip(LEAF_NAMES, grads_k, grads64, grads_t):
        _check_rule("d" + name, k, r, t, ATOL[dtype])
