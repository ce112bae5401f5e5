"""Bottleneck attention: attention over the union of two token segments.

In an AVBottleneck block the sequence is ``[modality tokens (CLS + N), L
bottleneck tokens]``; the model projects each part separately, so this op gets
two segments and attends over their union without building the concatenated
copies::

    K = [k_main; k_extra],  V = [v_main; v_extra]            (along tokens, conceptually)
    out_main  = softmax(q_main  K^T * scale) V                 (B, H, Nm, D)
    out_extra = softmax(q_extra K^T * scale) V                 (B, H, L, D)

Shapes: ``q_main, k_main, v_main``: (B, H, Nm, D); ``q_extra, k_extra,
v_extra``: (B, H, L, D); Nm and L are independent.

The Triton path is flash-attention v2 (Triton tutorial ``06-fused-attention``;
Dao, "FlashAttention-2", 2023): one forward launch whose programs cover the
row blocks of the concatenated range [main; extra]; each program's key loop runs
over the concatenated keys too (a tile straddling the boundary reads each part from
its own tensor), with an online softmax in fp32, and saves the log-sum-exp. The
backward recomputes P from the log-sum-exp: one small launch for
delta = rowsum(dO * O), one for dK/dV (programs over the concatenated key blocks,
each looping over the concatenated queries), one for dQ.
No Nq x Nk tensor and no concatenated copy is allocated.

File layout follows flash-attention's ``ops/triton/layer_norm.py``: kernels,
launchers, :func:`bottleneck_attention_ref`, the autograd formula (``register_autograd``),
``torch.library`` ops ``mmt_fast::bottleneck_attention_fwd`` / ``_bwd`` with
fake implementations, and the public entry point :func:`bottleneck_attention`.
"""

from __future__ import annotations

import torch

from . import dispatch, tuning
from ._common import aligned, tl_acc_dtype
from ._triton import tl, triton

OP_NAME = "bottleneck_attention"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- reference


def bottleneck_attention_ref(
    q_main: torch.Tensor,
    k_main: torch.Tensor,
    v_main: torch.Tensor,
    q_extra: torch.Tensor,
    k_extra: torch.Tensor,
    v_extra: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference (builds the concatenated K/V and the full score matrix).

    Softmax is taken in fp32 (fp64 for fp64 inputs), like the kernel.
    """
    k = torch.cat([k_main, k_extra], dim=2)
    v = torch.cat([v_main, v_extra], dim=2)
    q = torch.cat([q_main, q_extra], dim=2)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    attn = torch.softmax((q @ k.transpose(-2, -1)).to(compute) * scale, dim=-1)
    out = attn.to(v.dtype) @ v
    return out[:, :, : q_main.shape[2]], out[:, :, q_main.shape[2] :]


def _configs(kernel: str) -> list[triton.Config]:
    # Each entry checked by the compile gate (sm_90, bf16/fp16, MMT's AVBottleneck shapes):
    # no spills, within shared memory, HGMMA matmuls. The first is the pinned one.
    entries = {
        "_fwd_kernel": [
            ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2),
            ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 2),
            ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3),
        ],
        "_bwd_dkdv_kernel": [
            ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 2),
            # 181 KiB above: too much for an A100 (163 KiB); spills 20 B on sm_90
            ({"BLOCK_M": 64, "BLOCK_N": 64}, 8, 2, "fallback"),
        ],
        "_bwd_dq_kernel": [
            ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2),
            ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 2),
            ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3),
        ],
    }[kernel]
    return tuning.configs(OP_NAME, kernel, entries, ({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 1))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: PyTorch's fp32 matmul does not.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# --------------------------------------------------------------------------- kernels
#
# Rows and keys are indexed in the *concatenated* range [0, N_MAIN + N_EXTRA): index i < N_MAIN
# is main-segment token i, index i >= N_MAIN is extra-segment token i - N_MAIN. A tile that
# straddles the boundary reads each part from its own tensor with two disjoint masked loads
# (their sum is exact), so a 257 + 4 token sequence is 5 tiles of 64, not 5 + 1 (and the same
# for the keys): no block is spent on the 4 bottleneck tokens alone.


@triton.jit
def _cat_load(PM, PE, base_m, base_e, idx, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM):
    """(len(idx), BLOCK_D) rows ``idx`` of [PM; PE] (0 past the end and in padded columns)."""
    in_m = idx < N_MAIN
    in_e = (idx >= N_MAIN) & (idx < N_MAIN + N_EXTRA)
    a = tl.load(PM + base_m + idx[:, None] * HEAD_DIM + offs_d[None, :],
                mask=in_m[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
    b = tl.load(PE + base_e + (idx - N_MAIN)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=in_e[:, None] & mask_d[None, :], other=0.0)  # fmt: skip
    return a + b


@triton.jit
def _cat_store(PM, PE, base_m, base_e, idx, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM, x):
    in_m = idx < N_MAIN
    in_e = (idx >= N_MAIN) & (idx < N_MAIN + N_EXTRA)
    tl.store(PM + base_m + idx[:, None] * HEAD_DIM + offs_d[None, :], x.to(PM.dtype.element_ty),
             mask=in_m[:, None] & mask_d[None, :])  # fmt: skip
    tl.store(PE + base_e + (idx - N_MAIN)[:, None] * HEAD_DIM + offs_d[None, :],
             x.to(PE.dtype.element_ty), mask=in_e[:, None] & mask_d[None, :])  # fmt: skip


@triton.autotune(
    configs=_configs("_fwd_kernel"),
    key=["N_MAIN", "N_EXTRA", "HEAD_DIM", "BH"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _fwd_kernel(
    QM, KM, VM, QE, KE, VE, OM, OE, LSE,
    qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, BH,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax over the concatenated keys for one concatenated row block.

    Scores are in log2 units (``qk_scale`` includes log2(e)) so exp2 is used.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    NT = N_MAIN + N_EXTRA
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = _cat_load(QM, QE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for start in range(0, NT, BLOCK_N):
        cols = start + offs_n
        k = _cat_load(KM, KE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC_DTYPE) * qk_scale
        s = tl.where((cols < NT)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _cat_load(VM, VE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    _cat_store(OM, OE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM, out)
    tl.store(LSE + bh * NT + rows, m_i + tl.log2(l_i), mask=rows < NT)  # log2 units


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    OM, OE, DOM, DOE, DELTA, N_MAIN, N_EXTRA, HEAD_DIM,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id for the concatenated rows."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _cat_load(OM, OE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    do = _cat_load(DOM, DOE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    NT = N_MAIN + N_EXTRA
    tl.store(DELTA + bh * NT + rows, tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1), mask=rows < NT)


@triton.jit
def _bwd_dkdv_segment(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    n_queries,
    head_dim,
    offs_d,
    mask_d,
    qk_scale,
    ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Accumulate dK, dV of one key block over every query of one segment."""
    offs_m = tl.arange(0, BLOCK_M)
    for start in range(0, n_queries, BLOCK_M):
        rows = start + offs_m
        mask_m = rows < n_queries
        io_off = rows[:, None] * head_dim + offs_d[None, :]
        io_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + io_off, mask=io_mask, other=0.0)
        do = tl.load(do_base + io_off, mask=io_mask, other=0.0)
        lse = tl.load(lse_base + rows, mask=mask_m, other=0.0)
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC_DTYPE) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION).to(ACC_DTYPE)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION).to(ACC_DTYPE)
    return dk, dv


@triton.autotune(
    configs=_configs("_bwd_dkdv_kernel"),
    key=["N_MAIN", "N_EXTRA", "HEAD_DIM", "BH"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _bwd_dkdv_kernel(
    QM, KM, VM, QE, KE, VE, DOM, DOE, LSE, DELTA, DKM, DVM, DKE, DVE,
    scale, qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, BH,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of one concatenated key block, looping over the queries of both segments."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    NT = N_MAIN + N_EXTRA
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _cat_load(KM, KE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    v = _cat_load(VM, VE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    # The queries segment by segment: one load per tile (two masked loads per q and dO tile
    # in this loop spilled and needed 241 KiB of shared memory at 128 x 64).
    dk, dv = _bwd_dkdv_segment(
        dk, dv, k, v, QM + base_m, DOM + base_m, LSE + bh * NT, DELTA + bh * NT,
        N_MAIN, HEAD_DIM, offs_d, mask_d, qk_scale, ACC_DTYPE, DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    dk, dv = _bwd_dkdv_segment(
        dk, dv, k, v, QE + base_e, DOE + base_e, LSE + bh * NT + N_MAIN,
        DELTA + bh * NT + N_MAIN, N_EXTRA, HEAD_DIM, offs_d, mask_d, qk_scale, ACC_DTYPE,
        DOT_PRECISION, BLOCK_M,
    )  # fmt: skip
    _cat_store(DKM, DKE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM,
               dk * scale)  # fmt: skip
    _cat_store(DVM, DVE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM, dv)


@triton.autotune(
    configs=_configs("_bwd_dq_kernel"),
    key=["N_MAIN", "N_EXTRA", "HEAD_DIM", "BH"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _bwd_dq_kernel(
    QM, KM, VM, QE, KE, VE, DOM, DOE, LSE, DELTA, DQM, DQE,
    scale, qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, BH,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of one concatenated query block, looping over every concatenated key block."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    NT = N_MAIN + N_EXTRA
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < NT
    offs_n = tl.arange(0, BLOCK_N)
    q = _cat_load(QM, QE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    do = _cat_load(DOM, DOE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    lse = tl.load(LSE + bh * NT + rows, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + bh * NT + rows, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    for start in range(0, NT, BLOCK_N):
        cols = start + offs_n
        k = _cat_load(KM, KE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
        v = _cat_load(VM, VE, base_m, base_e, cols, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(ACC_DTYPE) * qk_scale
        p = tl.where((cols < NT)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION).to(ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION).to(ACC_DTYPE)
    _cat_store(DQM, DQE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM,
               dq * scale)  # fmt: skip


# --------------------------------------------------------------------------- launchers


def _row_blocks(n_main: int, n_extra: int, block: int) -> int:
    """Blocks over the concatenated range."""
    return triton.cdiv(n_main + n_extra, block)


def _launch_fwd(q_main, k_main, v_main, q_extra, k_extra, v_extra, scale):
    B, H, Nm, D = q_main.shape
    L = q_extra.shape[2]
    q_main, k_main, v_main, q_extra, k_extra, v_extra = (
        t.contiguous() for t in (q_main, k_main, v_main, q_extra, k_extra, v_extra)
    )
    out_main = torch.empty_like(q_main)
    out_extra = torch.empty_like(q_extra)
    lse_dtype = torch.float64 if q_main.dtype == torch.float64 else torch.float32
    lse = torch.empty(B, H, Nm + L, device=q_main.device, dtype=lse_dtype)

    def grid(meta):
        return (_row_blocks(Nm, L, meta["BLOCK_M"]), B * H)

    _fwd_kernel[grid](
        q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, lse,
        scale * _LOG2E, Nm, L, D, B * H,
        ACC_DTYPE=tl_acc_dtype(q_main.dtype), DOT_PRECISION=_dot_precision(q_main.dtype),
        BLOCK_D=triton.next_power_of_2(max(D, 16)),
    )  # fmt: skip
    return out_main, out_extra, lse


def _launch_bwd(q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, lse,
                do_main, do_extra, scale):  # fmt: skip
    B, H, Nm, D = q_main.shape
    L = q_extra.shape[2]
    q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, do_main, do_extra = (
        t.contiguous()
        for t in (
            q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, do_main,
            do_extra,
        )
    )  # fmt: skip
    acc_dtype = tl_acc_dtype(q_main.dtype)
    precision = _dot_precision(q_main.dtype)
    block_d = triton.next_power_of_2(max(D, 16))
    delta = torch.empty_like(lse)
    delta_block = 16 if dispatch.interpreting() else 64
    _bwd_delta_kernel[(_row_blocks(Nm, L, delta_block), B * H)](
        out_main, out_extra, do_main, do_extra, delta, Nm, L, D,
        ACC_DTYPE=acc_dtype, BLOCK_D=block_d, BLOCK_M=delta_block,
    )  # fmt: skip

    dq_main, dk_main, dv_main = (torch.empty_like(q_main) for _ in range(3))
    dq_extra, dk_extra, dv_extra = (torch.empty_like(q_extra) for _ in range(3))

    def grid_kv(meta):
        return (_row_blocks(Nm, L, meta["BLOCK_N"]), B * H)

    def grid_q(meta):
        return (_row_blocks(Nm, L, meta["BLOCK_M"]), B * H)

    _bwd_dkdv_kernel[grid_kv](
        q_main, k_main, v_main, q_extra, k_extra, v_extra, do_main, do_extra, lse, delta,
        dk_main, dv_main, dk_extra, dv_extra, scale, scale * _LOG2E, Nm, L, D, B * H,
        ACC_DTYPE=acc_dtype, DOT_PRECISION=precision, BLOCK_D=block_d,
    )  # fmt: skip
    _bwd_dq_kernel[grid_q](
        q_main, k_main, v_main, q_extra, k_extra, v_extra, do_main, do_extra, lse, delta,
        dq_main, dq_extra, scale, scale * _LOG2E, Nm, L, D, B * H,
        ACC_DTYPE=acc_dtype, DOT_PRECISION=precision, BLOCK_D=block_d,
    )  # fmt: skip
    return dq_main, dk_main, dv_main, dq_extra, dk_extra, dv_extra


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mmt_fast::bottleneck_attention_fwd", mutates_args=())
def _fwd_op(
    q_main: torch.Tensor,
    k_main: torch.Tensor,
    v_main: torch.Tensor,
    q_extra: torch.Tensor,
    k_extra: torch.Tensor,
    v_extra: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: (out_main (B,H,Nm,D), out_extra (B,H,L,D), lse (B,H,Nm+L) fp32, log2 units)."""
    return _launch_fwd(q_main, k_main, v_main, q_extra, k_extra, v_extra, scale)


@_fwd_op.register_fake
def _(q_main, k_main, v_main, q_extra, k_extra, v_extra, scale):
    B, H, Nm, _ = q_main.shape
    L = q_extra.shape[2]
    lse_dtype = torch.float64 if q_main.dtype == torch.float64 else torch.float32
    return (
        torch.empty_like(q_main, memory_format=torch.contiguous_format),
        torch.empty_like(q_extra, memory_format=torch.contiguous_format),
        q_main.new_empty((B, H, Nm + L), dtype=lse_dtype),
    )


@torch.library.custom_op("mmt_fast::bottleneck_attention_bwd", mutates_args=())
def _bwd_op(
    q_main: torch.Tensor,
    k_main: torch.Tensor,
    v_main: torch.Tensor,
    q_extra: torch.Tensor,
    k_extra: torch.Tensor,
    v_extra: torch.Tensor,
    out_main: torch.Tensor,
    out_extra: torch.Tensor,
    lse: torch.Tensor,
    do_main: torch.Tensor,
    do_extra: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq_main, dk_main, dv_main, dq_extra, dk_extra, dv_extra)."""
    return _launch_bwd(
        q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, lse,
        do_main, do_extra, scale,
    )  # fmt: skip


@_bwd_op.register_fake
def _(q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, lse, do_main,
      do_extra, scale):  # fmt: skip
    main = [torch.empty_like(q_main, memory_format=torch.contiguous_format) for _ in range(3)]
    extra = [torch.empty_like(q_extra, memory_format=torch.contiguous_format) for _ in range(3)]
    return main[0], main[1], main[2], extra[0], extra[1], extra[2]


def _setup_context(ctx, inputs, output):
    q_main, k_main, v_main, q_extra, k_extra, v_extra, scale = inputs
    out_main, out_extra, lse = output
    ctx.save_for_backward(
        q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, lse
    )
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do_main, do_extra, _dlse):
    saved = ctx.saved_tensors
    if do_main is None:
        do_main = torch.zeros_like(saved[6])
    if do_extra is None:
        do_extra = torch.zeros_like(saved[7])
    do_main, do_extra = aligned(do_main), aligned(do_extra)
    grads = torch.ops.mmt_fast.bottleneck_attention_bwd(*saved, do_main, do_extra, ctx.scale)
    return (*grads, None)


# Registered on the custom op itself so that tracers (torch.compile, fvcore's jit
# trace) see ``mmt_fast::bottleneck_attention_fwd`` with its shapes.
_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point


def _check_inputs(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{OP_NAME}: {name} must have rank 4 (B, H, N, D), got shape {tuple(t.shape)}"
            )
    qm = tensors["q_main"]
    qe = tensors["q_extra"]
    B, H, Nm, D = qm.shape
    L = qe.shape[2]
    for name, t in tensors.items():
        n = Nm if name.endswith("main") else L
        if tuple(t.shape) != (B, H, n, D):
            raise ValueError(
                f"{OP_NAME}: {name} has shape {tuple(t.shape)}, expected {(B, H, n, D)} "
                f"(batch, heads and head dim D must match q_main {tuple(qm.shape)}; "
                f"the {'main' if name.endswith('main') else 'extra'} segment has "
                f"{n} tokens)"
            )
    if Nm == 0 or L == 0 or D == 0:
        raise ValueError(f"{OP_NAME}: empty segment or head dim (Nm={Nm}, L={L}, D={D})")
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        raise TypeError(
            f"{OP_NAME}: dtype mismatch: " + ", ".join(f"{n}={t.dtype}" for n, t in tensors.items())
        )
    if qm.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{OP_NAME}: unsupported dtype {qm.dtype}; expected one of "
            + ", ".join(map(str, _FLOAT_DTYPES))
        )
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(
            f"{OP_NAME}: device mismatch: "
            + ", ".join(f"{n}={t.device}" for n, t in tensors.items())
        )


def triton_reasons(
    q_main: torch.Tensor, q_extra: torch.Tensor, others: tuple[torch.Tensor, ...] = ()
) -> list[str]:
    """Why the Triton path cannot run these (valid) inputs; [] when it can."""
    reasons = dispatch.device_reasons((q_main, q_extra, *others))
    D = q_main.shape[-1]
    if D > _MAX_HEAD_DIM:
        reasons.append(f"head dim {D} > {_MAX_HEAD_DIM}")
    reasons += dispatch.dtype_reasons(q_main.dtype, fp32_on_cuda=False)
    names = ("q_main", "k_main", "v_main", "q_extra", "k_extra", "v_extra")
    named = dict(zip(names, others)) if len(others) == 6 else {"q_main": q_main, "q_extra": q_extra}
    reasons += dispatch.alignment_reasons(named)
    reasons += dispatch.grid_reasons("batch x heads", q_main.shape[0] * q_main.shape[1])
    return reasons


def bottleneck_attention(
    q_main: torch.Tensor,
    k_main: torch.Tensor,
    v_main: torch.Tensor,
    q_extra: torch.Tensor,
    k_extra: torch.Tensor,
    v_extra: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of both query segments over the union of both key/value segments.

    Args:
        q_main, k_main, v_main: (B, H, Nm, D) modality tokens.
        q_extra, k_extra, v_extra: (B, H, L, D) bottleneck tokens.
        scale: softmax scale, usually D ** -0.5.

    Returns:
        ``(out_main (B, H, Nm, D), out_extra (B, H, L, D))`` with
        ``out_s = softmax(q_s [k_main; k_extra]^T * scale) [v_main; v_extra]``.

    Dispatches through :mod:`mmt_fast.kernels.dispatch`: the Triton kernels (forward and
    backward) or :func:`bottleneck_attention_ref`.
    """
    tensors = {
        "q_main": q_main,
        "k_main": k_main,
        "v_main": v_main,
        "q_extra": q_extra,
        "k_extra": k_extra,
        "v_extra": v_extra,
    }
    _check_inputs(tensors)
    scale = float(scale)
    args = (q_main, k_main, v_main, q_extra, k_extra, v_extra)
    # views the kernels' 16-byte alignment cannot take are copied (autograd sees the copy)
    args_k = tuple(aligned(t) for t in args)
    if dispatch.choose(OP_NAME, triton_reasons(args_k[0], args_k[3], args_k)):
        out_main, out_extra, _ = torch.ops.mmt_fast.bottleneck_attention_fwd(*args_k, scale)
        return out_main, out_extra
    return bottleneck_attention_ref(*args, scale)
