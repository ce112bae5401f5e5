"""Tests of kernels/relpos_attention.py: reference vs brute force, Triton kernels vs a
float64 reference (on CUDA when there is one, else through Triton's interpreter on the
CPU), gradcheck, custom-op tracing, guards and dispatch. Sizes are tiny: the interpreter
is slow."""

import math

import numpy as np
import pytest
import torch
from kernel_helpers import DEVICE, KERNEL_DTYPE, fp32_attention
from torch._subclasses.fake_tensor import FakeTensorMode

from mmt_fast.kernels import dispatch
from mmt_fast.kernels._triton import triton
from mmt_fast.kernels.relpos_attention import (
    OP_NAME,
    rel_pos_index,
    relpos_attention,
    relpos_attention_ref,
)

interpreter_only = pytest.mark.skipif(
    not dispatch.interpreting(), reason="float64 / bf16 refusal: interpreter-specific"
)

# (B, H, q_grid, k_grid, has_cls, D)
CASES = {
    "2d_5x7_over_3x4_cls": (1, 2, (5, 7), (3, 4), True, 24),
    "2d_1x13": (1, 1, (1, 13), (1, 13), False, 16),
    "2d_3x20_direct_axis": (1, 1, (3, 20), (3, 20), True, 16),
    # Head dim 48 = 32 + 16 in chunks; 20 keys on an axis: the table gradient's key-as-M path.
    "2d_2x20_head_dim_32+16": (1, 1, (2, 20), (1, 20), True, 48),
    "2d_3x2_over_7x5": (2, 1, (3, 2), (7, 5), False, 8),
    "3d_2x3x3_over_1x2x2_cls": (2, 2, (2, 3, 3), (1, 2, 2), True, 16),
    "3d_2x3x3_over_1x2x2": (1, 1, (2, 3, 3), (1, 2, 2), False, 40),
    "1d_12_over_6": (1, 1, (12,), (6,), False, 16),
    # Key rows a multiple of the interpreter's BLOCK_N (16): the grid-aligned bias path.
    "2d_4x32_over_2x32_aligned_cls": (1, 1, (4, 32), (2, 32), True, 16),
    "3d_2x2x16_aligned": (1, 1, (2, 2, 16), (2, 2, 16), False, 16),
    # Short axes whose one-hots (16 + 32 columns) are narrower than their packed relq columns
    # (33, padded to 64): one bias matmul per axis; the other short-axis cases pack them.
    "2d_3x30_per_axis_onehots_cls": (1, 1, (3, 30), (3, 30), True, 16),
    # A fastest axis longer than 64 that BLOCK_N does not divide: the gather fallback.
    "2d_2x70_gather_cls": (1, 1, (2, 70), (2, 70), True, 16),
}
# The flash-attention rule: |kernel - fp64| <= 2 |PyTorch in the same dtype - fp64| + atol,
# atol = ATOL_REL * max |fp64| (fp32: a few ulp; exp2 in log2 units and another summation
# order cost the kernel ~1e-6 relative where PyTorch's fp32 error is ~2e-7).
ATOL_REL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def make_inputs(case, dtype, seed=0, requires_grad=True, device=DEVICE):
    B, H, q_grid, k_grid, has_cls, D = case
    g = torch.Generator().manual_seed(seed)
    Nq, Nk = int(has_cls) + math.prod(q_grid), int(has_cls) + math.prod(k_grid)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)
    tables = [
        0.5 * torch.randn(2 * max(qa, ka) - 1, D, generator=g, dtype=torch.float64)
        for qa, ka in zip(q_grid, k_grid)
    ]
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in (q, k, v, *tables)]


def call(fn, tensors, case, residual=True, residual_cls=True):
    _, _, q_grid, k_grid, has_cls, D = case
    q, k, v, *tables = tensors
    return fn(q, k, v, tables, q_grid, k_grid, has_cls, D**-0.5, residual, residual_cls)


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")


# ----------------------------------------------------------------------------- reference


def brute_force(q, k, v, tables, q_grid, k_grid, has_cls, scale, residual, residual_cls=True):
    """Independent float64 loops over (i, j); dist in float32 then truncated, as timm."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    cls = int(has_cls)
    q_coords = list(np.ndindex(*q_grid))
    k_coords = list(np.ndindex(*k_grid))

    def dist(x, y, qa, ka):
        q_ratio, k_ratio = max(ka / qa, 1.0), max(qa / ka, 1.0)
        d = np.float32(x) * np.float32(q_ratio) - np.float32(y) * np.float32(k_ratio)
        return int(d + np.float32((ka - 1) * k_ratio))

    bias = torch.zeros(B, H, Nq, Nk, dtype=torch.float64)
    for i in range(cls, Nq):
        for j in range(cls, Nk):
            xi, yj = q_coords[i - cls], k_coords[j - cls]
            for a, table in enumerate(tables):
                r = table[dist(xi[a], yj[a], q_grid[a], k_grid[a])]
                bias[:, :, i, j] += q[:, :, i] @ r
    attn = torch.softmax(q @ k.transpose(-2, -1) * scale + bias, dim=-1)
    out = attn @ v
    for i in range(Nq):
        if residual and (residual_cls or i >= cls):
            out[:, :, i] += q[:, :, i]
    return out


@pytest.mark.parametrize(
    "residual, residual_cls",
    [(True, True), (True, False), (False, True)],
    ids=["res", "res_no_cls", "no_res"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_brute_force(name, residual, residual_cls):
    case = CASES[name]
    tensors = make_inputs(case, torch.float64, requires_grad=False, device="cpu")
    want = call(brute_force, tensors, case, residual, residual_cls)
    got = call(relpos_attention_ref, tensors, case, residual, residual_cls)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [(3, 7), (7, 3), (5, 3), (4, 4), (1, 6), (6, 1)])
def test_rel_pos_index_range(sizes):
    qa, ka = sizes
    idx = rel_pos_index(qa, ka)
    assert idx.shape == (qa, ka) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < 2 * max(qa, ka) - 1


# ----------------------------------------------------------------------------- kernel accuracy


def forward_backward(fn, tensors, case, dout, residual=True, residual_cls=True):
    out = call(fn, tensors, case, residual, residual_cls)
    grads = torch.autograd.grad(out, tensors, dout.to(out.dtype))
    return [out.detach(), *grads]


def grad_names(case):
    return ["out", "dq", "dk", "dv"] + [f"dtable{a}" for a in range(len(case[2]))]


def assert_flash_rule(label, got, ref_low, ref64, dtype, term_scale=0.0):
    """Kernel error vs fp64 at most twice PyTorch's own error in ``dtype`` (plus a few ulp).

    The few ulp are relative to max(|fp64|, term_scale). ``term_scale`` is the size of the
    terms a reduction sums (for gradients: the largest entry of any gradient of the same
    call). A gradient whose terms cancel (e.g. a rel-pos table row whose true gradient is
    ~1e-15) still carries rounding noise of the size of those terms, and how large it is
    depends on the CPU's summation order; scaling by its own ~0 value would compare noise.
    """
    assert got.dtype == dtype and got.shape == ref64.shape, label
    err = (got.double() - ref64).abs().max().item()
    torch_err = (ref_low.double() - ref64).abs().max().item()
    atol = ATOL_REL[dtype] * max(ref64.abs().max().item(), term_scale)
    if label.startswith("dtable"):
        # A table gradient sums dS q over every query and key; along a short axis (k_a = 1)
        # its terms cancel to ~0 (softmax rows of dS sum to 0), leaving pure rounding noise:
        # allow one ulp of the terms' size.
        atol = max(atol, torch.finfo(dtype).eps * term_scale)
    assert err <= 2 * torch_err + atol, (
        f"{label}: kernel error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + {atol:.2g}"
    )


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_fp64(name, dtype, force_triton):
    case = CASES[name]
    tensors = make_inputs(case, dtype)
    tensors64 = [t.detach().double().requires_grad_() for t in tensors]
    dout = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = forward_backward(relpos_attention, tensors, case, dout)
    ref_low = forward_backward(relpos_attention_ref, tensors, case, dout)
    ref64 = forward_backward(relpos_attention_ref, tensors64, case, dout.double())
    term_scale = max(t.abs().max().item() for t in ref64[1:])
    for label, g, lo, hi in zip(grad_names(case), got, ref_low, ref64):
        assert_flash_rule(label, g, lo, hi, dtype, term_scale if label != "out" else 0.0)
    assert dispatch.last_refusal(OP_NAME) == []


@pytest.mark.skipif(not dispatch.interpreting(), reason="sets the interpreter's tile sizes")
@pytest.mark.parametrize(
    "grids",
    [((2, 5, 4), (2, 5, 4)), ((2, 60), (5, 60))],
    ids=["packed_bias_40_keys", "per_axis_bias_300_keys"],
)
def test_narrow_last_key_tile(grids, force_triton, monkeypatch):
    """Key tiles of 32 whose last one is 16 wide (the forward's and dQ's short-axes path,
    ``_tail_width``): 40 keys as 32 + 16 (the multi-hot bias) and 300 as 9 x 32 + 16 (one
    one-hot per axis), against float64. The interpreter's own tiles are 16 wide (no tail)."""
    from mmt_fast.kernels import relpos_attention as rp
    from mmt_fast.kernels import tuning

    wide = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(rp._fwd_kernel, "configs", [wide])
    monkeypatch.setattr(rp._fwd_kernel, "cache", {})
    key = f"{rp.OP_NAME}._bwd_dq_kernel"
    monkeypatch.setitem(tuning.INTERPRETER, key, ({"BLOCK_M": 16, "BLOCK_N": 32}, 4, 1))
    q_grid, k_grid = grids
    case = (1, 2, q_grid, k_grid, True, 16)
    n_keys = math.prod(k_grid)
    assert rp._tail_width(n_keys, 32, True) == 16 and n_keys % 32 <= 16
    geo = rp._geometry(len(k_grid), k_grid, True)
    assert geo["FULL"] and bool(geo["WP"]) == (k_grid == (2, 5, 4))
    tensors = make_inputs(case, torch.float16)
    dout = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = forward_backward(relpos_attention, tensors, case, dout)
    check_against_fp64(case, got, tensors, dout, torch.float16)
    assert dispatch.last_refusal(OP_NAME) == []


def check_against_fp64(case, got, tensors, dout, dtype, residual=True, residual_cls=True, ref=None):
    """The flash-attention rule for an output and its gradients ``got`` (float64 reference and
    PyTorch's own error in ``dtype`` from ``ref``, the reference op by default)."""
    ref = ref or relpos_attention_ref
    low = [t.detach().to(dtype).requires_grad_() for t in tensors]
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    ref_low = forward_backward(ref, low, case, dout.to(dtype), residual, residual_cls)
    ref64 = forward_backward(ref, t64, case, dout.double(), residual, residual_cls)
    term_scale = max(t.abs().max().item() for t in ref64[1:])
    for label, g, lo, hi in zip(grad_names(case), got, ref_low, ref64):
        assert_flash_rule(label, g, lo, hi, dtype, term_scale if label != "out" else 0.0)


# The tests below run on CUDA in fp16 (fp32 attention takes the reference there) and under
# the interpreter in both dtypes: residual variants, no tables, non-contiguous inputs and
# torch.compile are compiled paths a GPU run must execute too.


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
@pytest.mark.parametrize(
    "residual, residual_cls", [(False, True), (True, False)], ids=["no_res", "res_no_cls"]
)
def test_kernel_residual_variants(residual, residual_cls, dtype, force_triton):
    case = CASES["3d_2x3x3_over_1x2x2_cls"]
    tensors = make_inputs(case, dtype)
    dout = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = forward_backward(relpos_attention, tensors, case, dout, residual, residual_cls)
    check_against_fp64(case, got, tensors, dout, dtype, residual, residual_cls)
    assert dispatch.last_refusal(OP_NAME) == []


def _sdpa_plus_q(q, k, v, tables, q_grid, k_grid, has_cls, scale, residual, residual_cls):
    """Attention without rel-pos tables, by PyTorch's SDPA (math path), plus the residual."""
    att = torch.softmax((q @ k.transpose(-2, -1)).float() * scale, -1).to(v.dtype) @ v
    return att + q


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
def test_kernel_without_tables(dtype, force_triton):
    B, H, q_grid, k_grid, has_cls, D = CASES["2d_5x7_over_3x4_cls"]
    case = (B, H, q_grid, k_grid, has_cls, D)
    tensors = make_inputs(case, dtype)[:3]
    dout = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    no_tables = (B, H, (), (), has_cls, D)  # grad_names: out, dq, dk, dv

    def kernel(q, k, v, tables, *_):
        return relpos_attention(q, k, v, [], q_grid, k_grid, has_cls, D**-0.5)

    got = forward_backward(kernel, tensors, no_tables, dout)
    check_against_fp64(no_tables, got, tensors, dout, dtype, ref=_sdpa_plus_q)
    assert dispatch.last_refusal(OP_NAME) == []


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
def test_non_contiguous_inputs(dtype, force_triton):
    """q, k, v as head-transposed views (as after a qkv projection), a transposed table,
    and an expanded (stride-0) output gradient."""
    B, H, q_grid, k_grid, _, D = case = CASES["2d_5x7_over_3x4_cls"]
    Nq, Nk = 1 + math.prod(q_grid), 1 + math.prod(k_grid)
    g = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q = rand(B, Nq, H, D).transpose(1, 2).requires_grad_()
    k = rand(B, Nk, H, 2 * D)[..., ::2].transpose(1, 2).requires_grad_()
    v = rand(B, Nk, H, D).transpose(1, 2).requires_grad_()
    t0 = rand(D, 2 * 5 - 1).t().requires_grad_()
    t1 = rand(2 * 7 - 1, D).requires_grad_()
    tensors = [q, k, v, t0, t1]
    assert not any(t.is_contiguous() for t in (q, k, v, t0))
    dout = torch.ones(1, device=DEVICE, dtype=dtype).expand(B, H, Nq, D)
    got = forward_backward(relpos_attention, tensors, case, dout)
    check_against_fp64(case, got, tensors, dout, dtype)
    assert dispatch.last_refusal(OP_NAME) == []


@pytest.mark.parametrize(
    "case",
    [(1, 2, (2, 3), (1, 2), True, 4), (1, 1, (2, 1, 2), (1, 1, 2), False, 3)],
    ids=["2d_cls", "3d"],
)
@interpreter_only
def test_gradcheck_fp64(case, force_triton):
    tensors = make_inputs(case, torch.float64)
    assert torch.autograd.gradcheck(
        lambda *ts: call(relpos_attention, list(ts), case), tensors, fast_mode=True
    )


class _TableLaunchSpy:
    """Stands in for _relq._relq_table_kernel: records each launch's (grid, G, rows per chunk,
    BLOCK_R) and runs the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # positional: DREL, Q, DR, 4 strides, H, BH, NQS, D, QA, KA, INNER, G, blocks_per_chunk
            block_r = kwargs["BLOCK_R"]
            self.seen.append((grid, args[14], args[15] * block_r, block_r))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("programs", [528, 12, 1], ids=["p528", "p12", "p1"])
@pytest.mark.parametrize(
    "case",
    [(2, 3, (4, 10), (3, 5), True, 16), (2, 3, (3, 20), (2, 20), False, 48)],
    ids=["2d_4x10_over_3x5_cls", "2d_3x20_over_2x20_head_dim_32+16"],
)
@interpreter_only
def test_table_gradient_chunks_split_bh_pairs(case, programs, monkeypatch, force_triton):
    """The table gradient's chunks are runs of the flattened (b, h, row) pairs that start and
    end inside a (b, h) pair (G = 10, 4, 20 or 3 rows a pair, the interpreter's BLOCK_R 16):
    with the target of programs lowered (12: chunks of two row blocks; 1: one chunk, the
    whole range in one program's loop) or as on the GPU (528: one block a chunk), the table
    gradients match float64 autograd through the reference."""
    from mmt_fast.kernels import _relq

    spy = _TableLaunchSpy(_relq._relq_table_kernel)
    monkeypatch.setattr(_relq, "_relq_table_kernel", spy)
    monkeypatch.setattr(_relq, "_TABLE_PROGRAMS", programs)
    B, H = case[:2]
    tensors = make_inputs(case, torch.float64)
    dout = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(4),
                       dtype=torch.float64)  # fmt: skip
    got = forward_backward(relpos_attention, tensors, case, dout)
    ref = forward_backward(relpos_attention_ref, tensors, case, dout)
    assert dispatch.last_refusal(OP_NAME) == []
    for label, g, r in zip(grad_names(case), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=label)
    assert len(spy.seen) == len(case[2])
    split = False
    for grid, G, rows, block_r in spy.seen:
        chunks = grid[1]
        assert rows % block_r == 0 and (chunks - 1) * rows < B * H * G <= chunks * rows
        assert chunks <= -(-B * H * G // block_r)
        if programs == 1:
            assert chunks == 1
        split |= chunks > 1 and rows % G != 0
    if programs > 1:
        assert split, spy.seen  # some chunk starts inside a (b, h) pair
    if programs == 12:
        assert any(rows > block_r for _, _, rows, block_r in spy.seen), spy.seen


# ----------------------------------------------------------------------------- custom op


def test_fake_tensor_mat_stage1_saves_no_attention_matrix(force_triton):
    """MAT stage 1 shapes under FakeTensorMode: right shapes, and what autograd saves
    is O(N D), never (Nq, Nk)."""
    case = (2, 1, (32, 256), (16, 128), True, 96)
    Nq, Nk = 1 + 32 * 256, 1 + 16 * 128
    saved = []
    with FakeTensorMode():
        tensors = make_inputs(case, KERNEL_DTYPE)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
        ):
            out = call(relpos_attention, tensors, case)
        out.sum().backward()
        assert out.shape == (2, 1, Nq, 96)
        assert [tuple(t.grad.shape) for t in tensors] == [tuple(t.shape) for t in tensors]
    qkv_out_lse = [(2, 1, Nq, 96), (2, 1, Nk, 96), (2, 1, Nk, 96), (2, 1, Nq, 96), (2, 1, Nq)]
    # the packed relq is rebuilt by the backward, not saved
    assert sorted(saved) == sorted([*qkv_out_lse, (63, 96), (511, 96)])


def test_opcheck(force_triton):
    case = CASES["3d_2x3x3_over_1x2x2_cls"]
    q, k, v, *tables = make_inputs(case, KERNEL_DTYPE)
    _, _, q_grid, k_grid, has_cls, D = case
    torch.library.opcheck(
        torch.ops.mmt_fast.relpos_attention_fwd.default,
        (q, k, v, tables, list(q_grid), list(k_grid), has_cls, D**-0.5, True, False),
    )


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=fp32_attention), torch.float16],
    ids=["fp32", "fp16"],
)
def test_torch_compile_fullgraph(dtype, force_triton):
    case = CASES["3d_2x3x3_over_1x2x2_cls"]
    tensors = make_inputs(case, dtype)
    compiled = torch.compile(
        lambda *ts: call(relpos_attention, list(ts), case), backend="aot_eager", fullgraph=True
    )
    out = compiled(*tensors)
    dout = torch.ones_like(out)
    got = [out.detach(), *torch.autograd.grad(out, tensors, dout)]
    check_against_fp64(case, got, tensors, dout, dtype)


# ----------------------------------------------------------------------------- guards, dispatch


def _with(index, value):
    def edit(tensors, case):
        tensors = list(tensors)
        tensors[index] = value(tensors[index]) if callable(value) else value
        return tensors, case

    return edit


def _grids(q_grid, k_grid):
    return lambda tensors, case: (tensors, (*case[:2], q_grid, k_grid, *case[4:]))


BAD_INPUTS = {
    "q_3d": (_with(0, lambda t: t[0]), ValueError, "q must be a 4-D tensor"),
    "v_shape": (_with(2, lambda t: t[:, :, :-1]), ValueError, "k and v shapes differ"),
    "head_dim": (_with(0, lambda t: t[..., :-1]), ValueError, "head dim D"),
    "heads": (_with(0, lambda t: t[:, :1]), ValueError, "batch, heads"),
    "grid_rank": (_grids((5, 7), (12,)), ValueError, "same rank, 1, 2 or 3"),
    "grid_rank_4": (_grids((5, 7, 1, 1), (3, 4, 1, 1)), ValueError, "same rank, 1, 2 or 3"),
    "nq": (_grids((5, 6), (3, 4)), ValueError, r"q has Nq=36 tokens .* give 31"),
    "nk": (_grids((5, 7), (4, 4)), ValueError, r"k has Nk=13 tokens .* give 17"),
    "table_count": (
        lambda tensors, case: (tensors[:4], case),
        ValueError,
        "1 rel-pos tables for a 2-D grid",
    ),
    "table_length": (
        _with(4, lambda t: t[:-1]),
        ValueError,
        r"rel_tables\[1\] must have shape .* = \(13, 24\), got \(12, 24\)",
    ),
    "table_dim": (_with(3, lambda t: t[:, :-1]), ValueError, r"rel_tables\[0\] must have shape"),
    "k_dtype": (_with(1, lambda t: t.double()), TypeError, "k has dtype torch.float64"),
    "table_dtype": (_with(4, lambda t: t.half()), TypeError, r"rel_tables\[1\] has dtype"),
    "int_q": (
        lambda tensors, case: ([t.long() for t in tensors], case),
        TypeError,
        "floating-point",
    ),
    "device": (_with(2, lambda t: t.to("meta")), ValueError, "v is on meta but q is on"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_guards(name, force_triton):
    edit, error, match = BAD_INPUTS[name]
    case = CASES["2d_5x7_over_3x4_cls"]
    tensors, bad_case = edit(
        [t.detach() for t in make_inputs(case, torch.float32, requires_grad=False)], case
    )
    with pytest.raises(error, match=match):
        call(relpos_attention, tensors, bad_case)


@pytest.mark.parametrize(
    "dtype, device, D, reason",
    [
        (torch.float32, "meta", 16, "meta tensors"),
        pytest.param(
            torch.bfloat16,
            "cpu",
            16,
            "dtype torch.bfloat16 is not supported under the Triton",
            marks=interpreter_only,
        ),
        (torch.float32, "cpu", 272, "head dim 272 > 256"),
    ],
    ids=["meta", "bf16_interpreted", "head_dim"],
)
def test_forced_triton_refuses(dtype, device, D, reason, force_triton):
    case = (1, 1, (2, 2), (1, 2), True, D)
    tensors = make_inputs(case, dtype, device=device, requires_grad=False)
    with pytest.raises(dispatch.KernelUnsupportedError, match=reason):
        call(relpos_attention, tensors, case)
    assert any(reason in r for r in dispatch.last_refusal(OP_NAME))


def test_auto_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = CASES["2d_1x13"]
    tensors = make_inputs(case, torch.float32, requires_grad=False, device="cpu")
    torch.testing.assert_close(
        call(relpos_attention, tensors, case), call(relpos_attention_ref, tensors, case)
    )
    assert any("not CUDA" in r for r in dispatch.last_refusal(OP_NAME))


def test_reference_mode(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    case = CASES["2d_1x13"]
    tensors = make_inputs(case, torch.float32, requires_grad=False, device="cpu")
    call(relpos_attention, tensors, case)
    assert dispatch.last_refusal(OP_NAME) == [f"{dispatch.ENV_VAR}=reference"]


# ----------------------------------------------------------------------------- GPU


GPU_CASES = {
    # MAT stage 1 at batch 2: 32x256 queries over 16x128 pooled keys, D = 96.
    "mat_stage1": (2, 1, (32, 256), (16, 128), True, 96),
    # A later MAT stage: 8 heads, keys finer than queries along time.
    "mat_stage3": (4, 8, (8, 32), (8, 64), True, 96),
    "video": (2, 2, (4, 14, 14), (4, 7, 7), True, 96),
    # A key row of 100 (> 64, not a multiple of BLOCK_N): the gather fallback.
    "gather_fallback": (2, 2, (8, 100), (8, 100), True, 96),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_matches_fp64(name, dtype, force_triton):
    case = GPU_CASES[name]
    tensors = make_inputs(case, dtype, device="cuda")
    tensors64 = [t.detach().double().requires_grad_() for t in tensors]
    dout = torch.randn(tensors[0].shape, device="cuda")
    got = forward_backward(relpos_attention, tensors, case, dout)
    ref_low = forward_backward(relpos_attention_ref, tensors, case, dout)
    ref64 = forward_backward(relpos_attention_ref, tensors64, case, dout.double())
    term_scale = max(t.abs().max().item() for t in ref64[1:])
    for label, g, lo, hi in zip(grad_names(case), got, ref_low, ref64):
        assert_flash_rule(label, g, lo, hi, dtype, term_scale if label != "out" else 0.0)


@pytest.mark.gpu
def test_gpu_fp32_takes_the_reference_with_a_reason(monkeypatch):
    """fp32 attention on CUDA is refused by the kernel (it spilled and compiled for minutes):
    forced, the error says why; in auto mode the reference runs and last_refusal says why."""
    case = GPU_CASES["mat_stage3"]
    tensors = make_inputs(case, torch.float32, device="cuda", requires_grad=False)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(dispatch.KernelUnsupportedError, match="float32"):
        call(relpos_attention, tensors, case)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    out = call(relpos_attention, tensors, case)
    torch.testing.assert_close(out, call(relpos_attention_ref, tensors, case))
    assert any("float32" in r for r in dispatch.last_refusal(OP_NAME))


@pytest.mark.gpu
def test_gpu_memory_has_no_attention_matrix(force_triton):
    case = GPU_CASES["mat_stage1"]
    B, H = case[:2]
    tensors = make_inputs(case, torch.bfloat16, device="cuda")
    Nq, Nk = tensors[0].shape[2], tensors[1].shape[2]
    dout = torch.randn_like(tensors[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(relpos_attention, tensors, case, dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < B * H * Nq * Nk * 2 / 4, f"peak extra memory {extra / 2**20:.1f} MiB"
