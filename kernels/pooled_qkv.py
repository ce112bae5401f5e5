"""Pooled Q/K/V projection of MViTv2's multiscale attention (mode "conv").

Formula (timm ``mvitv2.py``, ``MultiScaleAttention`` with ``mode="conv"``)::

    qkv = x @ W^T + b                                   x: (B, N, C_in), W: (3*C_out, C_in)
    view qkv as (B, N, 3, H, D), D = C_out // H; for t in (q, k, v), as (B, H, N, D):
        cls, s = t[:, :, :has_cls], t[:, :, has_cls:]          s reshaped to (B*H, D, *grid)
        s = depthwise_conv(s, w_t, stride_t, padding=kernel//2)  w_t: (D, 1, *kernel), no bias,
                                                                 the same weight for every head
        t = LayerNorm_D(cat([cls, s]), gamma_t, beta_t, eps)    (B, H, has_cls + prod(grid_t), D)

with ``stride_t = stride_q`` for q and ``stride_kv`` for k and v, N =
has_cls + prod(grid), tokens flattened row-major after the CLS token, grid of
2 (audio (F, T)) or 3 (video (T, H, W)) axes, and pooled size per axis
``(n + 2 * (k // 2) - k) // s + 1``.

Passes over memory (Triton path):

* forward: the linear projection stays a cuBLAS matmul (compute-bound, tensor
  cores; nothing to gain by fusing it). One Triton kernel then reads the
  (B, N, 3, H, D) projection once and writes the pooled, LayerNormed q, k, v
  directly in (B, H, N', D) layout: depthwise conv, layout change, CLS
  pass-through and LayerNorm are fused, no intermediate tensor. It is launched
  once per tensor (q, k, v), each launch reading its own third of the
  projection, so the projection is still read once in total and each launch
  gets its pooling geometry as compile-time constants.
* backward (per tensor): kernel 1 recomputes the conv output and its
  LayerNorm statistics from the projection and writes dL/d(conv output) in
  fp32, plus per-program partial sums of d(gamma), d(beta); kernel 2 gathers
  dL/d(projection) as the transposed depthwise conv (CLS gradient passed
  through) and, from the same loads, per-program partial sums of d(conv
  weight). The partial sums are a deterministic two-stage reduction finished
  by a ``sum`` over programs (no atomics). dx, dW, db of the linear then come
  from autograd's matmuls.

Saved for backward: the projection (B, N, 3*C_out) and the parameters; no
activation-sized statistics.

File layout follows flash-attention's ``ops/triton/layer_norm.py``: kernels,
launchers, :func:`pooled_qkv_ref`, the autograd formula (``register_autograd``), ``torch.library``
ops ``mmt_fast::pooled_qkv_fwd`` / ``_bwd`` with fake implementations, and
the public entry point :func:`pooled_qkv`. The LayerNorm backward follows the
Triton tutorial ``05-layer-norm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import dispatch, tuning
from ._common import aligned, tl_acc_dtype
from ._triton import tl, triton

OP_NAME = "pooled_qkv"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 1024
_MAX_TAPS = 125


# --------------------------------------------------------------------------- reference


def _pool_norm_ref(qkv, weights, norms, grid, has_cls, num_heads, strides, eps):
    """PyTorch pool + LayerNorm of a (B, N, 3*C) projection (as in timm's mvitv2.py)."""
    B, N, C3 = qkv.shape
    D = C3 // 3 // num_heads
    compute = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    conv = F.conv2d if len(grid) == 2 else F.conv3d
    outs = []
    for z, t in enumerate(qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)):
        w = weights[z]
        cls, sp = t[:, :, : int(has_cls)], t[:, :, int(has_cls) :]
        sp = sp.reshape(B * num_heads, *grid, D).movedim(-1, 1)
        sp = conv(
            sp,
            w.to(qkv.dtype),
            stride=tuple(strides[0 if z == 0 else 1]),
            padding=tuple(k // 2 for k in w.shape[2:]),
            groups=D,
        )
        sp = sp.reshape(B, num_heads, D, -1).transpose(2, 3)
        t = torch.cat([cls, sp], dim=2)
        gamma, beta = norms[z]
        t = F.layer_norm(t.to(compute), (D,), gamma.to(compute), beta.to(compute), eps)
        outs.append(t.to(qkv.dtype).contiguous())
    return tuple(outs)


def pooled_qkv_ref(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    grid: Sequence[int],
    has_cls: bool,
    num_heads: int,
    pool_weights: Sequence[torch.Tensor],
    strides: Sequence[Sequence[int]],
    norm_weights: Sequence[Sequence[torch.Tensor]],
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """PyTorch reference of :func:`pooled_qkv` (same signature and result)."""
    _check_inputs(x, qkv_weight, qkv_bias, grid, has_cls, num_heads, pool_weights, strides,
                   norm_weights)  # fmt: skip
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = _pool_norm_ref(qkv, pool_weights, norm_weights, tuple(grid), has_cls, num_heads,
                             strides, eps)  # fmt: skip
    return q, k, v, *_grids(grid, pool_weights, strides)


def _grids(grid, pool_weights, strides):
    q_grid = pooled_grid(grid, pool_weights[0].shape[2:], strides[0])
    k_grid = pooled_grid(grid, pool_weights[1].shape[2:], strides[1])
    return q_grid, k_grid


def _fwd_configs() -> list[triton.Config]:
    # Checked by the compile gate (sm_90, bf16/fp16, MAT and MViTv2-B shapes): no spills.
    # The first is the pinned one.
    entries = [({"BLOCK_N": 32}, 4, 3), ({"BLOCK_N": 64}, 4, 3), ({"BLOCK_N": 128}, 8, 3)]
    return tuning.configs(OP_NAME, "_pool_ln_fwd_kernel", entries, ({"BLOCK_N": 32}, 4, 1))


# 8 warps: with 4, the input-gradient kernel spilled 8-12 B at D = 96 (compile gate).
_BWD_WARPS = 8


def _bwd_block_n() -> int:
    # Fixed (not autotuned): the partial-sum buffers are sized by the number of programs.
    return 32 if dispatch.interpreting() else 64


# --------------------------------------------------------------------------- kernels
#
# Geometry is always 3-D: a 2-D grid (F, T) runs as (1, F, T) with kernel
# (1, kF, kT) and stride (1, sF, sT). Kernel sizes and strides are compile-time
# constants; the tap loops run at run time (unrolling them spills); padding is K // 2.


@triton.jit
def _pool_tile(
    x_base,
    W,
    rows,
    mask_rows,
    offs_d,
    mask_d,
    stride_xn,
    stride_xd,
    G0,
    G1,
    G2,
    O1,
    O2,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Conv output c (BLOCK_N, BLOCK_D) for output rows ``rows``; the CLS row is passed through.

    Input rows in the zero padding, CLS rows and rows past the end contribute 0.
    """
    sp = rows - HAS_CLS
    is_sp = (sp >= 0) & mask_rows
    o2 = sp % O2
    o1 = (sp // O2) % O1
    o0 = sp // (O2 * O1)
    x_d = x_base + offs_d[None, :] * stride_xd
    w_d = W + offs_d * (K0 * K1 * K2)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    # A runtime loop over the taps (not unrolled): an unrolled 3x3x3 loop keeps 27 tiles in
    # flight, which spilled up to 20 KB per thread and took minutes to compile for sm_90.
    for tap in range(K0 * K1 * K2):
        t0 = tap // (K1 * K2)
        t1 = (tap // K2) % K1
        t2 = tap % K2
        i0 = o0 * S0 + (t0 - K0 // 2)
        i1 = o1 * S1 + (t1 - K1 // 2)
        i2 = o2 * S2 + (t2 - K2 // 2)
        ok = is_sp & (i0 >= 0) & (i0 < G0) & (i1 >= 0) & (i1 < G1) & (i2 >= 0) & (i2 < G2)
        tok = (i0 * G1 + i1) * G2 + i2 + HAS_CLS
        x = tl.load(x_d + tok[:, None] * stride_xn, mask=ok[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_d + tap, mask=mask_d, other=0.0)
        acc += x.to(ACC_DTYPE) * w.to(ACC_DTYPE)[None, :]
    if HAS_CLS:
        is_cls = (rows == 0) & mask_rows
        cls = tl.load(x_d + rows[:, None] * 0, mask=is_cls[:, None] & mask_d[None, :], other=0.0)
        acc += cls.to(ACC_DTYPE)
    return acc


@triton.jit
def _ln_stats(c, mask_d, head_dim, eps):
    """Centred input (zero in padded columns) and 1 / std of each row of c."""
    mean = tl.sum(c, 1) / head_dim
    xc = tl.where(mask_d[None, :], c - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / head_dim
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc, rstd


@triton.autotune(configs=_fwd_configs(), key=["N_OUT", "HEAD_DIM", "BH"])
@triton.jit
def _pool_ln_fwd_kernel(
    X,
    W,
    GAMMA,
    BETA,
    Y,
    stride_xb,
    stride_xn,
    stride_xh,
    stride_xd,
    H,
    BH,
    N_OUT,
    G0,
    G1,
    G2,
    O1,
    O2,
    HEAD_DIM,
    eps,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Y[b, h, rows] = LayerNorm(depthwise_conv(X[b, :, h])[rows]) for one row block."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    x_base = X + b * stride_xb + h * stride_xh
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_rows = rows < N_OUT
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    c = _pool_tile(
        x_base, W, rows, mask_rows, offs_d, mask_d, stride_xn, stride_xd, G0, G1, G2, O1, O2,
        HAS_CLS, K0, K1, K2, S0, S1, S2, ACC_DTYPE, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    xc, rstd = _ln_stats(c, mask_d, HEAD_DIM, eps)
    gamma = tl.load(GAMMA + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    beta = tl.load(BETA + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    y = xc * rstd[:, None] * gamma[None, :] + beta[None, :]
    y_off = bh * N_OUT * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(Y + y_off, y.to(Y.dtype.element_ty), mask=mask_rows[:, None] & mask_d[None, :])


@triton.jit
def _pool_ln_bwd_norm_kernel(
    X,
    W,
    GAMMA,
    DY,
    DC,
    DG_PART,
    DB_PART,
    stride_xb,
    stride_xn,
    stride_xh,
    stride_xd,
    H,
    N_OUT,
    G0,
    G1,
    G2,
    O1,
    O2,
    HEAD_DIM,
    eps,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """LayerNorm backward on the recomputed conv output c, for one row block.

    DC[b, h, rows] = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat)), g = dy * gamma,
    and this program's partial sums over its rows of dy * xhat (dgamma) and dy (dbeta).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    part = bh * tl.num_programs(0) + pid
    b = bh // H
    h = bh % H
    x_base = X + b * stride_xb + h * stride_xh
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_rows = rows < N_OUT
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    io_mask = mask_rows[:, None] & mask_d[None, :]
    c = _pool_tile(
        x_base, W, rows, mask_rows, offs_d, mask_d, stride_xn, stride_xd, G0, G1, G2, O1, O2,
        HAS_CLS, K0, K1, K2, S0, S1, S2, ACC_DTYPE, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    xc, rstd = _ln_stats(c, mask_d, HEAD_DIM, eps)
    xhat = xc * rstd[:, None]
    y_off = bh * N_OUT * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :]
    dy = tl.load(DY + y_off, mask=io_mask, other=0.0).to(ACC_DTYPE)
    gamma = tl.load(GAMMA + offs_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
    tl.store(DG_PART + part * HEAD_DIM + offs_d, tl.sum(dy * xhat, 0), mask=mask_d)
    tl.store(DB_PART + part * HEAD_DIM + offs_d, tl.sum(dy, 0), mask=mask_d)
    g = dy * gamma[None, :]
    mean_g = tl.sum(g, 1) / HEAD_DIM
    mean_gx = tl.sum(g * xhat, 1) / HEAD_DIM
    dc = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
    tl.store(DC + y_off, dc, mask=io_mask)


@triton.jit
def _pool_bwd_input_kernel(
    X,
    DC,
    W,
    DX,
    DW_PART,
    stride_xb,
    stride_xn,
    stride_xh,
    stride_xd,
    stride_dxb,
    stride_dxn,
    stride_dxh,
    stride_dxd,
    H,
    N_IN,
    N_OUT,
    G1,
    G2,
    O0,
    O1,
    O2,
    HEAD_DIM,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    S0: tl.constexpr,
    S1: tl.constexpr,
    S2: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Transposed depthwise conv of DC, gathered per input row block, and d(conv weight).

    Input position i receives from output position o through tap t when
    o * S - K // 2 + t = i, i.e. o = (i + K // 2 - t) / S when that is an integer in [0, O).
    DX[b, rows, h] = sum_t DC[o(rows, t)] * w[:, t] (+ DC[CLS] on the CLS row), and
    DW_PART[program, t] = sum_rows X[rows] * DC[o(rows, t)] (CLS rows excluded).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    part = bh * tl.num_programs(0) + pid
    b = bh // H
    h = bh % H
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_rows = rows < N_IN
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    sp = rows - HAS_CLS
    is_sp = (sp >= 0) & mask_rows
    i2 = sp % G2
    i1 = (sp // G2) % G1
    i0 = sp // (G2 * G1)
    x = tl.load(
        X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
        mask=is_sp[:, None] & mask_d[None, :],
        other=0.0,
    ).to(ACC_DTYPE)
    dc_d = DC + bh * N_OUT * HEAD_DIM + offs_d[None, :]
    w_d = W + offs_d * (K0 * K1 * K2)
    dw_d = DW_PART + part * (K0 * K1 * K2) * HEAD_DIM + offs_d
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    for tap in range(K0 * K1 * K2):  # a runtime loop, as in _pool_tile
        t0 = tap // (K1 * K2)
        t1 = (tap // K2) % K1
        t2 = tap % K2
        n0 = i0 + (K0 // 2 - t0)
        n1 = i1 + (K1 // 2 - t1)
        n2 = i2 + (K2 // 2 - t2)
        o0 = n0 // S0
        o1 = n1 // S1
        o2 = n2 // S2
        ok = is_sp & (n0 >= 0) & (n0 == o0 * S0) & (o0 < O0)
        ok = ok & (n1 >= 0) & (n1 == o1 * S1) & (o1 < O1)
        ok = ok & (n2 >= 0) & (n2 == o2 * S2) & (o2 < O2)
        tok = (o0 * O1 + o1) * O2 + o2 + HAS_CLS
        dc = tl.load(dc_d + tok[:, None] * HEAD_DIM, mask=ok[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_d + tap, mask=mask_d, other=0.0).to(ACC_DTYPE)
        acc += dc * w[None, :]
        tl.store(dw_d + tap * HEAD_DIM, tl.sum(dc * x, 0), mask=mask_d)
    if HAS_CLS:
        is_cls = (rows == 0) & mask_rows
        acc += tl.load(dc_d + rows[:, None] * 0, mask=is_cls[:, None] & mask_d[None, :], other=0.0)
    dx_ptr = DX + b * stride_dxb + h * stride_dxh + rows[:, None] * stride_dxn
    tl.store(
        dx_ptr + offs_d[None, :] * stride_dxd,
        acc.to(DX.dtype.element_ty),
        mask=mask_rows[:, None] & mask_d[None, :],
    )


# --------------------------------------------------------------------------- geometry


def pooled_grid(
    grid: Sequence[int], kernel: Sequence[int], stride: Sequence[int]
) -> tuple[int, ...]:
    """Pooled grid size per axis: ``(n + 2 * (k // 2) - k) // s + 1``."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(grid, kernel, stride))


def _pad3(values: Sequence[int]) -> tuple[int, int, int]:
    return (1,) * (3 - len(values)) + tuple(int(v) for v in values)


def _geometry(grid, kernel, stride):
    """Grid, kernel, stride and pooled grid, padded to 3 axes with leading 1s."""
    g3, k3, s3 = _pad3(grid), _pad3(kernel), _pad3(stride)
    return g3, k3, s3, pooled_grid(g3, k3, s3)


def _constexprs(has_cls, k3, s3, dtype, head_dim):
    return dict(
        HAS_CLS=bool(has_cls), K0=k3[0], K1=k3[1], K2=k3[2], S0=s3[0], S1=s3[1], S2=s3[2],
        ACC_DTYPE=tl_acc_dtype(dtype), BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


# --------------------------------------------------------------------------- launchers


def _launch_fwd(qkv, weights, norms, grid, has_cls, num_heads, strides, eps):
    B, _, C3 = qkv.shape
    C = C3 // 3
    H = num_heads
    D = C // H
    x_strides = (qkv.stride(0), qkv.stride(1), D * qkv.stride(2), qkv.stride(2))
    outs = []
    for z in range(3):
        w = weights[z].contiguous()
        gamma, beta = (t.contiguous() for t in norms[z])
        g3, k3, s3, o3 = _geometry(grid, w.shape[2:], strides[0 if z == 0 else 1])
        n_out = int(has_cls) + math.prod(o3)
        y = torch.empty(B, H, n_out, D, device=qkv.device, dtype=qkv.dtype)

        def grid_fn(meta, n_out=n_out):
            return (triton.cdiv(n_out, meta["BLOCK_N"]), B * H)

        _pool_ln_fwd_kernel[grid_fn](
            qkv.narrow(2, z * C, C), w, gamma, beta, y, *x_strides,
            H, B * H, n_out, g3[0], g3[1], g3[2], o3[1], o3[2], D, eps,
            **_constexprs(has_cls, k3, s3, qkv.dtype, D),
        )  # fmt: skip
        outs.append(y)
    return tuple(outs)


def _launch_bwd(qkv, weights, norms, grads, grid, has_cls, num_heads, strides, eps):
    B, N, C3 = qkv.shape
    C = C3 // 3
    H = num_heads
    D = C // H
    block_n = _bwd_block_n()
    acc_torch = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    empty = dict(device=qkv.device, dtype=acc_torch)
    x_strides = (qkv.stride(0), qkv.stride(1), D * qkv.stride(2), qkv.stride(2))
    d_qkv = torch.empty(B, N, C3, device=qkv.device, dtype=qkv.dtype)
    dx_strides = (d_qkv.stride(0), d_qkv.stride(1), D * d_qkv.stride(2), d_qkv.stride(2))
    n_in_blocks = triton.cdiv(N, block_n)
    d_weights, d_norms = [], []
    for z in range(3):
        w = weights[z].contiguous()
        gamma, beta = norms[z]
        g3, k3, s3, o3 = _geometry(grid, w.shape[2:], strides[0 if z == 0 else 1])
        n_out = int(has_cls) + math.prod(o3)
        n_out_blocks = triton.cdiv(n_out, block_n)
        consts = _constexprs(has_cls, k3, s3, qkv.dtype, D)
        x = qkv.narrow(2, z * C, C)
        dc = torch.empty(B, H, n_out, D, **empty)
        dg_part = torch.empty(B * H * n_out_blocks, D, **empty)
        db_part = torch.empty(B * H * n_out_blocks, D, **empty)
        dw_part = torch.empty(B * H * n_in_blocks, math.prod(k3), D, **empty)
        _pool_ln_bwd_norm_kernel[(n_out_blocks, B * H)](
            x, w, gamma.contiguous(), grads[z].contiguous(), dc, dg_part, db_part, *x_strides,
            H, n_out, g3[0], g3[1], g3[2], o3[1], o3[2], D, eps, BLOCK_N=block_n, **consts, num_warps=_BWD_WARPS,
        )  # fmt: skip
        _pool_bwd_input_kernel[(n_in_blocks, B * H)](
            x, dc, w, d_qkv.narrow(2, z * C, C), dw_part, *x_strides, *dx_strides,
            H, N, n_out, g3[1], g3[2], o3[0], o3[1], o3[2], D, BLOCK_N=block_n, **consts,
            num_warps=_BWD_WARPS,
        )  # fmt: skip
        d_weights.append(dw_part.sum(0).t().reshape(weights[z].shape).to(weights[z].dtype))
        d_norms.append((dg_part.sum(0).to(gamma.dtype), db_part.sum(0).to(beta.dtype)))
    return d_qkv, d_weights, d_norms


def _out_shapes(qkv_shape, weight_shapes, grid, has_cls, num_heads, stride_q, stride_kv):
    B, _, C3 = qkv_shape
    D = C3 // 3 // num_heads
    shapes = []
    for z in range(3):
        o = pooled_grid(grid, weight_shapes[z][2:], stride_q if z == 0 else stride_kv)
        shapes.append((B, num_heads, int(has_cls) + math.prod(o), D))
    return shapes


@torch.library.custom_op("mmt_fast::pooled_qkv_fwd", mutates_args=())
def _fwd_op(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    gq: torch.Tensor,
    bq: torch.Tensor,
    gk: torch.Tensor,
    bk: torch.Tensor,
    gv: torch.Tensor,
    bv: torch.Tensor,
    grid: list[int],
    has_cls: bool,
    num_heads: int,
    stride_q: list[int],
    stride_kv: list[int],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton pool + LayerNorm of a (B, N, 3*C) projection -> q, k, v (B, H, N', D)."""
    return _launch_fwd(
        qkv, (wq, wk, wv), ((gq, bq), (gk, bk), (gv, bv)), grid, has_cls, num_heads,
        (stride_q, stride_kv), eps,
    )  # fmt: skip


@_fwd_op.register_fake
def _(qkv, wq, wk, wv, gq, bq, gk, bk, gv, bv, grid, has_cls, num_heads, stride_q, stride_kv,
      eps):  # fmt: skip
    shapes = _out_shapes(
        qkv.shape, (wq.shape, wk.shape, wv.shape), grid, has_cls, num_heads, stride_q, stride_kv
    )
    q, k, v = (qkv.new_empty(s) for s in shapes)
    return q, k, v


@torch.library.custom_op("mmt_fast::pooled_qkv_bwd", mutates_args=())
def _bwd_op(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    gq: torch.Tensor,
    bq: torch.Tensor,
    gk: torch.Tensor,
    bk: torch.Tensor,
    gv: torch.Tensor,
    bv: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    grid: list[int],
    has_cls: bool,
    num_heads: int,
    stride_q: list[int],
    stride_kv: list[int],
    eps: float,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Triton backward: (d_qkv, dwq, dwk, dwv, dgq, dbq, dgk, dbk, dgv, dbv)."""
    d_qkv, dws, dns = _launch_bwd(
        qkv, (wq, wk, wv), ((gq, bq), (gk, bk), (gv, bv)), (dq, dk, dv), grid, has_cls,
        num_heads, (stride_q, stride_kv), eps,
    )  # fmt: skip
    return (d_qkv, *dws, *dns[0], *dns[1], *dns[2])


@_bwd_op.register_fake
def _(qkv, wq, wk, wv, gq, bq, gk, bk, gv, bv, dq, dk, dv, grid, has_cls, num_heads, stride_q,
      stride_kv, eps):  # fmt: skip
    params = (wq, wk, wv, gq, bq, gk, bk, gv, bv)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (qkv, *params))


def _setup_context(ctx, inputs, output):
    qkv, wq, wk, wv, gq, bq, gk, bk, gv, bv, grid, has_cls, num_heads, stride_q, stride_kv, eps = (
        inputs
    )
    ctx.save_for_backward(qkv, wq, wk, wv, gq, bq, gk, bk, gv, bv)
    ctx.config = (grid, has_cls, num_heads, stride_q, stride_kv, eps)
    ctx.out_shapes = tuple(o.shape for o in output)


def _backward(ctx, dq, dk, dv):
    saved = ctx.saved_tensors
    qkv = saved[0]
    dq, dk, dv = (
        g if g is not None else qkv.new_zeros(s) for g, s in zip((dq, dk, dv), ctx.out_shapes)
    )
    dq, dk, dv = aligned(dq), aligned(dk), aligned(dv)
    grads = torch.ops.mmt_fast.pooled_qkv_bwd(*saved, dq, dk, dv, *ctx.config)
    return (*grads, None, None, None, None, None, None)


# The autograd formula is registered on the custom op itself (not an
# autograd.Function around it), so tracers (torch.compile, fvcore's jit trace)
# see ``mmt_fast::pooled_qkv_fwd`` with its shapes and arguments.
_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point


def _check_inputs(x, qkv_weight, qkv_bias, grid, has_cls, num_heads, pool_weights, strides,
                  norm_weights) -> None:  # fmt: skip
    """Raise a clear error for inputs that are invalid for the op itself (any path)."""
    name = OP_NAME
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a (B, N, C_in) tensor, got {shape}")
    grid = tuple(grid)
    if len(grid) not in (2, 3) or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"{name}: grid must be 2 or 3 positive ints, got {grid}")
    _, N, C_in = x.shape
    if N != int(has_cls) + math.prod(grid):
        raise ValueError(
            f"{name}: x has N={N} tokens but has_cls={bool(has_cls)} + prod(grid={grid}) = "
            f"{int(has_cls) + math.prod(grid)}"
        )
    if qkv_weight.dim() != 2 or qkv_weight.shape[1] != C_in or qkv_weight.shape[0] % 3:
        raise ValueError(
            f"{name}: qkv_weight must be (3*C_out, C_in={C_in}), got {tuple(qkv_weight.shape)}"
        )
    C_out = qkv_weight.shape[0] // 3
    if int(num_heads) != num_heads or num_heads < 1 or C_out % num_heads:
        raise ValueError(f"{name}: C_out={C_out} is not divisible by num_heads={num_heads}")
    D = C_out // num_heads
    if qkv_bias is not None and tuple(qkv_bias.shape) != (3 * C_out,):
        raise ValueError(
            f"{name}: qkv_bias must have shape ({3 * C_out},), got {tuple(qkv_bias.shape)}"
        )
    if len(pool_weights) != 3 or len(norm_weights) != 3 or len(strides) != 2:
        raise ValueError(
            f"{name}: expected pool_weights=(wq, wk, wv), strides=(stride_q, stride_kv), "
            f"norm_weights=((gq, bq), (gk, bk), (gv, bv))"
        )
    for label, w in zip("qkv", pool_weights):
        if w.dim() != 2 + len(grid) or w.shape[0] != D or w.shape[1] != 1:
            raise ValueError(
                f"{name}: pool weight w{label} must be (D={D}, 1, *kernel) with "
                f"{len(grid)} kernel dims, got {tuple(w.shape)}"
            )
    for label, stride in zip(("stride_q", "stride_kv"), strides):
        stride = tuple(stride)
        if len(stride) != len(grid) or any(int(s) != s or s < 1 for s in stride):
            raise ValueError(
                f"{name}: {label} must be {len(grid)} positive ints (one per grid axis), "
                f"got {stride}"
            )
    for label, pair in zip("qkv", norm_weights):
        if len(pair) != 2 or any(p.shape != (D,) for p in pair):
            raise ValueError(
                f"{name}: norm weights (gamma_{label}, beta_{label}) must both have shape "
                f"({D},), got {[tuple(p.shape) for p in pair]}"
            )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: unsupported dtype {x.dtype}; expected one of "
            + ", ".join(map(str, _FLOAT_DTYPES))
        )
    linear = {"qkv_weight": qkv_weight, "qkv_bias": qkv_bias}
    # Under autocast F.linear casts x and the weights itself, so they may differ.
    autocast = torch.is_autocast_enabled(x.device.type)
    for label, t in linear.items():
        if t is not None and t.dtype != x.dtype and not autocast:
            raise TypeError(f"{name}: dtype mismatch: x is {x.dtype} but {label} is {t.dtype}")
    params = [*pool_weights, *(p for pair in norm_weights for p in pair)]
    for p in params:
        if p.dtype not in (x.dtype, torch.float32) and not autocast:
            raise TypeError(
                f"{name}: dtype mismatch: pool/norm parameters must be {x.dtype} or "
                f"torch.float32 (x is {x.dtype}), got {p.dtype}"
            )
    tensors = [x, qkv_weight, qkv_bias, *params]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: device mismatch: tensors on {sorted(map(str, devices))}")


def triton_reasons(
    dtype: torch.dtype,
    tensors: Sequence[torch.Tensor | None],
    pool_weights: Sequence[torch.Tensor],
    head_dim: int,
    batch_heads: int = 0,
) -> list[str]:
    """Why the Triton path cannot pool a projection of ``dtype`` with these (valid) inputs."""
    reasons = dispatch.device_reasons(tensors)
    if head_dim > _MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} > {_MAX_HEAD_DIM}")
    for label, w in zip("qkv", pool_weights):
        taps = math.prod(w.shape[2:])
        if taps > _MAX_TAPS:
            reasons.append(f"pool kernel w{label} has {taps} taps > {_MAX_TAPS} (unrolled)")
    reasons += dispatch.dtype_reasons(dtype, fp32_on_cuda=True)
    reasons += dispatch.grid_reasons("batch x heads", batch_heads)
    return reasons


def pooled_qkv(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    grid: Sequence[int],
    has_cls: bool,
    num_heads: int,
    pool_weights: Sequence[torch.Tensor],
    strides: Sequence[Sequence[int]],
    norm_weights: Sequence[Sequence[torch.Tensor]],
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """Pooled, LayerNormed q, k, v of MViTv2 multiscale attention (see the module docstring).

    Args:
        x: (B, N, C_in), N = int(has_cls) + prod(grid), tokens row-major after the CLS token.
        qkv_weight: (3*C_out, C_in); qkv_bias: (3*C_out,) or None.
        grid: token grid, 2 axes (F, T) or 3 axes (T, H, W).
        has_cls: whether token 0 is a CLS token (not pooled, but normalised).
        num_heads: H; D = C_out // H.
        pool_weights: (wq, wk, wv), each (D, 1, *kernel): depthwise, shared by all heads.
        strides: (stride_q, stride_kv), one int per grid axis each.
        norm_weights: ((gamma_q, beta_q), (gamma_k, beta_k), (gamma_v, beta_v)), each (D,).
        eps: LayerNorm epsilon.

    Returns:
        ``(q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, D), q_grid, k_grid)``, contiguous,
        Nq = has_cls + prod(q_grid), Nk = has_cls + prod(k_grid).

    The projection is ``F.linear`` (cuBLAS); the pooling + LayerNorm dispatches through
    :mod:`mmt_fast.kernels.dispatch` to the Triton kernels or the PyTorch reference.
    """
    _check_inputs(x, qkv_weight, qkv_bias, grid, has_cls, num_heads, pool_weights, strides,
                  norm_weights)  # fmt: skip
    grid = [int(g) for g in grid]
    stride_q, stride_kv = ([int(s) for s in st] for st in strides)
    has_cls, num_heads, eps = bool(has_cls), int(num_heads), float(eps)
    params = [*pool_weights, *(p for pair in norm_weights for p in pair)]
    head_dim = qkv_weight.shape[0] // 3 // num_heads
    qkv = F.linear(x, qkv_weight, qkv_bias)  # under autocast, qkv.dtype may differ from x's
    reasons = triton_reasons(qkv.dtype, [x, qkv_weight, qkv_bias, *params], pool_weights, head_dim,
                             qkv.shape[0] * num_heads)  # fmt: skip
    if dispatch.choose(OP_NAME, reasons):
        q, k, v = torch.ops.mmt_fast.pooled_qkv_fwd(
            qkv, *params, grid, has_cls, num_heads, stride_q, stride_kv, eps
        )
    else:
        q, k, v = _pool_norm_ref(qkv, pool_weights, norm_weights, tuple(grid), has_cls,
                                 num_heads, (stride_q, stride_kv), eps)  # fmt: skip
    return q, k, v, *_grids(grid, pool_weights, (stride_q, stride_kv))
