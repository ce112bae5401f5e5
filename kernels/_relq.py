"""relq, the small tensor the decomposed rel-pos bias factorises through, for
:mod:`relpos_attention` (see its docstring): the kernels that build it and carry its
gradient into q and the tables, and the per-tile bias helpers the attention kernels share.

    relq_a[b, h, i, y] = q_i . R_a[dist_a(i_a, y)],  y < k_grid[a]

Queries sharing their coordinate x on axis a share the table rows R_a[dist_a(x, :)], so
each axis is a batch of small matmuls (``_group_rows`` enumerates a group). ``geo`` is
:func:`relpos_attention._geometry`'s description of the key grid and of relq's columns.
"""

import math
from collections.abc import Sequence

import torch

from . import dispatch, tuning
from ._common import acc_dtype, tl_acc_dtype
from ._triton import tl, triton

_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(_LOG2E)
# programs the table-gradient launch aims at: four per SM of an H100/H200 (132 SMs)
_TABLE_PROGRAMS = 4 * 132

Grid = Sequence[int]


def rel_pos_index(
    q_size: int, k_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Row of the rel-pos table for every (query, key) coordinate pair on one axis.

    Returns (q_size, k_size) int64 with values in [0, 2 max(q_size, k_size) - 1).
    The arithmetic is float32 and truncates, exactly as timm's ``cal_rel_pos_type``.
    """
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = (
        torch.arange(q_size, device=device)[:, None] * q_ratio
        - torch.arange(k_size, device=device)[None, :] * k_ratio
    )
    dist = dist + (k_size - 1) * k_ratio
    return dist.long()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: PyTorch's fp32 matmul does not.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block_d_split(D: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dim as two power-of-2 chunks when the second is at least
    16 (a matmul's K) and saves padding: 96 -> (64, 32), 48 -> (32, 16); else (padded, 0)."""
    lo = triton.next_power_of_2(D) // 2
    if D <= 16 or D == 2 * lo or D - lo < 16:
        return _block_d(D), 0
    return lo, max(16, triton.next_power_of_2(D - lo))


# ----------------------------------------------------------------------------- bias of a tile


@triton.jit
def _onehot(js, STRIDE: tl.constexpr, KA: tl.constexpr, W: tl.constexpr, DT: tl.constexpr):
    """(W, BLOCK_N) one-hot of the keys' coordinate along one axis: [w == (j // STRIDE) % KA]."""
    c = (js // STRIDE) % KA
    return (tl.arange(0, W)[:, None] == c[None, :]).to(DT)


@triton.jit
def _rel_window(rel_rows, row_sp, OFF: tl.constexpr, KA: tl.constexpr, W: tl.constexpr):
    """(BLOCK_M, W) relq columns OFF .. OFF + KA of these rows (0 past KA and off the rows)."""
    w = tl.arange(0, W)
    return tl.load(rel_rows[:, None] + OFF + w[None, :], mask=row_sp[:, None] & (w < KA)[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _rel_windows(
    rel_rows, row_sp,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    PACKED: tl.constexpr, WP: tl.constexpr, KSUM: tl.constexpr,
):  # fmt: skip
    """The short-axes path's relq columns of these rows, per used axis (0 for an unused one);
    PACKED: all of a row's KSUM columns side by side in r0, (BLOCK_M, WP)."""
    r0 = 0
    r1 = 0
    r2 = 0
    if PACKED:
        r0 = _rel_window(rel_rows, row_sp, 0, KSUM, WP)
    else:
        if USE0:
            r0 = _rel_window(rel_rows, row_sp, OFF0, K0, W0)
        if USE1:
            r1 = _rel_window(rel_rows, row_sp, OFF1, K1, W1)
        if USE2:
            r2 = _rel_window(rel_rows, row_sp, OFF2, K2, W2)
    return r0, r1, r2


@triton.jit
def _onehots(
    js, DT: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    PACKED: tl.constexpr, WP: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
):  # fmt: skip
    """The keys' one-hot coordinates per used axis (0 for an unused one). PACKED: one (WP,
    BLOCK_N) multi-hot in oh0 against the packed relq columns (column OFF_a + j_a is 1 for
    each used axis a): the bias of all axes is one matmul of K = WP (MViTv2's 8 + 7 + 7 keys:
    32) instead of one per axis, each padded to 16 (48)."""
    oh0 = 0
    oh1 = 0
    oh2 = 0
    if PACKED:
        c = tl.arange(0, WP)[:, None]
        hot = c < 0  # all False, (WP, 1)
        if USE0:
            hot = hot | (c == OFF0 + (js // (K1 * K2))[None, :])
        if USE1:
            hot = hot | (c == OFF1 + ((js // K2) % K1)[None, :])
        if USE2:
            hot = hot | (c == OFF2 + (js % K2)[None, :])
        oh0 = hot.to(DT)
    else:
        if USE0:
            oh0 = _onehot(js, K1 * K2, K0, W0, DT)
        if USE1:
            oh1 = _onehot(js, K2, K1, W1, DT)
        if USE2:
            oh2 = _onehot(js, 1, K2, W2, DT)
    return oh0, oh1, oh2


@triton.jit
def _bias_full(
    r0, r1, r2, oh0, oh1, oh2,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TRANS: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """Short-axes bias of a tile: sum_a relq_a (BLOCK_M, W_a) @ onehot_a (W_a, BLOCK_N)
    (TRANS: its transpose, sum_a onehot_a^T @ relq_a^T); PACKED: the one matmul of the packed
    relq columns r0 and the multi-hot oh0."""
    if PACKED:
        if TRANS:
            bias = tl.dot(tl.trans(oh0), tl.trans(r0), input_precision=DOT_PRECISION,
                          out_dtype=ACC_DTYPE)  # fmt: skip
        else:
            bias = tl.dot(r0, oh0, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    elif TRANS:
        bias = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC_DTYPE)
        if USE0:
            bias = tl.dot(tl.trans(oh0), tl.trans(r0), bias, input_precision=DOT_PRECISION,
                          out_dtype=ACC_DTYPE)  # fmt: skip
        if USE1:
            bias = tl.dot(tl.trans(oh1), tl.trans(r1), bias, input_precision=DOT_PRECISION,
                          out_dtype=ACC_DTYPE)  # fmt: skip
        if USE2:
            bias = tl.dot(tl.trans(oh2), tl.trans(r2), bias, input_precision=DOT_PRECISION,
                          out_dtype=ACC_DTYPE)  # fmt: skip
    else:
        bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        if USE0:
            bias = tl.dot(r0, oh0, bias, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if USE1:
            bias = tl.dot(r1, oh1, bias, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if USE2:
            bias = tl.dot(r2, oh2, bias, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return bias


@triton.jit
def _bias_aligned(
    rel_rows, row_sp, start, js,
    K1: tl.constexpr, K2: tl.constexpr, USE0: tl.constexpr, USE1: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TRANS: tl.constexpr,
):  # fmt: skip
    """Bias of a key tile that lies inside one row of the fastest axis (K2 % BLOCK_N == 0)
    (TRANS: its transpose, (BLOCK_N, BLOCK_M)).

    The fastest coordinate runs over c0 .. c0 + BLOCK_N - 1: one contiguous (BLOCK_M, BLOCK_N)
    load per row; the slower coordinates are constant over the tile: one column each,
    broadcast. Only the (BLOCK_M,) row pointers live across the key loop (a (BLOCK_M,
    BLOCK_N) 64-bit offset tensor would hold 32 registers per thread); rows off the spatial
    grid (past Nq) read 0.
    """
    r = start // K2
    cols = OFF2 + start % K2 + (js - start)
    if TRANS:
        bias = tl.load(rel_rows[None, :] + cols[:, None], mask=row_sp[None, :], other=0.0)
        bias = bias.to(ACC_DTYPE)
        if USE1:
            bias += tl.load(rel_rows + OFF1 + r % K1, mask=row_sp, other=0.0).to(ACC_DTYPE)[None, :]
        if USE0:
            bias += tl.load(rel_rows + OFF0 + r // K1, mask=row_sp, other=0.0).to(ACC_DTYPE)[
                None, :
            ]
    else:
        bias = tl.load(rel_rows[:, None] + cols[None, :], mask=row_sp[:, None], other=0.0)
        bias = bias.to(ACC_DTYPE)
        if USE1:
            bias += tl.load(rel_rows + OFF1 + r % K1, mask=row_sp, other=0.0).to(ACC_DTYPE)[:, None]
        if USE0:
            bias += tl.load(rel_rows + OFF0 + r // K1, mask=row_sp, other=0.0).to(ACC_DTYPE)[
                :, None
            ]
    return bias


@triton.jit
def _bias_gather(
    rel_rows, row_sp, js, col_in,
    K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """General fallback (an axis longer than 64 that BLOCK_N does not divide): per element."""
    mask = row_sp[:, None] & col_in[None, :]
    bias = tl.zeros([rel_rows.shape[0], js.shape[0]], dtype=ACC_DTYPE)
    if USE0:
        c0 = js // (K1 * K2)
        bias += tl.load(rel_rows[:, None] + OFF0 + c0[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    if USE1:
        c1 = (js // K2) % K1
        bias += tl.load(rel_rows[:, None] + OFF1 + c1[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    if USE2:
        c2 = js % K2
        bias += tl.load(rel_rows[:, None] + OFF2 + c2[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    return bias


@triton.jit
def _scores(
    a, bt, a2, bt2, qk_scale, rel_rows, row_sp, start, js, col_in, r0, r1, r2, oh0, oh1, oh2,
    ALIGNED: tl.constexpr, FULL: tl.constexpr,
    K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, TRANS: tl.constexpr,
    SPLIT: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """S = q k^T * scale + bias of one tile in log2 units (exp2 is the native instruction), the
    bias by the path chosen at compile time (the one place that chooses, for all kernels):
    aligned, the bias is the Q K^T matmul's initial accumulator; short axes, sum_a relq_a @
    onehot_a (r_a, oh_a from the caller, which keeps the loop-invariant ones); otherwise the
    per-element gather. (a, bt) = (q, k^T); TRANS: (k, q^T) and S^T is returned, keys x rows.
    SPLIT: the head dim comes in two chunks (96 = 64 + 32: no padding to 128), (a2, bt2) the
    second. PACKED: the short axes' bias is one matmul (see ``_onehots``).
    """
    if TRANS:
        BM: tl.constexpr = bt.shape[1]
        BN: tl.constexpr = a.shape[0]
    else:
        BM: tl.constexpr = a.shape[0]
        BN: tl.constexpr = bt.shape[1]
    if ALIGNED:
        b = _bias_aligned(rel_rows, row_sp, start, js, K1, K2, USE0, USE1, OFF0, OFF1, OFF2, ACC_DTYPE,
                          TRANS)  # fmt: skip
        s = tl.dot(
            a, bt, b * (_LOG2E_C / qk_scale), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
        )
        if SPLIT:
            s = tl.dot(a2, bt2, s, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        s = s * qk_scale
    else:
        s = tl.dot(a, bt, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if SPLIT:
            s = tl.dot(a2, bt2, s, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        s = s * qk_scale
        if FULL:
            s += _LOG2E_C * _bias_full(r0, r1, r2, oh0, oh1, oh2, USE0, USE1, USE2, ACC_DTYPE, DOT_PRECISION,
                                       BM, BN, TRANS, PACKED)  # fmt: skip
        elif USE2:
            b = _bias_gather(rel_rows, row_sp, js, col_in, K1, K2, USE0, USE1, USE2, OFF0, OFF1,
                             OFF2, ACC_DTYPE)  # fmt: skip
            if TRANS:
                b = tl.trans(b)
            s += _LOG2E_C * b
    return s


# ----------------------------------------------------------------------------- relq kernels


@triton.jit
def _group_rows(g, x, QA, INNER):
    """Spatial row of the g-th query whose coordinate on an axis of QA values (flattened stride
    INNER) is x: the rows sharing x share their relq table rows R_a[dist_a(x, :)]."""
    return (g // INNER) * (QA * INNER) + x * INNER + g % INNER


@triton.jit
def _flat_row_block(BH, G, QA, INNER, BLOCK_R: tl.constexpr):
    """This program's axis coordinate x and its BLOCK_R of the (b, h, row) pairs with that
    coordinate, flattened (a group of fewer rows than BLOCK_R, 32 on MAT's frequency axis,
    is not padded to a block): (x, in-range mask, b * H + h, spatial query row)."""
    pid = tl.program_id(0)
    n_fb = tl.cdiv(BH * G, BLOCK_R)
    x = pid // n_fb
    f = (pid % n_fb).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return x, f < BH * G, f // G, _group_rows(f % G, x, QA, INNER)


@triton.jit
def _relq_kernel(
    Q, TABLE, IDX, REL,
    sqb, sqh, sqn, sqd,
    H, BH, NQS, D, QA, KA, INNER, G,
    HAS_CLS: tl.constexpr, OFF: tl.constexpr, KSUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """relq_a[i, y] = q_i . R_a[idx_a(x, y)] for BLOCK_R rows with axis coordinate x: one matmul
    (BLOCK_R, D) @ (D, BLOCK_Y) against the gathered table rows (two, over head-dim chunks
    [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2) when BLOCK_D2 > 0), stored at columns
    OFF + y of the packed relq (BH, NQS, KSUM)."""
    x, g_in, bh, i = _flat_row_block(BH, G, QA, INNER, BLOCK_R)
    y = tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_in = y < KA
    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    q_rows = Q + ((bh // H) * sqb + (bh % H) * sqh + (i + HAS_CLS) * sqn)[:, None]
    q = tl.load(q_rows + d[None, :] * sqd, mask=g_in[:, None] & d_in[None, :], other=0.0)
    t_rows = tl.load(IDX + x * KA + y, mask=y_in, other=0)
    tt = tl.load(TABLE + t_rows[None, :] * D + d[:, None], mask=d_in[:, None] & y_in[None, :],
                 other=0.0)  # fmt: skip
    r = tl.dot(q, tt, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + d2[None, :] * sqd, mask=g_in[:, None] & (d2 < D)[None, :],
                     other=0.0)  # fmt: skip
        tt2 = tl.load(TABLE + t_rows[None, :] * D + d2[:, None],
                      mask=(d2 < D)[:, None] & y_in[None, :], other=0.0)  # fmt: skip
        r = tl.dot(q2, tt2, r, input_precision=DOT_PRECISION, out_dtype=r.dtype)
    tl.store(REL + (bh * NQS + i)[:, None] * KSUM + OFF + y[None, :],
             r.to(REL.dtype.element_ty), mask=g_in[:, None] & y_in[None, :])  # fmt: skip


@triton.jit
def _relq_dq_kernel(
    DREL, TABLE, IDX, DQ,
    H, BH, Nq, NQS, D, QA, KA, INNER, G,
    HAS_CLS: tl.constexpr, OFF: tl.constexpr, KSUM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Y: tl.constexpr,
    BLOCK_D: tl.constexpr, D_OFF: tl.constexpr,
):  # fmt: skip
    """The chain rule through relq_a into q: dq_i += sum_y d_relq_a[i, y] R_a[idx_a(x, y)],
    for BLOCK_R rows with axis coordinate x and head-dim columns D_OFF .. D_OFF + BLOCK_D
    (d_relq rounded to q's dtype, as PyTorch's own path); dq (BH, Nq, D) contiguous, updated
    in place."""
    x, g_in, bh, i = _flat_row_block(BH, G, QA, INNER, BLOCK_R)
    d = D_OFF + tl.arange(0, BLOCK_D)
    d_in = d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC_DTYPE)
    for y0 in range(0, KA, BLOCK_Y):
        y = y0 + tl.arange(0, BLOCK_Y)
        y_in = y < KA
        gr = tl.load(DREL + (bh * NQS + i)[:, None] * KSUM + OFF + y[None, :],
                     mask=g_in[:, None] & y_in[None, :], other=0.0)  # fmt: skip
        t_rows = tl.load(IDX + x * KA + y, mask=y_in, other=0)
        tb = tl.load(TABLE + t_rows[:, None] * D + d[None, :], mask=y_in[:, None] & d_in[None, :],
                     other=0.0)  # fmt: skip
        acc = tl.dot(gr.to(tb.dtype), tb, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    ptr = DQ + (bh * Nq + HAS_CLS + i)[:, None] * D + d[None, :]
    mask = g_in[:, None] & d_in[None, :]
    dq = tl.load(ptr, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(ptr, (dq + acc).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _relq_table_kernel(
    DREL, Q, DR,
    sqb, sqh, sqn, sqd,
    H, BH, NQS, D, QA, KA, INNER, G, blocks_per_chunk,
    HAS_CLS: tl.constexpr, OFF: tl.constexpr, KSUM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Y: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, SPLIT: tl.constexpr, Y_AS_M: tl.constexpr,
):  # fmt: skip
    """The table's share: dR_a[x, y] = sum over this chunk's (b, h, row) pairs with axis
    coordinate x of d_relq_a[i, y] q_i, reduced in registers; one (BLOCK_Y, D) block of
    DR (chunks, QA, KA, D) per program (the launcher sums the chunks, then index_adds).

    The matmul's K runs over the (b, h, row) pairs with coordinate x, flattened as
    f = bh * G + row (int32: B H G < 2^31, checked by the launcher); a chunk is the run of
    blocks_per_chunk BLOCK_R-row blocks from f = chunk * blocks_per_chunk * BLOCK_R (it may
    start and end inside a (b, h) pair), so that a small B * H still fills the GPU; BLOCK_R
    rows at a time whatever the group size G (a group of 32 rows is not padded to 64).
    (The loop counts blocks from 0 and the chunk's start is a multiple of BLOCK_R the
    compiler can see: 95 registers at MAT stage 1 with the key columns as M, 107-115 with
    the row as the loop variable.) Y_AS_M: dR =
    d_relq^T Q with the key columns as M and the head dim as N, in chunks [0, BLOCK_D) and
    [BLOCK_D, BLOCK_D + BLOCK_D2) (96 = 64 + 32, no padding); else dR^T = Q^T d_relq with the
    head dim (BLOCK_D, padded) as M, for axes of fewer than a warpgroup's 64 keys."""
    pid = tl.program_id(0)
    n_yb = tl.cdiv(KA, BLOCK_Y)
    yb = pid % n_yb
    x = pid // n_yb
    chunk = tl.program_id(1)
    y = yb * BLOCK_Y + tl.arange(0, BLOCK_Y)
    y_in = y < KA
    d1 = tl.arange(0, BLOCK_D)
    d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    if Y_AS_M:
        acc1 = tl.zeros([BLOCK_Y, BLOCK_D], dtype=ACC_DTYPE)
    else:
        acc1 = tl.zeros([BLOCK_D, BLOCK_Y], dtype=ACC_DTYPE)
    acc2 = tl.zeros([BLOCK_Y, BLOCK_D2], dtype=ACC_DTYPE)  # unused unless SPLIT and Y_AS_M
    start = chunk * (blocks_per_chunk * BLOCK_R)
    end = tl.minimum(start + blocks_per_chunk * BLOCK_R, BH * G)
    for blk in range(0, tl.cdiv(end - start, BLOCK_R)):
        f = start + blk * BLOCK_R + tl.arange(0, BLOCK_R)
        f_in = f < end
        bh = (f // G).to(tl.int64)
        i = _group_rows(f % G, x, QA, INNER)
        q_rows = Q + (bh // H) * sqb + (bh % H) * sqh + (i + HAS_CLS) * sqn
        gr = tl.load(DREL + (bh * NQS + i)[:, None] * KSUM + OFF + y[None, :],
                     mask=f_in[:, None] & y_in[None, :], other=0.0)  # fmt: skip
        if Y_AS_M:
            q1 = tl.load(q_rows[:, None] + d1[None, :] * sqd,
                         mask=f_in[:, None] & (d1 < D)[None, :], other=0.0)  # fmt: skip
            grt = tl.trans(gr.to(q1.dtype))
            acc1 = tl.dot(grt, q1, acc1, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if SPLIT:
                q2 = tl.load(q_rows[:, None] + d2[None, :] * sqd,
                             mask=f_in[:, None] & (d2 < D)[None, :], other=0.0)  # fmt: skip
                acc2 = tl.dot(grt, q2, acc2, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            qt = tl.load(q_rows[None, :] + d1[:, None] * sqd,
                         mask=(d1 < D)[:, None] & f_in[None, :], other=0.0)  # fmt: skip
            acc1 = tl.dot(qt, gr.to(qt.dtype), acc1, input_precision=DOT_PRECISION,
                          out_dtype=ACC_DTYPE)  # fmt: skip
    out = DR + ((chunk * QA + x) * KA + y) * D
    if Y_AS_M:
        tl.store(out[:, None] + d1[None, :], acc1, mask=y_in[:, None] & (d1 < D)[None, :])
        if SPLIT:
            tl.store(out[:, None] + d2[None, :], acc2, mask=y_in[:, None] & (d2 < D)[None, :])
    else:
        tl.store(out[None, :] + d1[:, None], acc1, mask=(d1 < D)[:, None] & y_in[None, :])


# ----------------------------------------------------------------------------- launchers


def _relq_blocks(ka: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_Y, num_warps, num_stages) of the three relq kernels for an axis of ka
    keys (checked by the compile gate): 64 rows for the one warpgroup, up to 64 key columns
    (no more than the axis needs: its padding is executed tensor-core work); 1 stage on
    sm_80 (2 spill 8 B in the table gradient at MViTv2-B stages 3-4)."""
    if dispatch.interpreting():
        return 16, 16, 4, 2
    stages = 2 if tuning.target_arch() >= 90 else 1
    return 64, min(64, max(16, triton.next_power_of_2(ka))), 4, stages


def _axes(q: torch.Tensor, rel_tables: Sequence[torch.Tensor], q_grid: Grid, k_grid: Grid,
          geo: dict) -> list[dict]:  # fmt: skip
    """Per table: its axis' sizes, the row grouping of the relq kernels, its relq column offset
    and the (qa, ka) int32 table-row index."""
    offs = [geo["OFF0"], geo["OFF1"], geo["OFF2"]][3 - len(q_grid) :]
    out = []
    for a, table in enumerate(rel_tables):
        qa, ka = int(q_grid[a]), int(k_grid[a])
        inner = math.prod(q_grid[a + 1 :])
        idx = rel_pos_index(qa, ka, q.device).to(torch.int32)
        out.append(dict(table=table.contiguous(), idx=idx, QA=qa, KA=ka, INNER=inner,
                        G=math.prod(q_grid) // qa, OFF=offs[a]))  # fmt: skip
    return out


def _relq_packed(
    q: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
    geo: dict,
) -> torch.Tensor:
    """relq of all axes side by side: (B, H, Nq - cls, sum_a ka), contiguous, q's dtype, built
    by one matmul kernel per axis (no copy of q); a 1-element placeholder without tables."""
    B, H, _, D = q.shape
    if not len(rel_tables):
        return q.new_empty(1)
    nqs = math.prod(q_grid)
    rel = torch.empty((B, H, nqs, geo["KSUM"]), dtype=q.dtype, device=q.device)
    bd1, bd2 = _block_d_split(D)
    for ax in _axes(q, rel_tables, q_grid, k_grid, geo):
        block_r, block_y, warps, stages = _relq_blocks(ax["KA"])
        grid = (ax["QA"] * triton.cdiv(B * H * ax["G"], block_r), triton.cdiv(ax["KA"], block_y))
        _relq_kernel[grid](
            q, ax["table"], ax["idx"], rel, *q.stride(),
            H, B * H, nqs, D, ax["QA"], ax["KA"], ax["INNER"], ax["G"],
            HAS_CLS=int(has_cls), OFF=ax["OFF"], KSUM=geo["KSUM"],
            DOT_PRECISION=_dot_precision(q.dtype), BLOCK_R=block_r, BLOCK_Y=block_y,
            BLOCK_D=bd1, BLOCK_D2=bd2, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return rel


def _relq_backward(
    drel: torch.Tensor,
    q: torch.Tensor,
    dq: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
    geo: dict,
) -> list[torch.Tensor]:
    """Chain rule through relq_a = q_i . R_a[dist_a(i_a, y)]: adds into dq (contiguous) in
    place and returns d(tables), both by kernels reading drel (B, H, prod(q_grid), sum_a ka);
    only the tables' (qa, ka, D) shares are summed and index_added in PyTorch."""
    B, H, Nq, D = q.shape
    acc = acc_dtype(q.dtype)
    nqs = math.prod(q_grid)
    bd1, bd2 = _block_d_split(D)
    chunks_d = [(0, bd1), (bd1, bd2)] if bd2 else [(0, bd1)]
    dtables = []
    for ax in _axes(q, rel_tables, q_grid, k_grid, geo):
        block_r, block_y, warps, stages = _relq_blocks(ax["KA"])
        meta = dict(HAS_CLS=int(has_cls), KSUM=geo["KSUM"], ACC_DTYPE=tl_acc_dtype(q.dtype),
                    DOT_PRECISION=_dot_precision(q.dtype), BLOCK_R=block_r, BLOCK_Y=block_y,
                    num_warps=warps, num_stages=stages)  # fmt: skip
        qa, ka, n_fb = ax["QA"], ax["KA"], triton.cdiv(B * H * ax["G"], block_r)
        sizes = (qa, ka, ax["INNER"], ax["G"])
        # one launch per head-dim chunk (its columns are independent): no padding of 96 to 128
        for d_off, bd in chunks_d:
            _relq_dq_kernel[(qa * n_fb,)](
                drel, ax["table"], ax["idx"], dq, H, B * H, Nq, nqs, D, *sizes, OFF=ax["OFF"],
                BLOCK_D=bd, D_OFF=d_off, **meta,
            )  # fmt: skip
        # the flattened (b, h, row) pairs of each coordinate split into chunks of whole
        # BLOCK_R row blocks (a chunk may start and end inside a (b, h) pair) so that about
        # _TABLE_PROGRAMS programs run (four per SM on 132 SMs), never more chunks than row
        # blocks; their shares are summed
        n_yb = triton.cdiv(ka, block_y)
        per_chunk = triton.cdiv(n_fb, min(n_fb, triton.cdiv(_TABLE_PROGRAMS, qa * n_yb)))
        chunks = triton.cdiv(n_fb, per_chunk)
        if B * H * ax["G"] + per_chunk * block_r >= 2**31:
            raise ValueError(f"rel-pos table gradient: {B * H * ax['G']} rows per coordinate "
                             "overflow the kernel's int32 row index")  # fmt: skip
        dr = torch.empty((chunks, qa, ka, D), dtype=acc, device=q.device)
        # the key columns as M where they fill a warpgroup's 64 rows (the head dim unpadded,
        # as N); else the head dim as M, one padded block
        y_as_m = block_y >= 64 or (dispatch.interpreting() and ka > block_y)
        table_d = dict(BLOCK_D=bd1, BLOCK_D2=max(bd2, 16), SPLIT=bd2 > 0) if y_as_m else (
            dict(BLOCK_D=_block_d(D), BLOCK_D2=16, SPLIT=False))  # fmt: skip
        _relq_table_kernel[(qa * n_yb, chunks)](
            drel, q, dr, *q.stride(), H, B * H, nqs, D, *sizes, per_chunk, OFF=ax["OFF"],
            Y_AS_M=y_as_m, **table_d, **meta,
        )  # fmt: skip
        dt = torch.zeros(ax["table"].shape, dtype=acc, device=q.device)
        dt.index_add_(0, ax["idx"].reshape(-1), (dr.sum(0) if chunks > 1 else dr[0]).reshape(-1, D))
        dtables.append(dt.to(ax["table"].dtype))
    return dtables
