"""What the fused ops check and guarantee at run time beyond the float64 matches: the
backward's delta without the residual, the 16-byte alignment the kernels are compiled for,
batch x heads beyond CUDA's 65535 grid limit, and the rel-pos bias of the CLS row on the
aligned path. Kernels run through Triton's interpreter (tests/conftest.py)."""

import math

import pytest
import torch

from mmt_fast.kernels import bottleneck_attention as bn
from mmt_fast.kernels import dispatch, pooled_qkv
from mmt_fast.kernels import relpos_attention as rp
from mmt_fast.kernels._common import aligned
from tests.kernel_helpers import needs_interpreter as interpreter_only


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")


def _relpos_inputs(B, H, q_grid, k_grid, D, dtype, cls=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = int(cls) + math.prod(q_grid), int(cls) + math.prod(k_grid)
    q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, nk, D, generator=g, dtype=torch.float64)
    tables = [
        torch.randn(2 * max(a, b) - 1, D, generator=g, dtype=torch.float64) * 0.3
        for a, b in zip(q_grid, k_grid)
    ]
    return [t.to(dtype) for t in (q, k, v, *tables)]


def _grads(fn, tensors, dout, *args):
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(ts[0], ts[1], ts[2], ts[3:], *args)
    return out, torch.autograd.grad(out, ts, dout)


# ----------------------------------------------------------------------------- delta


@interpreter_only
def test_delta_comes_from_the_output_without_the_residual(force_triton):
    """|q| >> |softmax(S) V|: out = o + q in fp16 keeps few bits of o, so a delta computed as
    rowsum(dO (out - q)) is off by ~|q| 2^-11 per element. The kernel's delta uses o itself:
    dK stays within a few fp16 roundings of the fp64 reference, where the old formula's
    does not."""
    q_grid, k_grid, D = (2, 16), (1, 16), 16
    q, k, v, *tables = _relpos_inputs(1, 1, q_grid, k_grid, D, torch.float64)
    q = q * 200.0
    k = k * 2e-3  # scores stay O(1) despite the large queries
    tables = [t * 2e-3 for t in tables]
    args = (q_grid, k_grid, True, D**-0.5)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    half = [t.to(torch.float16) for t in (q, k, v, *tables)]
    _, want = _grads(rp.relpos_attention_ref, [q, k, v, *tables], dout, *args)
    _, got = _grads(rp.relpos_attention, half, dout.half(), *args)
    err = (got[1].double() - want[1]).abs().max().item()
    scale = want[1].abs().max().item()
    assert err <= 2e-2 * scale, (err, scale)

    # The same backward fed out - q (what the delta used before) is measurably worse.
    qh, kh, vh, *th = half
    out, lse, _o_att = rp._launch_fwd(qh, kh, vh, th, *args, True)
    old = rp._launch_bwd(dout.half(), qh, kh, vh, th, out - qh, lse, *args, True)
    err_old = (old[1].double() - want[1]).abs().max().item()
    assert err_old > 4 * err, (err_old, err)


# ----------------------------------------------------------------------------- alignment


def _offset_view(shape, dtype):
    """A view one element into its storage, with a last-dim stride one element longer."""
    base = torch.randn(*shape[:-1], shape[-1] + 1, dtype=torch.float64).to(dtype)
    return base[..., 1:]


@interpreter_only
def test_unaligned_views_are_copied(force_triton):
    """An offset view (address and strides 4 bytes off 16) runs the kernel on an aligned copy:
    same values and gradients as the reference on the original."""
    q_grid, k_grid, D = (2, 2), (1, 2), 16
    tensors = _relpos_inputs(1, 2, q_grid, k_grid, D, torch.float32)
    bad_q = _offset_view(tensors[0].shape, torch.float32)
    assert bad_q.data_ptr() % 16 and bad_q.stride(2) * 4 % 16
    tensors[0] = bad_q
    args = (q_grid, k_grid, True, D**-0.5)
    dout = torch.randn(bad_q.shape, generator=torch.Generator().manual_seed(2))
    out, got = _grads(rp.relpos_attention, tensors, dout, *args)
    want_out, want = _grads(rp.relpos_attention_ref, tensors, dout, *args)
    assert dispatch.last_refusal(rp.OP_NAME) == []  # the kernel ran
    for g, w in zip((out, *got), (want_out, *want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@interpreter_only
def test_rows_no_copy_can_align_are_refused_with_a_reason(monkeypatch, force_triton):
    """A last dim of 4 fp16 (8 bytes): no contiguous copy makes the rows 16-byte multiples,
    so the compiled kernels refuse it, naming the tensor and its strides."""
    monkeypatch.setattr(dispatch, "gpu_rules", lambda: True)  # the compiled kernels' rules
    q_grid, k_grid, D = (2, 2), (1, 2), 4
    q, k, v, *tables = _relpos_inputs(1, 1, q_grid, k_grid, D, torch.float16)
    with pytest.raises(dispatch.KernelUnsupportedError, match="not multiples of 16 bytes"):
        rp.relpos_attention(q, k, v, tables, q_grid, k_grid, True, D**-0.5)
    reasons = dispatch.last_refusal(rp.OP_NAME)
    assert [r.split()[0] for r in reasons] == ["q", "k", "v"], reasons
    m = [torch.randn(1, 2, 9, D).half() for _ in range(3)]
    e = [torch.randn(1, 2, 2, 8).half() for _ in range(3)]
    reasons = bn.triton_reasons(m[0], e[0], (*m, *e))
    assert sum(r.startswith(("q_main ", "k_main ", "v_main ")) for r in reasons) == 3, reasons
    assert not any(r.startswith(("q_extra", "k_extra", "v_extra")) for r in reasons), reasons


def test_aligned_copies_only_what_breaks_alignment():
    good = torch.randn(2, 3, 8, 16)
    assert aligned(good) is good
    assert aligned(good.transpose(1, 2)) is not None  # strides 64 B multiples: kept
    assert aligned(good.transpose(1, 2)).data_ptr() == good.data_ptr()
    bad = _offset_view((2, 3, 8, 16), torch.float32)
    fixed = aligned(bad)
    assert fixed.data_ptr() % 16 == 0 and fixed.is_contiguous()
    torch.testing.assert_close(fixed, bad, rtol=0, atol=0)
    shifted = torch.randn(2 * 16 + 1)[1:].view(2, 16)  # contiguous, but 4 bytes off
    fixed = aligned(shifted)
    assert fixed.data_ptr() % 16 == 0
    torch.testing.assert_close(fixed, shifted, rtol=0, atol=0)


@interpreter_only
def test_unaligned_gradient_is_copied_in_the_backward(force_triton):
    q_grid, k_grid, D = (2, 2), (1, 2), 16
    tensors = _relpos_inputs(1, 2, q_grid, k_grid, D, torch.float32)
    args = (q_grid, k_grid, True, D**-0.5)
    dout = _offset_view(tensors[0].shape, torch.float32)
    _, got = _grads(rp.relpos_attention, tensors, dout, *args)
    _, want = _grads(rp.relpos_attention_ref, tensors, dout.contiguous(), *args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- grid limits


def _launch_grids(fn) -> list[tuple[str, tuple]]:
    """Run ``fn`` with every Triton launch recorded (kernel name, grid) instead of run
    (compiled or interpreted kernels, autotuned or not)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen = []

    def name(obj):
        return getattr(obj, "__name__", None) or obj.fn.__name__

    def fake_run(self, *args, grid=None, warmup=False, **kwargs):
        seen.append((name(self), grid(kwargs) if callable(grid) else grid))

    def fake_tune(self, *args, grid=None, **kwargs):
        for c in self.configs:  # every config autotune could pick
            seen.append((name(self.fn), grid(c.kwargs) if callable(grid) else grid))

    classes = (JITFunction, InterpretedFunction, Autotuner)
    saved = [cls.run for cls in classes]
    JITFunction.run, InterpretedFunction.run, Autotuner.run = fake_run, fake_run, fake_tune
    try:
        fn()
    finally:
        for cls, run in zip(classes, saved):
            cls.run = run
    return seen


def test_relpos_grids_take_batch_x_heads_beyond_65535():
    """B H = 70000 (as on meta tensors, nothing allocated): every launch of the rel-pos
    forward and backward keeps its second and third grid axes within CUDA's 65535."""
    B, H, D = 35000, 2, 16
    q_grid, k_grid = (2, 32), (1, 32)
    meta = dict(device="meta", dtype=torch.float16)
    q = torch.empty(B, H, 1 + 64, D, **meta)
    k = torch.empty(B, H, 1 + 32, D, **meta)
    v = torch.empty_like(k)
    tables = [torch.empty(2 * max(a, b) - 1, D, **meta) for a, b in zip(q_grid, k_grid)]
    with dispatch.shape_only():
        assert rp.triton_reasons(q, k, v, tables) == []
    args = (q_grid, k_grid, True, D**-0.5, True, True)

    def both():
        _out, lse, o = rp._launch_fwd(q, k, v, tables, *args)
        rp._launch_bwd(torch.empty_like(q), q, k, v, tables, o, lse, *args)

    grids = _launch_grids(both)
    names = {name for name, _ in grids}
    assert {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
            "_relq_kernel", "_relq_dq_kernel", "_relq_table_kernel"} <= names  # fmt: skip
    for name, grid in grids:
        assert all(n <= dispatch.GRID_YZ_MAX for n in grid[1:]), (name, grid)
        assert grid[0] < 2**31, (name, grid)
    fwd = [g for n, g in grids if n == "_fwd_kernel"]
    assert all(g[0] >= B * H for g in fwd)


def test_bottleneck_grids_take_batch_x_heads_beyond_65535():
    """B H = 70000 on meta tensors: the bottleneck op accepts it and every launch of its
    forward and backward runs on grid axis 0 only (no 65535 limit there)."""
    meta = dict(device="meta", dtype=torch.float16)
    q = torch.empty(35000, 2, 9, 16, **meta)
    e = torch.empty(35000, 2, 2, 16, **meta)
    with dispatch.shape_only():
        assert bn.triton_reasons(q, e, (q, q, q, e, e, e)) == []

    def both():
        om, oe, lse = bn._launch_fwd(q, q, q, e, e, e, 0.25)
        bn._launch_bwd(q, q, q, e, e, e, om, oe, lse, om, oe, 0.25)

    grids = _launch_grids(both)
    assert {n for n, _ in grids} == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_kernel"}
    for name, grid in grids:
        assert len(grid) == 1 and 70000 <= grid[0] < 2**31, (name, grid)


def test_pooled_qkv_refuses_batch_x_heads_beyond_65535():
    meta = dict(device="meta", dtype=torch.float16)
    with dispatch.shape_only():
        x = torch.empty(35000, 5, 32, **meta)
        w = [torch.empty(16, 1, 3, 3, **meta)] * 3
        reasons = pooled_qkv.triton_reasons(torch.float16, [x], w, 16, 35000 * 2)
        assert any("batch x heads = 70000 > 65535" in r for r in reasons), reasons
        assert pooled_qkv.triton_reasons(torch.float16, [x], w, 16, 65535) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_grid_launches_match_the_reference(force_triton, dtype):
    """Real launches with B H = 70000 (tiny tokens and head dim; about 30 minutes under the
    interpreter, so CUDA only): the rel-pos and bottleneck ops' outputs and gradients match
    their float64 references within the dtype's rounding."""
    B, H, D = 35000, 2, 16
    g = torch.Generator().manual_seed(5)
    q_grid, k_grid = (2, 4), (1, 4)
    q, k, v, *tables = _relpos_inputs(B, H, q_grid, k_grid, D, torch.float64, seed=5)
    args = (q_grid, k_grid, True, D**-0.5)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    out64, grads64 = _grads(rp.relpos_attention_ref, [x.cuda() for x in (q, k, v, *tables)],
                            dout.cuda(), *args)  # fmt: skip
    low = [x.to("cuda", dtype) for x in (q, k, v, *tables)]
    out, grads = _grads(rp.relpos_attention, low, dout.to("cuda", dtype), *args)
    assert dispatch.last_refusal("relpos_attention") == []
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out.double(), out64, **tol)
    for a, b in zip(grads[:3], grads64[:3]):
        torch.testing.assert_close(a.double(), b, **tol)
    xs = [torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (3, 3, 3, 2, 2, 2)]
    douts = [torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (3, 2)]
    ref = [x.cuda().requires_grad_() for x in xs]
    want = bn.bottleneck_attention_ref(*ref, 0.25)
    want_g = torch.autograd.grad(want, ref, [d.cuda() for d in douts])
    got_in = [x.to("cuda", dtype).requires_grad_() for x in xs]
    got = bn.bottleneck_attention(*got_in, 0.25)
    assert dispatch.last_refusal("bottleneck_attention") == []
    got_g = torch.autograd.grad(got, got_in, [d.to("cuda", dtype) for d in douts])
    for a, b in zip(list(got) + list(got_g), list(want) + list(want_g)):
        torch.testing.assert_close(a.double(), b, **tol)


# ----------------------------------------------------------------------------- CLS row


@interpreter_only
@pytest.mark.parametrize("residual_cls", [True, False])
def test_cls_row_on_the_aligned_path(residual_cls, force_triton):
    """The aligned bias path (K2 a multiple of BLOCK_N) reads relq rows i - 1 for query i: the
    CLS query (row -1) must get no bias, in the forward (row blocks starting at the CLS row)
    and in the transposed dK/dV and the dQ kernels. Large tables make any leak visible."""
    q_grid, k_grid, D = (3, 16), (2, 16), 16
    geo = rp._geometry(2, k_grid, True)
    assert geo["USE2"] and geo["ALIGN_OK"] and k_grid[-1] % 16 == 0  # the aligned path
    q, k, v, *tables = _relpos_inputs(2, 1, q_grid, k_grid, D, torch.float64, seed=3)
    tables = [t * 20 for t in tables]
    args = (q_grid, k_grid, True, D**-0.5, True, residual_cls)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, got = _grads(rp.relpos_attention, [q, k, v, *tables], dout, *args)
    want_out, want = _grads(rp.relpos_attention_ref, [q, k, v, *tables], dout, *args)
    # the CLS row alone: no bias, exactly softmax(q k^T scale) v (+ q)
    s = (q[:, :, :1] @ k.transpose(-2, -1)) * D**-0.5
    cls_row = s.softmax(-1) @ v + (q[:, :, :1] if residual_cls else 0)
    torch.testing.assert_close(out[:, :, :1], cls_row, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------------------- head-dim split


@interpreter_only
@pytest.mark.parametrize(
    "q_grid, k_grid",
    [((3, 16), (2, 16)), ((2, 3, 3), (1, 2, 2))],
    ids=["aligned", "short_axes"],
)
def test_head_dim_in_two_chunks_matches_fp64(q_grid, k_grid, force_triton):
    """Head dim 48 runs as 32 + 16 columns (as 96 runs as 64 + 32 on the GPU: no padding to a
    power of 2): outputs and gradients match the fp64 reference."""
    D = 48
    assert rp._block_d_split(D) == (32, 16) and rp._block_d_split(96) == (64, 32)
    assert rp._block_d_split(64) == (64, 0) and rp._block_d_split(40) == (64, 0)
    tensors = _relpos_inputs(2, 1, q_grid, k_grid, D, torch.float64, seed=5)
    args = (q_grid, k_grid, True, D**-0.5)
    dout = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(6),
                       dtype=torch.float64)  # fmt: skip
    out, got = _grads(rp.relpos_attention, tensors, dout, *args)
    want_out, want = _grads(rp.relpos_attention_ref, tensors, dout, *args)
    assert dispatch.last_refusal(rp.OP_NAME) == []
    for g, w in zip((out, *got), (want_out, *want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
