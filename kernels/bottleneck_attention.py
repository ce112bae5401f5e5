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
its own tensor), full tiles of 64 keys then narrow ones of 16, with an online softmax
in fp32, and saves the log-sum-exp. The backward is one small launch for
delta = rowsum(dO * O) and one program per (b, h) that loops over key blocks of 64
and, inside, over query tiles of 16, the keys as every matmul's M: S and dP are
computed once per tile for dV, dK and dQ (five matmuls, not seven), dK and dV stay in
registers and dQ is summed over the key blocks in an fp32 scratch in a fixed order.
The head dim is one or two power-of-2 chunks (96 = 64 + 32), one matmul per chunk, so
no matmul runs over a padded head dim except dQ^T's 32-column chunk (64 rows of a
wgmma). At MMT's 261 tokens that executes 1.56x the useful tensor-core work
(compile gate), against 3.81x with 64 x 64 tiles over a head dim padded to 128.
No Nq x Nk tensor and no concatenated copy of the inputs is allocated. All launches
use grid axis 0 only, so batch x heads has no 65535 limit.

File layout follows flash-attention's ``ops/triton/layer_norm.py``: kernels,
launchers, :func:`bottleneck_attention_ref`, the autograd formula (``register_autograd``),
``torch.library`` ops ``mmt_fast::bottleneck_attention_fwd`` / ``_bwd`` with
fake implementations, and the public entry point :func:`bottleneck_attention`.
"""

from __future__ import annotations

import torch

from . import dispatch, tuning
from ._common import acc_dtype, aligned, tl_acc_dtype
from ._relq import _block_d_split
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


# An A100 (sm_80) runs the reference: the fused backward (dK, dV of 64 keys x 96 in fp32
# registers, mma.sync's 16 rows per warp) spills 40-196 B in every config the compile gate
# tried there (16-32 queries x 16-128 keys, 1-8 warps, 1-3 stages).
tuning.MIN_ARCH[OP_NAME] = 90
_SM80 = ("an sm_80 GPU (A100): the fused backward spills there in every config the compile "
         "gate tried; the reference runs")  # fmt: skip


def _configs(kernel: str) -> list[triton.Config]:
    # Each entry checked by the compile gate (sm_90, bf16/fp16, MMT's AVBottleneck shapes):
    # no spills, within shared memory, HGMMA matmuls, no C7515. The first is the pinned one.
    # BLOCK_T: the narrow tiles after the last full one (16: a wgmma's N and K step), so
    # 261 keys run as 256 + 16, not 320.
    entries = {
        # sm_90 only (MIN_ARCH): on sm_80 the backward spills in every config the gate tried
        "_fwd_kernel": [
            ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 16}, 4, 2, "sm90"),
            ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 16}, 4, 3, "sm90"),
        ],
        "_bwd_kernel": [
            # query tiles of 16: S^T, dP^T, dQ^T are 64 x 16 per warpgroup; 32 or 64 spill
            # (64 keys x 96 of fp32 dK and dV take 96 registers per thread)
            ({"BLOCK_M": 16, "BLOCK_N": 64}, 4, 2, "sm90"),
            ({"BLOCK_M": 16, "BLOCK_N": 64}, 4, 3, "sm90"),
        ],
    }[kernel]
    # the interpreter: full tiles of 32 and narrow ones of 16 in the forward, so odd sizes
    # run both loops
    small = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_T": 16} if kernel == "_fwd_kernel" else (
        {"BLOCK_M": 16, "BLOCK_N": 32})  # fmt: skip
    return tuning.configs(OP_NAME, kernel, entries, (small, 4, 1))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: PyTorch's fp32 matmul does not.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _head_split(D: int) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_D2, SPLIT): the head dim as two power-of-2 chunks, 96 -> 64 + 32, as the
    rel-pos kernels do (no dot over a padded head dim); SPLIT False: one chunk, and BLOCK_D2 a
    16-wide placeholder no dot reads."""
    bd1, bd2 = _block_d_split(D)
    return bd1, max(bd2, 16), bd2 > 0


def _narrow_d(block: int) -> int:
    """A head-dim chunk as the M of the narrow tiles' transposed dQ: 64 rows (one warpgroup's
    wgmma) at least on a GPU; 32 under the interpreter, so its tests run the padded chunk."""
    return max(block, 32 if dispatch.interpreting() else 64)


# --------------------------------------------------------------------------- kernels
#
# Rows and keys are indexed in the *concatenated* range [0, N_MAIN + N_EXTRA): index i < N_MAIN
# is main-segment token i, index i >= N_MAIN is extra-segment token i - N_MAIN. A tile that
# straddles the boundary reads each part from its own tensor with two disjoint masked loads
# (their sum is exact), so a 257 + 4 token sequence is 4 tiles of 64 and one of 16, not 5 + 1.
#
# The head dim is one or two chunks (``d1``: [0, BLOCK_D), ``d2``: [BLOCK_D, BLOCK_D +
# BLOCK_D2)) and every dot over it is one dot per chunk: 96 runs as 64 + 32, never as 128.


@triton.jit
def _cat_load(PM, PE, base_m, base_e, idx, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM):
    """(len(idx), len(offs_d)) rows ``idx`` of [PM; PE] (0 past the end and in padded columns).

    One load through per-row pointers into either segment: a loaded tile a matmul reads goes
    to shared memory as is (the sum of two masked loads is an elementwise result, which
    Triton keeps in registers as a wgmma A operand)."""
    in_m = idx < N_MAIN
    ptr_m = PM + base_m + idx[:, None] * HEAD_DIM + offs_d[None, :]
    ptr_e = PE + base_e + (idx - N_MAIN)[:, None] * HEAD_DIM + offs_d[None, :]
    mask = (idx < N_MAIN + N_EXTRA)[:, None] & mask_d[None, :]
    return tl.load(tl.where(in_m[:, None], ptr_m, ptr_e), mask=mask, other=0.0)


@triton.jit
def _cat_store(PM, PE, base_m, base_e, idx, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM, x):
    in_m = idx < N_MAIN
    in_e = (idx >= N_MAIN) & (idx < N_MAIN + N_EXTRA)
    tl.store(PM + base_m + idx[:, None] * HEAD_DIM + offs_d[None, :], x.to(PM.dtype.element_ty),
             mask=in_m[:, None] & mask_d[None, :])  # fmt: skip
    tl.store(PE + base_e + (idx - N_MAIN)[:, None] * HEAD_DIM + offs_d[None, :],
             x.to(PE.dtype.element_ty), mask=in_e[:, None] & mask_d[None, :])  # fmt: skip


@triton.jit
def _fwd_tile(
    q1, q2, m_i, l_i, acc1, acc2, KM, KE, VM, VE, base_m, base_e, start, d1, d2,
    qk_scale, N_MAIN, N_EXTRA, HEAD_DIM,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK keys from ``start``: scores, online softmax, P V."""
    cols = start + tl.arange(0, BLOCK)
    NT = N_MAIN + N_EXTRA
    k1 = _cat_load(KM, KE, base_m, base_e, cols, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if SPLIT:
        k2 = _cat_load(KM, KE, base_m, base_e, cols, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    s = tl.where((cols < NT)[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v1 = _cat_load(VM, VE, base_m, base_e, cols, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
    acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION,
                  out_dtype=ACC_DTYPE)  # fmt: skip
    if SPLIT:
        v2 = _cat_load(VM, VE, base_m, base_e, cols, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
        acc2 = tl.dot(p.to(v2.dtype), v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION,
                      out_dtype=ACC_DTYPE)  # fmt: skip
    return m_new, l_i, acc1, acc2


@triton.autotune(
    configs=_configs("_fwd_kernel"),
    key=["N_MAIN", "N_EXTRA", "HEAD_DIM", "BH"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _fwd_kernel(
    QM, KM, VM, QE, KE, VE, OM, OE, LSE,
    qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, BH,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Online softmax over the concatenated keys for one concatenated row block: full key tiles
    of BLOCK_N, then narrow ones of BLOCK_T for the rest. Programs on grid axis 0 only
    (row block fastest), so batch x heads has no 65535 limit.

    Scores are in log2 units (``qk_scale`` includes log2(e)) so exp2 is used.
    """
    NT = N_MAIN + N_EXTRA
    n_rb = tl.cdiv(NT, BLOCK_M)
    pid = tl.program_id(0)
    rb = pid % n_rb
    bh = (pid // n_rb).to(tl.int64)
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    d1 = tl.arange(0, BLOCK_D)
    d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    q1 = _cat_load(QM, QE, base_m, base_e, rows, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
    q2 = q1
    if SPLIT:
        q2 = _cat_load(QM, QE, base_m, base_e, rows, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D2], ACC_DTYPE)  # unused (never written) unless SPLIT
    full = (NT // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):
        m_i, l_i, acc1, acc2 = _fwd_tile(
            q1, q2, m_i, l_i, acc1, acc2, KM, KE, VM, VE, base_m, base_e, start, d1, d2,
            qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, ACC_DTYPE, DOT_PRECISION, SPLIT, BLOCK_N,
        )  # fmt: skip
    for start in range(full, NT, BLOCK_T):
        m_i, l_i, acc1, acc2 = _fwd_tile(
            q1, q2, m_i, l_i, acc1, acc2, KM, KE, VM, VE, base_m, base_e, start, d1, d2,
            qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, ACC_DTYPE, DOT_PRECISION, SPLIT, BLOCK_T,
        )  # fmt: skip
    _cat_store(OM, OE, base_m, base_e, rows, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM,
               acc1 / l_i[:, None])  # fmt: skip
    if SPLIT:
        _cat_store(OM, OE, base_m, base_e, rows, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM,
                   acc2 / l_i[:, None])  # fmt: skip
    tl.store(LSE + bh * NT + rows, m_i + tl.log2(l_i), mask=rows < NT)  # log2 units


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    OM, OE, DOM, DOE, DELTA, N_MAIN, N_EXTRA, HEAD_DIM,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id for the concatenated rows (grid axis 0: row block fastest,
    then batch x heads)."""
    NT = N_MAIN + N_EXTRA
    n_rb = tl.cdiv(NT, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // n_rb).to(tl.int64)
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = (pid % n_rb) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _cat_load(OM, OE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    do = _cat_load(DOM, DOE, base_m, base_e, rows, offs_d, mask_d, N_MAIN, N_EXTRA, HEAD_DIM)
    tl.store(DELTA + bh * NT + rows, tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1), mask=rows < NT)


@triton.jit
def _bwd_tile(
    dk1, dk2, dv1, dv2, k1, k2, v1, v2, kt1, kt2,
    QM, QE, DOM, DOE, LSE, DELTA, DQACC, base_m, base_e, base_a, base_r,
    cols, start, d1, d2, dt1, dt2, qk_scale, N_MAIN, N_EXTRA, HEAD_DIM,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK_M queries from ``start`` against this program's key block, the keys
    as every matmul's M (a warpgroup's 64 rows; the queries are N or K, so a tile can be as
    narrow as 16 and the last one pads the queries to 16, not 64)::

        S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
        dV += P^T dO, dK += dS^T Q, dQ^T(rows) += K^T dS^T

    dQ^T has the head-dim chunks as M (``kt1``, ``kt2``: K's columns ``dt1``, ``dt2``, each at
    least 64 wide on a GPU: the 32-column chunk of 96 runs as 64 in this one matmul) and is
    added to the fp32 running sum DQACC (BH, NT, HEAD_DIM) of this (b, h)."""
    NT = N_MAIN + N_EXTRA
    rows = start + tl.arange(0, BLOCK_M)
    in_r = rows < NT
    q1 = _cat_load(QM, QE, base_m, base_e, rows, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
    do1 = _cat_load(DOM, DOE, base_m, base_e, rows, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
    st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dpt = tl.dot(v1, tl.trans(do1), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    q2 = q1
    do2 = do1
    if SPLIT:
        q2 = _cat_load(QM, QE, base_m, base_e, rows, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
        do2 = _cat_load(DOM, DOE, base_m, base_e, rows, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA,
                        HEAD_DIM)  # fmt: skip
        st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    lse = tl.load(LSE + base_r + rows, mask=in_r, other=0.0)
    delta = tl.load(DELTA + base_r + rows, mask=in_r, other=0.0)
    valid = (cols < NT)[:, None] & in_r[None, :]
    pt = tl.where(valid, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
    dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
    pt = pt.to(q1.dtype)
    dv1 = tl.dot(pt, do1, dv1, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if SPLIT:
        dv2 = tl.dot(pt, do2, dv2, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    # dQ^T += K^T dS^T, read-modify-write of the running sum: one program owns the rows of its
    # (b, h), so the sum runs in a fixed order (deterministic, no atomics)
    acc = DQACC + base_a + rows[None, :] * HEAD_DIM
    m1 = (dt1 < HEAD_DIM)[:, None] & in_r[None, :]
    dq1 = tl.load(acc + dt1[:, None], mask=m1, other=0.0)
    dq1 = tl.dot(tl.trans(kt1), dst, dq1, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(acc + dt1[:, None], dq1, mask=m1)
    if SPLIT:
        m2 = (dt2 < HEAD_DIM)[:, None] & in_r[None, :]
        dq2 = tl.load(acc + dt2[:, None], mask=m2, other=0.0)
        dq2 = tl.dot(tl.trans(kt2), dst, dq2, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        tl.store(acc + dt2[:, None], dq2, mask=m2)
    return dk1, dk2, dv1, dv2


@triton.autotune(
    configs=_configs("_bwd_kernel"),
    key=["N_MAIN", "N_EXTRA", "HEAD_DIM", "BH"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _bwd_kernel(
    QM, KM, VM, QE, KE, VE, DOM, DOE, LSE, DELTA, DQACC, DQM, DKM, DVM, DQE, DKE, DVE,
    scale, qk_scale, N_MAIN, N_EXTRA, HEAD_DIM, BH,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_DT2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ, dK, dV of one (b, h): key blocks of BLOCK_N one after the other, each looping over
    the query tiles of BLOCK_M (:func:`_bwd_tile`), dK and dV in registers, dQ summed over
    the key blocks in DQACC (zeroed by the launcher), then scaled into dQ. S and dP are
    computed once per tile: five matmuls, against seven with a separate dQ kernel."""
    bh = tl.program_id(0).to(tl.int64)
    NT = N_MAIN + N_EXTRA
    base_m = bh * N_MAIN * HEAD_DIM
    base_e = bh * N_EXTRA * HEAD_DIM
    base_a = bh * NT * HEAD_DIM
    base_r = bh * NT
    d1 = tl.arange(0, BLOCK_D)
    d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    dt1 = tl.arange(0, BLOCK_DT)
    dt2 = BLOCK_D + tl.arange(0, BLOCK_DT2)
    for kstart in range(0, NT, BLOCK_N):
        cols = kstart + tl.arange(0, BLOCK_N)
        k1 = _cat_load(KM, KE, base_m, base_e, cols, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
        v1 = _cat_load(VM, VE, base_m, base_e, cols, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM)
        k2 = k1
        v2 = v1
        kt1 = k1
        kt2 = k1
        if BLOCK_DT != BLOCK_D:
            kt1 = _cat_load(KM, KE, base_m, base_e, cols, dt1, dt1 < HEAD_DIM, N_MAIN, N_EXTRA,
                            HEAD_DIM)  # fmt: skip
        if SPLIT:
            k2 = _cat_load(KM, KE, base_m, base_e, cols, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA,
                           HEAD_DIM)  # fmt: skip
            v2 = _cat_load(VM, VE, base_m, base_e, cols, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA,
                           HEAD_DIM)  # fmt: skip
            kt2 = k2
            if BLOCK_DT2 != BLOCK_D2:
                kt2 = _cat_load(KM, KE, base_m, base_e, cols, dt2, dt2 < HEAD_DIM, N_MAIN,
                                N_EXTRA, HEAD_DIM)  # fmt: skip
        dk1 = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], ACC_DTYPE)  # unused unless SPLIT
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], ACC_DTYPE)
        for start in range(0, NT, BLOCK_M):
            dk1, dk2, dv1, dv2 = _bwd_tile(
                dk1, dk2, dv1, dv2, k1, k2, v1, v2, kt1, kt2,
                QM, QE, DOM, DOE, LSE, DELTA, DQACC, base_m, base_e, base_a, base_r,
                cols, start, d1, d2, dt1, dt2, qk_scale,
                N_MAIN, N_EXTRA, HEAD_DIM, ACC_DTYPE, DOT_PRECISION, SPLIT, BLOCK_M,
            )  # fmt: skip
        _cat_store(DKM, DKE, base_m, base_e, cols, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM,
                   dk1 * scale)  # fmt: skip
        _cat_store(DVM, DVE, base_m, base_e, cols, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM,
                   dv1)  # fmt: skip
        if SPLIT:
            _cat_store(DKM, DKE, base_m, base_e, cols, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA,
                       HEAD_DIM, dk2 * scale)  # fmt: skip
            _cat_store(DVM, DVE, base_m, base_e, cols, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA,
                       HEAD_DIM, dv2)  # fmt: skip
        # the next key block reads the dQ sums this one wrote (other threads' elements)
        tl.debug_barrier()
    # dQ = scale x the sums, in the inputs' dtype
    for start in range(0, NT, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        in_r = rows < NT
        acc_rows = DQACC + base_a + rows[:, None] * HEAD_DIM
        dq1 = tl.load(acc_rows + d1[None, :], mask=in_r[:, None] & (d1 < HEAD_DIM)[None, :])
        _cat_store(DQM, DQE, base_m, base_e, rows, d1, d1 < HEAD_DIM, N_MAIN, N_EXTRA, HEAD_DIM,
                   dq1 * scale)  # fmt: skip
        if SPLIT:
            dq2 = tl.load(acc_rows + d2[None, :], mask=in_r[:, None] & (d2 < HEAD_DIM)[None, :])
            _cat_store(DQM, DQE, base_m, base_e, rows, d2, d2 < HEAD_DIM, N_MAIN, N_EXTRA,
                       HEAD_DIM, dq2 * scale)  # fmt: skip


# --------------------------------------------------------------------------- launchers


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
    bd1, bd2, split = _head_split(D)

    def grid(meta):
        return (triton.cdiv(Nm + L, meta["BLOCK_M"]) * B * H,)

    _fwd_kernel[grid](
        q_main, k_main, v_main, q_extra, k_extra, v_extra, out_main, out_extra, lse,
        scale * _LOG2E, Nm, L, D, B * H,
        ACC_DTYPE=tl_acc_dtype(q_main.dtype), DOT_PRECISION=_dot_precision(q_main.dtype),
        SPLIT=split, BLOCK_D=bd1, BLOCK_D2=bd2,
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
    acc = acc_dtype(q_main.dtype)
    delta = torch.empty_like(lse)
    delta_block = 16 if dispatch.interpreting() else 64
    _bwd_delta_kernel[(triton.cdiv(Nm + L, delta_block) * B * H,)](
        out_main, out_extra, do_main, do_extra, delta, Nm, L, D,
        ACC_DTYPE=tl_acc_dtype(q_main.dtype), BLOCK_D=triton.next_power_of_2(max(D, 16)),
        BLOCK_M=delta_block,
    )  # fmt: skip
    dq_main, dk_main, dv_main = (torch.empty_like(q_main) for _ in range(3))
    dq_extra, dk_extra, dv_extra = (torch.empty_like(q_extra) for _ in range(3))
    # dQ's running sum over the key blocks (fp32; 51 MB for MMT's audio side at batch 64)
    dq_acc = torch.zeros((B * H, Nm + L, D), dtype=acc, device=q_main.device)
    bd1, bd2, split = _head_split(D)
    _bwd_kernel[(B * H,)](
        q_main, k_main, v_main, q_extra, k_extra, v_extra, do_main, do_extra, lse, delta,
        dq_acc, dq_main, dk_main, dv_main, dq_extra, dk_extra, dv_extra,
        scale, scale * _LOG2E, Nm, L, D, B * H,
        ACC_DTYPE=tl_acc_dtype(q_main.dtype), DOT_PRECISION=_dot_precision(q_main.dtype),
        SPLIT=split, BLOCK_D=bd1, BLOCK_D2=bd2, BLOCK_DT=_narrow_d(bd1),
        BLOCK_DT2=_narrow_d(bd2),
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
    if (
        q_main.is_cuda
        and not dispatch.interpreting()
        and tuning.target_arch() < tuning.MIN_ARCH[OP_NAME]
    ):
        reasons.append(_SM80)
    D = q_main.shape[-1]
    if D > _MAX_HEAD_DIM:
        reasons.append(f"head dim {D} > {_MAX_HEAD_DIM}")
    reasons += dispatch.dtype_reasons(q_main.dtype, fp32_on_cuda=False)
    names = ("q_main", "k_main", "v_main", "q_extra", "k_extra", "v_extra")
    named = dict(zip(names, others)) if len(others) == 6 else {"q_main": q_main, "q_extra": q_extra}
    reasons += dispatch.alignment_reasons(named)
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
