"""Fused attention with MViTv2's decomposed relative-position bias.

Semantics (timm ``mvitv2.py`` ``cal_rel_pos_type``; SlowFast's 3-D
``cal_rel_pos_spatial`` / ``cal_rel_pos_temporal``)::

    q: (B, H, Nq, D), k, v: (B, H, Nk, D)
    Nq = has_cls + prod(q_grid), Nk = has_cls + prod(k_grid), grids of 1-3 axes
    spatial tokens flattened row-major over the grid, after the optional CLS token
    rel_tables[a]: (2 max(q_grid[a], k_grid[a]) - 1, D), shared by all heads
    dist_a(x, y) = long(x * max(ka/qa, 1) - y * max(qa/ka, 1) + (ka - 1) * max(qa/ka, 1))
                   (float32 arithmetic, truncated, as timm's ``dist.long()``)
    bias[i, j]   = sum_a q_i . rel_tables[a][dist_a(i_a, j_a)]   (0 on the CLS row/column)
    S            = q k^T * scale + bias                           (bias not scaled: MViTv2's code)
    out          = softmax(S) v + (q if residual else 0)
    residual_cls: True adds q on every row (timm's image MViTv2); False leaves the
    CLS row without it (SlowFast / torchvision, ``x[:, :, 1:] += q[:, :, 1:]``)

An empty ``rel_tables`` means no bias (plain attention with the residual).

Design of the Triton path. The bias factorises through the small tensor

    relq_a[b, h, i, y] = q_i . R_a[dist_a(i_a, y)],  y < k_grid[a]    (B, H, Nq - cls, ka)

so ``bias[i, j] = sum_a relq_a[i, j_a]``. relq (all axes side by side:
(B, H, Nq - cls, sum_a ka)) is built once by ``_relq_kernel``: the queries that
share their coordinate x on axis a share the table rows R_a[dist_a(x, :)], so
each axis is a batch of small matmuls (its cost is O(Nq sum_a ka D), a fraction
of Q K^T); the forward saves it for the backward. Every key grid is treated as
3-D (K0, K1, K2) with leading size-1 axes. The attention is the
flash-attention v2 scheme (Triton tutorial ``06-fused-attention``; Dao,
"FlashAttention-2", 2023): online softmax in fp32, P V, log-sum-exp saved,
residual q added in the epilogue. No Nq x Nk tensor exists, forward or backward.

How a tile gets its bias, without a per-element gather (the kernels choose at
compile time; the compile gate ``benchmarks/compile_gate.py`` checks the result):

- The CLS key is peeled off the key loops (forward: it seeds the online softmax;
  backward: its column of P and dS is computed by the delta kernel), so key tiles
  start at multiples of BLOCK_N in the *spatial* key grid. The CLS query is peeled
  off the row blocks the same way: its row (plain attention, no bias) is computed on
  the CUDA cores by the first row block's program of the forward and dQ kernels, and
  its column of P^T and dS^T by each dK/dV program, so the spatial rows fill whole
  blocks (MAT's 2^k + 1 queries run as 2^k rows, not 2^k + 64).
- Aligned (K2 % BLOCK_N == 0, e.g. MAT's time axis of 128/64/32 keys): a tile lies
  inside one row of the fastest axis, so its relq_2 columns are one contiguous
  (BLOCK_M, BLOCK_N) block load, and the slower coordinates are constant: one
  relq column each, broadcast along the tile.
- Short axes (every used k_a <= 64, e.g. MViTv2-B's 8 x 7 x 7 keys): the
  (BLOCK_M, W_a) relq columns of the row block stay in registers for the whole
  loop and the tile's bias is ``sum_a relq_a @ onehot_a`` on the tensor cores
  (onehot_a: (W_a, BLOCK_N), W_a = max(16, next_pow2(k_a))), the idea of
  SAM-fast's flash_4 kernel generalised to any grid. Where the packed columns are
  narrower than the per-axis windows (MViTv2-B's 8 + 7 + 7 = 22 keys: 32 against
  3 x 16), the bias is one matmul of the row's packed relq columns with a multi-hot
  (column OFF_a + j_a set for each axis a), and dQ's d_relq one ``dS @ multihot^T``.
- Otherwise (an axis longer than 64 that BLOCK_N does not divide): the general
  per-element gather, kept for correctness on irregular grids.

Backward recomputes P from the log-sum-exp: delta = rowsum(dO * O), O the
attention output without the residual (the forward writes it beside the output:
out - q, rounded after the add, loses precision as |q| grows); the delta kernel
also computes the CLS key's column and its dK, dV shares per row block; a
key-block-parallel kernel computes dK, dV; a query-block-parallel kernel computes dQ and
d_relq_a[i, y] = sum_{j: j_a = y} dS[i, j], without atomics on the first two
paths: aligned tiles loop over the fastest axis' column blocks outside and its
rows inside, so d_relq_2 is a register accumulator stored once per column block
and each tile's row sum (the slow axes' share, slow axes <= 64) is added to
(BLOCK_M, W_a) register accumulators; short axes accumulate
``dS @ onehot_a^T`` in registers. The gather path keeps its windowed ``dS @
onehot`` sums flushed with atomics. The two backward kernels both recompute
Q K^T and dO V^T: a single FlashAttention-2 pass over the keys would need
atomics for dQ and for d_relq on every path. The gradients of q (through relq)
and of the tables, ``d_relq . R`` and ``d_relq^T q``, are the same grouped
matmuls (``_relq_dq_kernel`` updates dq in place; ``_relq_table_kernel`` reduces
over (b, h) and rows in registers, in chunks of the flattened (b, h, row) range
sized to fill the GPU, summed, then an ``index_add`` into the tables). No PyTorch
op around the kernels touches an O(Nq D) tensor except the CLS column's assignment.
Saved for backward: q, k, v, O (without the residual; ``out`` when there is none),
lse (B, H, Nq) and the tables; the backward rebuilds relq from q and the tables.

Numerics: scores, softmax and all accumulators are fp32 (fp64 for fp64
inputs); relq is computed in the input dtype, like PyTorch's own path; for
16-bit inputs P and dS are rounded to the input dtype before the P V and
dS K matmuls (as flash-attention) and dS is rounded to tf32 for the d_relq
sums. Two steps add in an order that can vary between runs, so those gradients can
differ in the last bits from run to run: the gather path's atomics into d_relq (and so
into dq and the tables' gradients), and the final ``index_add_`` of the tables'
gradients, which on CUDA adds with atomics (PyTorch documents it as non-deterministic
there). dq, dk and dv are otherwise deterministic; so are the split dK/dV launch's
shares (summed by ``torch.sum``). fp32 inputs run the reference on CUDA (``dispatch.FP32_ON_CUDA``).

File layout follows flash-attention's ``ops/triton/layer_norm.py``: kernels,
launchers, :func:`relpos_attention_ref`, ``torch.library`` custom ops
``mmt_fast::relpos_attention_fwd`` / ``mmt_fast::relpos_attention_bwd`` with
fake implementations, the autograd formula (``register_autograd``, which wraps
the op in a ``torch.autograd.Function`` that ``torch.compile`` and FakeTensor
tracing see through, saved tensors included), and the public entry point
:func:`relpos_attention`, which dispatches through :mod:`mmt_fast.kernels.dispatch`.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import dispatch, tuning
from ._common import acc_dtype, aligned, tl_acc_dtype
from ._relq import (  # the relq kernels and the per-tile bias helpers
    _LOG2E,
    Grid,
    _block_d,
    _block_d_split,
    _dot_precision,
    _onehots,
    _rel_windows,
    _relq_backward,
    _relq_packed,
    _scores,
    rel_pos_index,
)
from ._triton import tl, triton

OP_NAME = "relpos_attention"
_MAX_HEAD_DIM = 256
_AXES = "xyz"


# ----------------------------------------------------------------------------- reference


def _relq(
    q_sp: torch.Tensor, rel_tables: Sequence[torch.Tensor], q_grid: Grid, k_grid: Grid
) -> list[torch.Tensor]:
    """relq_a = q_i . R_a[dist_a(i_a, y)] for each axis a.

    q_sp: (B, H, prod(q_grid), D) spatial queries. Returns one
    (B, H, *q_grid, k_grid[a]) tensor per axis.
    """
    B, H, _, D = q_sp.shape
    axes = _AXES[: len(q_grid)]
    r_q = q_sp.reshape(B, H, *q_grid, D)
    out = []
    for a, table in enumerate(rel_tables):
        r = table[rel_pos_index(q_grid[a], k_grid[a], q_sp.device)]  # (qa, ka, D)
        out.append(torch.einsum(f"bh{axes}d,{axes[a]}kd->bh{axes}k", r_q, r))
    return out


def relpos_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
    scale: float,
    residual: bool = True,
    residual_cls: bool = True,
) -> torch.Tensor:
    """PyTorch reference: softmax(q k^T * scale + bias) v (+ q), the bias built in memory.

    Shapes and formula as in the module docstring; returns (B, H, Nq, D) in q's dtype.
    This is the CPU path and the test oracle; it allocates (B, H, Nq, Nk).
    """
    attn = (q * scale) @ k.transpose(-2, -1)
    if len(rel_tables):
        B, H, _, _ = q.shape
        cls = int(has_cls)
        nd = len(q_grid)
        bias = q.new_zeros((B, H, *q_grid, *k_grid))
        for a, rel in enumerate(_relq(q[:, :, cls:], rel_tables, q_grid, k_grid)):
            shape = [B, H, *q_grid] + [k_grid[b] if b == a else 1 for b in range(nd)]
            bias = bias + rel.reshape(shape)
        bias = bias.reshape(B, H, math.prod(q_grid), math.prod(k_grid))
        attn = attn + F.pad(bias, (cls, 0, cls, 0))
    out = attn.softmax(dim=-1) @ v
    if not residual:
        return out
    if has_cls and not residual_cls:
        return torch.cat([out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]], dim=2)
    return out + q


# ----------------------------------------------------------------------------- kernels


def _configs(kernel: str) -> list[triton.Config]:
    # Each entry checked by the compile gate (sm_90, bf16/fp16, MAT and MViTv2 shapes): no
    # spills, within shared memory, HGMMA matmuls, no warp duplication (every matmul's M is
    # 64 rows per warpgroup: BLOCK_M 128 with 8 warps, 64 with 4). The first is the pinned one.
    entries = {
        # 1 stage: with 2 the aligned bias (the Q K^T accumulator) serialises wgmma (C7515),
        # also at 64 x 32 with 4 warps (MAT stage 1)
        # on sm_80 (A100) the 64-key tiles spill (4 B at MAT stage 4 and MViTv2-B): 32 there
        "_fwd_kernel": [
            ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 1, "sm90"),
            ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 1, "sm90"),
            ({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 1),
            ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1),
        ],
        # transposed: BLOCK_N keys are every matmul's M, BLOCK_M queries per step; 1 stage
        # (2 draw C7515)
        # (sm_80: 32 queries per step spill 228-240 B; 16 do not)
        "_bwd_dkdv_kernel": [
            ({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 1, "sm90"),
            ({"BLOCK_M": 32, "BLOCK_N": 128}, 8, 1, "sm90"),
            ({"BLOCK_M": 16, "BLOCK_N": 64}, 4, 1, "sm80"),
        ],
    }[kernel]
    rule = _fwd_pin if kernel == "_fwd_kernel" else None
    return tuning.configs(OP_NAME, kernel, entries, ({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 1), rule)


def _fwd_work(args: dict, block_m: int, block_n: int) -> int:
    """The forward's tensor-core work (per 2 multiply-adds) with BLOCK_M x BLOCK_N tiles, for
    the launch's named arguments: padded spatial queries x padded spatial keys (a narrower
    last tile, ``_tail_width``) x (Q K^T and P V over the head dim's chunks + the one-hot or
    multi-hot bias matmul where a tile is not aligned)."""
    nks = args["Nk"] - args["HAS_CLS"]
    aligned = args["USE2"] and args["K2"] % block_n == 0 and args["ALIGN_OK"]
    short = not aligned and args["FULL"] and any(args[f"USE{a}"] for a in range(3))
    onehot = 0
    if short:
        onehot = args["WP"] or sum(args[f"W{a}"] for a in range(3) if args[f"USE{a}"])
    d = args["BLOCK_D"] + args["BLOCK_D2"]
    rows = triton.cdiv(args["Nq"] - args["HAS_CLS"], block_m) * block_m  # CLS row peeled off
    tail = _tail_width(nks, block_n, short)
    keys = nks // block_n * block_n + tail if tail else triton.cdiv(nks, block_n) * block_n
    return rows * keys * (2 * d + onehot)


def _fwd_pin(args: dict, entries: list) -> int:
    """The forward's shape rule (``tuning.pin_index``): the first entry, unless it executes
    over 5% more than the entry that executes least; then the first entry within 1% of that
    (MAT stage 3: 513 queries in 64-row blocks, 576 rows, not 640; stage 4: 64 x 32 tiles,
    which lie inside a row of its 32 time keys, so the bias needs no one-hot matmul;
    MViTv2-B: 392 keys as 416, not 448)."""
    work = [_fwd_work(args, e[0]["BLOCK_M"], e[0]["BLOCK_N"]) for e in entries]
    best = min(work)
    if work[0] <= 1.05 * best:
        return 0
    return next(i for i, w in enumerate(work) if w <= 1.01 * best)


@triton.jit
def _row_block(N, BLOCK: tl.constexpr):
    """(block of N rows, b * H + h) of this program: the grid is one axis of cdiv(N, BLOCK)
    x B H programs (no 65535 limit on B H), consecutive programs sharing (b, h)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK)
    return pid % n_blocks, (pid // n_blocks).to(tl.int64)


@triton.jit
def _cls_key(q, K, V, offs_d, d_in, skd, svd, qk_scale, ACC_DTYPE: tl.constexpr):
    """The CLS key, peeled off the key loop so that key tiles align with the grid:
    (its score in log2 units (BLOCK_M,), k_cls (BLOCK_D,), v_cls (BLOCK_D,))."""
    kc = tl.load(K + offs_d * skd, mask=d_in, other=0.0)
    vc = tl.load(V + offs_d * svd, mask=d_in, other=0.0)
    s = tl.sum(q.to(ACC_DTYPE) * kc.to(ACC_DTYPE)[None, :], 1) * qk_scale
    return s, kc, vc


@triton.jit
def _cls_row_fwd(
    Q, K, V, OUT, O_ATT, LSE, pid_bh, Nq, Nk, D, sqd, skn, skd, svn, svd, qk_scale,
    RESIDUAL: tl.constexpr, RES_FROM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """The CLS query's row, peeled off the row blocks as the CLS key is off the key tiles (so
    that the spatial queries' blocks are not padded by one row): plain attention (no bias on
    the CLS row) of one query against all keys, on the CUDA cores, by the first row block's
    program. Q, K, V point at this (b, h); P is rounded to V's dtype as in the tiles' P V."""
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    qc = tl.load(Q + offs_d * sqd, mask=d_in, other=0.0).to(ACC_DTYPE)
    qc2, acc2 = 0, 0
    if SPLIT:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_in2 = offs_d2 < D
        qc2 = tl.load(Q + offs_d2 * sqd, mask=d_in2, other=0.0).to(ACC_DTYPE)
        acc2 = tl.zeros([BLOCK_D2], dtype=ACC_DTYPE)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=ACC_DTYPE), 0)
    l_sum = tl.sum(tl.zeros([BLOCK_N], dtype=ACC_DTYPE), 0)
    acc = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for start in range(0, Nk, BLOCK_N):
        js = start + offs_n
        col_in = js < Nk
        kb = tl.load(K + js[:, None] * skn + offs_d[None, :] * skd,
                     mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
        s = tl.sum(kb.to(ACC_DTYPE) * qc[None, :], 1)
        if SPLIT:
            kb2 = tl.load(K + js[:, None] * skn + offs_d2[None, :] * skd,
                          mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
            s += tl.sum(kb2.to(ACC_DTYPE) * qc2[None, :], 1)
        s = tl.where(col_in, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        vb = tl.load(V + js[:, None] * svn + offs_d[None, :] * svd,
                     mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
        pr = p.to(vb.dtype).to(ACC_DTYPE)
        acc = acc * alpha + tl.sum(pr[:, None] * vb.to(ACC_DTYPE), 0)
        if SPLIT:
            vb2 = tl.load(V + js[:, None] * svn + offs_d2[None, :] * svd,
                          mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
            acc2 = acc2 * alpha + tl.sum(pr[:, None] * vb2.to(ACC_DTYPE), 0)
        m = m_new
    base = pid_bh * Nq * D
    _cls_row_store(acc / l_sum, qc, OUT, O_ATT, base + offs_d, d_in, RESIDUAL, RES_FROM)
    if SPLIT:
        _cls_row_store(acc2 / l_sum, qc2, OUT, O_ATT, base + offs_d2, d_in2, RESIDUAL, RES_FROM)
    tl.store(LSE + pid_bh * Nq, m + tl.log2(l_sum))


@triton.jit
def _cls_row_store(o, qc, OUT, O_ATT, off, d_in, RESIDUAL: tl.constexpr, RES_FROM: tl.constexpr):
    """The CLS row's epilogue for one head-dim chunk: O_ATT without the residual, OUT with it
    (unless ``residual_cls`` is False: RES_FROM 1)."""
    if RESIDUAL:
        tl.store(O_ATT + off, o.to(O_ATT.dtype.element_ty), mask=d_in)
        if RES_FROM == 0:
            o += qc
    tl.store(OUT + off, o.to(OUT.dtype.element_ty), mask=d_in)


@triton.jit
def _fwd_store(
    acc, l_i, Q, O_ATT, OUT, pid_bh, rows, row_in, offs_d, d_in, sqn, sqd, Nq, D,
    RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """The forward's epilogue for the head-dim columns offs_d of spatial rows (the CLS row's
    is ``_cls_row_store``): normalise; with the residual, store the output without it to
    O_ATT and add q (read again rather than kept live through the loop: it spilled at 255
    registers); store the output."""
    acc = acc / l_i[:, None]
    mask = row_in[:, None] & d_in[None, :]
    off = pid_bh * Nq * D + rows[:, None] * D + offs_d[None, :]
    if RESIDUAL:
        tl.store(O_ATT + off, acc.to(O_ATT.dtype.element_ty), mask=mask)
        q_res = tl.load(Q + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=mask, other=0.0)
        acc += q_res.to(ACC_DTYPE)
    tl.store(OUT + off, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.constexpr_function
def _tail_width(n_keys, block_n, short):
    """Width of a last, narrower key tile (0: none): on the short-axes path (``short``; its
    spatial keys are K0 K1 K2) where whole tiles of ``block_n`` leave at most 16 or 32 keys,
    the last tile is 16 or 32 wide instead of ``block_n`` (MViTv2-B's 392 keys: 12 tiles of
    32, then 16 for the last 8; 400 columns, not 416)."""
    rem = n_keys % block_n
    for width in (16, 32):
        if short and 0 < rem <= width < block_n:
            return width
    return 0


@triton.jit
def _fwd_tile(
    q, q2, K, V, start, js, NKS, m_i, l_i, acc, acc2, offs_d, d_in, offs_d2, d_in2,
    skn, skd, svn, svd, qk_scale, rel_rows, row_sp, r0, r1, r2,
    ALIGNED: tl.constexpr, FULL: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    K2: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, PK: tl.constexpr,
    WP: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One key tile (keys js, as wide as js) of the forward's online softmax: scores with
    their bias, the running max and sum, P V into the accumulators (per head-dim chunk)."""
    col_in = js < NKS
    kt = tl.load(K + js[None, :] * skn + offs_d[:, None] * skd,
                 mask=col_in[None, :] & d_in[:, None], other=0.0)  # fmt: skip
    kt2 = 0
    if SPLIT:
        kt2 = tl.load(K + js[None, :] * skn + offs_d2[:, None] * skd,
                      mask=col_in[None, :] & d_in2[:, None], other=0.0)  # fmt: skip
    oh0, oh1, oh2 = 0, 0, 0
    if not ALIGNED and FULL:
        oh0, oh1, oh2 = _onehots(js, q.dtype, K0, K1, K2, W0, W1, W2, USE0, USE1, USE2, PK, WP,
                                 OFF0, OFF1, OFF2)  # fmt: skip
    s = _scores(q, kt, q2, kt2, qk_scale, rel_rows, row_sp, start, js, col_in, r0, r1, r2, oh0, oh1,
                oh2, ALIGNED, FULL, K1, K2, USE0, USE1, USE2, OFF0, OFF1, OFF2, ACC_DTYPE,
                DOT_PRECISION, False, SPLIT, PK)  # fmt: skip
    s = tl.where(col_in[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    vb = tl.load(V + js[:, None] * svn + offs_d[None, :] * svd,
                 mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
    # the rescaled accumulator is the dot's own (no second accumulator in registers)
    acc = tl.dot(p.to(vb.dtype), vb, acc * alpha[:, None], input_precision=DOT_PRECISION,
                 out_dtype=ACC_DTYPE)  # fmt: skip
    if SPLIT:
        vb2 = tl.load(V + js[:, None] * svn + offs_d2[None, :] * svd,
                      mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
        acc2 = tl.dot(p.to(vb2.dtype), vb2, acc2 * alpha[:, None],
                      input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)  # fmt: skip
    return m_new, l_i, acc, acc2


@triton.autotune(
    configs=_configs("_fwd_kernel"),
    key=["Nq", "Nk", "BH", "BLOCK_D"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _fwd_kernel(
    Q, K, V, REL, OUT, O_ATT, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    H, BH, Nq, Nk, D, qk_scale,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, KSUM: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, FULL: tl.constexpr, WP: tl.constexpr,
    ALIGN_OK: tl.constexpr,
    RESIDUAL: tl.constexpr, RES_FROM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_M queries against all keys; with the residual, O_ATT gets the output
    before "+ q" (the backward's delta is computed from it). BLOCK_D2 > 0: the head dim is two
    chunks, columns [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2) (96 = 64 + 32)."""
    NQS = Nq - HAS_CLS
    pid_m, pid_bh = _row_block(NQS, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    ALIGNED: tl.constexpr = USE2 and (K2 % BLOCK_N == 0) and ALIGN_OK
    PK: tl.constexpr = WP > 0 and not ALIGNED and FULL  # the packed short-axes bias
    if HAS_CLS:
        if pid_m == 0:
            _cls_row_fwd(Q, K, V, OUT, O_ATT, LSE, pid_bh, Nq, Nk, D, sqd, skn, skd, svn, svd,
                         qk_scale, RESIDUAL, RES_FROM, ACC_DTYPE, BLOCK_N, BLOCK_D, BLOCK_D2)  # fmt: skip

    # the row blocks cover the spatial queries only (the CLS row is peeled off above)
    rows = HAS_CLS + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = rows < Nq
    d_in = offs_d < D
    row_sp = row_in
    rel_bh = REL + pid_bh * NQS * KSUM
    rel_rows = rel_bh + (rows - HAS_CLS) * KSUM

    SPLIT: tl.constexpr = BLOCK_D2 > 0
    q = tl.load(
        Q + rows[:, None] * sqn + offs_d[None, :] * sqd,
        mask=row_in[:, None] & d_in[None, :],
        other=0.0,
    )
    q2, acc2, offs_d2, d_in2 = 0, 0, 0, 0
    if SPLIT:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_in2 = offs_d2 < D
        q2 = tl.load(Q + rows[:, None] * sqn + offs_d2[None, :] * sqd,
                     mask=row_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
    if HAS_CLS:
        m_i, _kc, vc = _cls_key(q, K, V, offs_d, d_in, skd, svd, qk_scale, ACC_DTYPE)
        l_i = tl.full([BLOCK_M], 1.0, dtype=ACC_DTYPE)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE) + vc.to(ACC_DTYPE)[None, :]
        if SPLIT:
            m_2, _kc2, vc2 = _cls_key(q2, K, V, offs_d2, d_in2, skd, svd, qk_scale, ACC_DTYPE)
            m_i += m_2
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=ACC_DTYPE) + vc2.to(ACC_DTYPE)[None, :]
        K += skn
        V += svn
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
        l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
        if SPLIT:
            acc2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=ACC_DTYPE)
    r0, r1, r2 = 0, 0, 0
    if not ALIGNED and FULL:
        # Every axis is short (<= 64): its relq columns stay in registers for the whole loop
        # and the bias of a tile is sum_a relq_a @ onehot_a, on the tensor cores (PK: one
        # matmul over the packed columns).
        r0, r1, r2 = _rel_windows(rel_rows, row_sp, K0, K1, K2, W0, W1, W2, OFF0, OFF1, OFF2,
                                  USE0, USE1, USE2, PK, WP, KSUM)  # fmt: skip
    NKS = Nk - HAS_CLS
    SHORT: tl.constexpr = (not ALIGNED) and FULL and (USE0 or USE1 or USE2)
    TAIL_N: tl.constexpr = _tail_width(K0 * K1 * K2, BLOCK_N, SHORT)
    n_main = NKS
    if TAIL_N > 0:  # whole tiles, then the last keys in a narrower one (_tail_width)
        n_main = K0 * K1 * K2 // BLOCK_N * BLOCK_N
    for start in range(0, n_main, BLOCK_N):
        m_i, l_i, acc, acc2 = _fwd_tile(
            q, q2, K, V, start, start + offs_n, NKS, m_i, l_i, acc, acc2, offs_d, d_in,
            offs_d2, d_in2, skn, skd, svn, svd, qk_scale, rel_rows, row_sp, r0, r1, r2,
            ALIGNED, FULL, K0, K1, K2, W0, W1, W2, USE0, USE1, USE2, OFF0, OFF1, OFF2, PK, WP,
            ACC_DTYPE, DOT_PRECISION, SPLIT,
        )  # fmt: skip
    if TAIL_N > 0:
        m_i, l_i, acc, acc2 = _fwd_tile(
            q, q2, K, V, n_main, n_main + tl.arange(0, TAIL_N), NKS, m_i, l_i, acc, acc2, offs_d,
            d_in, offs_d2, d_in2, skn, skd, svn, svd, qk_scale, rel_rows, row_sp, r0, r1, r2,
            ALIGNED, FULL, K0, K1, K2, W0, W1, W2, USE0, USE1, USE2, OFF0, OFF1, OFF2, PK, WP,
            ACC_DTYPE, DOT_PRECISION, SPLIT,
        )  # fmt: skip

    _fwd_store(acc, l_i, Q, O_ATT, OUT, pid_bh, rows, row_in, offs_d, d_in, sqn, sqd, Nq, D,
               RESIDUAL, ACC_DTYPE)  # fmt: skip
    if SPLIT:
        _fwd_store(acc2, l_i, Q, O_ATT, OUT, pid_bh, rows, row_in, offs_d2, d_in2, sqn, sqd, Nq,
                   D, RESIDUAL, ACC_DTYPE)  # fmt: skip
    tl.store(LSE + pid_bh * Nq + rows, m_i + tl.log2(l_i), mask=row_in)


@triton.jit
def _bwd_delta_kernel(
    OATT, DO, Q, K, V, LSE, DELTA, DS_CLS, DKV_CLS,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    DQ, H, Nq, Nk, D, sm_scale, qk_scale,
    HAS_CLS: tl.constexpr, RESIDUAL: tl.constexpr, RES_FROM: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    CLS_N: tl.constexpr, CLS_D: tl.constexpr, CLS_D2: tl.constexpr,
):  # fmt: skip
    """delta[i] = sum_d dO[i, d] O[i, d] = rowsum(dP * P), O the attention output without the
    residual; with a CLS token also the CLS key's column, peeled off the other kernels:
    dS[i, cls] = P (dP - delta), and this block's shares of dV_cls = sum_i P[i, cls] dO_i and
    dK_cls = sum_i dS[i, cls] q_i (P, dS rounded to the input dtype as in the matmuls),
    stored to DKV_CLS (B H, row blocks, 2, D) for the launcher's short sum; and the CLS
    query's row of dQ (the first block's program, ``_cls_row_dq``: keys in tiles of CLS_N,
    the head dim in chunks CLS_D + CLS_D2)."""
    pid_m, pid_bh = _row_block(Nq, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    mask = row_in[:, None] & d_in[None, :]
    o = tl.load(
        OATT + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0
    ).to(ACC_DTYPE)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd, mask=mask,
                 other=0.0)  # fmt: skip
    delta = tl.sum(o * do.to(ACC_DTYPE), 1)
    tl.store(DELTA + pid_bh * Nq + rows, delta, mask=row_in)
    if HAS_CLS:
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=mask, other=0.0)  # fmt: skip
        s, _kc, vc = _cls_key(q, K + b * skb + h * skh, V + b * svb + h * svh, offs_d, d_in,
                              skd, svd, qk_scale, ACC_DTYPE)  # fmt: skip
        lse = tl.load(LSE + pid_bh * Nq + rows, mask=row_in, other=0.0)
        p = tl.where(row_in, tl.exp2(s - lse), 0.0)
        dp = tl.sum(do.to(ACC_DTYPE) * vc.to(ACC_DTYPE)[None, :], 1)
        ds = p * (dp - delta)
        tl.store(DS_CLS + pid_bh * Nq + rows, ds, mask=row_in)
        dv_c = tl.sum(p.to(do.dtype).to(ACC_DTYPE)[:, None] * do.to(ACC_DTYPE), 0)
        dk_c = tl.sum(ds.to(q.dtype).to(ACC_DTYPE)[:, None] * q.to(ACC_DTYPE), 0)
        part = DKV_CLS + (pid_bh * tl.cdiv(Nq, BLOCK_M) + pid_m) * 2 * D
        tl.store(part + offs_d, dv_c, mask=d_in)
        tl.store(part + D + offs_d, dk_c, mask=d_in)
        if pid_m == 0:  # row 0, the CLS query, is in this block
            first = rows == 0
            lse_c = tl.sum(tl.where(first, lse, 0.0), 0)
            delta_c = tl.sum(tl.where(first, delta, 0.0), 0)
            _cls_row_dq(Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh,
                        DO + b * sdb + h * sdh, DQ, lse_c, delta_c, pid_bh, Nq, Nk, D, sqd, skn,
                        skd, svn, svd, sdd, sm_scale, qk_scale, RESIDUAL, RES_FROM, ACC_DTYPE,
                        CLS_N, CLS_D, CLS_D2)  # fmt: skip


@triton.jit
def _cls_query(Q, DO, offs_d, d_in, offs_d2, d_in2, sqd, sdd, SPLIT: tl.constexpr):
    """The CLS query's row (Q, DO point at this (b, h)): (q, dO, q2, dO2), the second chunks
    0 without a split head dim."""
    qc = tl.load(Q + offs_d * sqd, mask=d_in, other=0.0)
    doc = tl.load(DO + offs_d * sdd, mask=d_in, other=0.0)
    qc2, doc2 = 0, 0
    if SPLIT:
        qc2 = tl.load(Q + offs_d2 * sqd, mask=d_in2, other=0.0)
        doc2 = tl.load(DO + offs_d2 * sdd, mask=d_in2, other=0.0)
    return qc, doc, qc2, doc2


@triton.jit
def _cls_query_col(
    kb, vb, kb2, vb2, qc, doc, qc2, doc2, lse, delta, col_in, qk_scale, use,
    ACC_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """The CLS query's P and dS against a block of keys (the CLS row is peeled off the
    backward's query blocks; no bias on it), on the CUDA cores, rounded to the input dtype
    as the tiles' P and dS are before their matmuls; zero where ``use`` is False."""
    s = tl.sum(kb.to(ACC_DTYPE) * qc.to(ACC_DTYPE)[None, :], 1)
    dp = tl.sum(vb.to(ACC_DTYPE) * doc.to(ACC_DTYPE)[None, :], 1)
    if SPLIT:
        s += tl.sum(kb2.to(ACC_DTYPE) * qc2.to(ACC_DTYPE)[None, :], 1)
        dp += tl.sum(vb2.to(ACC_DTYPE) * doc2.to(ACC_DTYPE)[None, :], 1)
    p = tl.where(col_in & use, tl.exp2(s * qk_scale - lse), 0.0)
    ds = p * (dp - delta)
    return p.to(doc.dtype).to(ACC_DTYPE), ds.to(qc.dtype).to(ACC_DTYPE)


@triton.jit
def _cls_row_dq(
    Q, K, V, DO, DQ, lse, delta, pid_bh, Nq, Nk, D, sqd, skn, skd, svn, svd, sdd, sm_scale,
    qk_scale, RESIDUAL: tl.constexpr, RES_FROM: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """dQ of the CLS query (peeled off the dQ kernel's row blocks), by the delta kernel's
    first program: dq = scale * sum_j dS[cls, j] k_j (+ dO) over all keys, CLS key included,
    on the CUDA cores (dS rounded to the input dtype as in the tiles' dS K). Q, K, V, DO
    point at this (b, h); lse, delta: the CLS row's. (In the dQ kernel's first program it
    spilled on sm_80: 28 B at MViTv2-B.)"""
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    offs_d2, d_in2, dq2 = 0, 0, 0
    if SPLIT:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_in2 = offs_d2 < D
        dq2 = tl.zeros([BLOCK_D2], dtype=ACC_DTYPE)
    dq = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    qc, doc, qc2, doc2 = _cls_query(Q, DO, offs_d, d_in, offs_d2, d_in2, sqd, sdd, SPLIT)
    for start in range(0, Nk, BLOCK_N):
        js = start + offs_n
        col_in = js < Nk
        kb = tl.load(K + js[:, None] * skn + offs_d[None, :] * skd,
                     mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
        vb = tl.load(V + js[:, None] * svn + offs_d[None, :] * svd,
                     mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
        kb2, vb2 = 0, 0  # (loop-local: assigned in every trip)
        if SPLIT:
            kb2 = tl.load(K + js[:, None] * skn + offs_d2[None, :] * skd,
                          mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
            vb2 = tl.load(V + js[:, None] * svn + offs_d2[None, :] * svd,
                          mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
        _p, ds = _cls_query_col(kb, vb, kb2, vb2, qc, doc, qc2, doc2, lse, delta, col_in,
                                qk_scale, True, ACC_DTYPE, SPLIT)  # fmt: skip
        dq += tl.sum(ds[:, None] * kb.to(ACC_DTYPE), 0)
        if SPLIT:
            dq2 += tl.sum(ds[:, None] * kb2.to(ACC_DTYPE), 0)
    _cls_dq_store(dq, doc, DQ, pid_bh * Nq * D + offs_d, d_in, sm_scale, RESIDUAL, RES_FROM,
                  ACC_DTYPE)  # fmt: skip
    if SPLIT:
        _cls_dq_store(dq2, doc2, DQ, pid_bh * Nq * D + offs_d2, d_in2, sm_scale, RESIDUAL,
                      RES_FROM, ACC_DTYPE)  # fmt: skip


@triton.jit
def _cls_dq_store(dq, doc, DQ, off, d_in, sm_scale, RESIDUAL: tl.constexpr,
                  RES_FROM: tl.constexpr, ACC_DTYPE: tl.constexpr):  # fmt: skip
    """The CLS row's dQ epilogue for one head-dim chunk: scale, the residual's dO."""
    dq = dq * sm_scale
    if RESIDUAL and RES_FROM == 0:
        dq += doc.to(ACC_DTYPE)
    tl.store(DQ + off, dq.to(DQ.dtype.element_ty), mask=d_in)


@triton.autotune(
    configs=_configs("_bwd_dkdv_kernel"),
    key=["Nq", "Nk", "BH", "BLOCK_D"],
    prune_configs_by={"early_config_prune": tuning.early_prune},
)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, REL, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    H, BH, Nq, Nk, D, sm_scale, qk_scale,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, KSUM: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, FULL: tl.constexpr, WP: tl.constexpr,
    ALIGN_OK: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """dV = P^T dO, dK = scale * dS^T Q for one block of spatial keys, looping over the query
    blocks of this program's share (grid axis 1 splits the queries into equal runs of
    blocks, so that a launch with few key blocks still fills the GPU; PARTIAL: DK, DV are the
    fp32 shares (splits, BH, Nk, D), summed by the launcher). The CLS key's dK, dV come from
    the delta kernel; BLOCK_D2 > 0: the head dim in two chunks, as in the forward."""
    pid_n, pid_bh = _row_block(Nk - HAS_CLS, BLOCK_N)
    split = tl.program_id(1)
    NQS = Nq - HAS_CLS
    # the query blocks cover the spatial rows; the CLS row is added on the CUDA cores below
    per_split = tl.cdiv(tl.cdiv(NQS, BLOCK_M), tl.num_programs(1)) * BLOCK_M
    q_lo = HAS_CLS + split * per_split
    q_hi = tl.minimum(q_lo + per_split, Nq)
    b = pid_bh // H
    h = pid_bh % H
    Q += b * sqb + h * sqh
    K += b * skb + h * skh + HAS_CLS * skn
    V += b * svb + h * svh + HAS_CLS * svn
    DO += b * sdb + h * sdh
    rel_bh = REL + pid_bh * NQS * KSUM
    ALIGNED: tl.constexpr = USE2 and (K2 % BLOCK_N == 0) and ALIGN_OK
    PK: tl.constexpr = WP > 0 and not ALIGNED and FULL  # the packed short-axes bias

    NKS = Nk - HAS_CLS
    start = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    js = start + offs_n
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = js < NKS
    d_in = offs_d < D
    kv_mask = col_in[:, None] & d_in[None, :]
    kb = tl.load(K + js[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    vb = tl.load(V + js[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    kb2, vb2, dk2, dv2, offs_d2, d_in2 = 0, 0, 0, 0, 0, 0
    if SPLIT:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_in2 = offs_d2 < D
        kv_mask2 = col_in[:, None] & d_in2[None, :]
        kb2 = tl.load(K + js[:, None] * skn + offs_d2[None, :] * skd, mask=kv_mask2, other=0.0)
        vb2 = tl.load(V + js[:, None] * svn + offs_d2[None, :] * svd, mask=kv_mask2, other=0.0)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=ACC_DTYPE)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=ACC_DTYPE)
    else:  # (assigned in the loop otherwise)
        qt2 = 0
    oh0, oh1, oh2 = 0, 0, 0
    if ALIGNED or not FULL:
        r0, r1, r2 = 0, 0, 0
    if not ALIGNED and FULL:
        oh0, oh1, oh2 = _onehots(js, kb.dtype, K0, K1, K2, W0, W1, W2, USE0, USE1, USE2, PK, WP,
                                 OFF0, OFF1, OFF2)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    if HAS_CLS:  # the CLS query's share, once (by the first run of query blocks)
        qc, doc, qc2, doc2 = _cls_query(Q, DO, offs_d, d_in, offs_d2, d_in2, sqd, sdd, SPLIT)
        lse_c = tl.load(LSE + pid_bh * Nq)
        delta_c = tl.load(DELTA + pid_bh * Nq)
        p_c, ds_c = _cls_query_col(kb, vb, kb2, vb2, qc, doc, qc2, doc2, lse_c, delta_c, col_in,
                                   qk_scale, split == 0, ACC_DTYPE, SPLIT)  # fmt: skip
        dv += p_c[:, None] * doc.to(ACC_DTYPE)[None, :]
        dk += ds_c[:, None] * qc.to(ACC_DTYPE)[None, :]
        if SPLIT:
            dv2 += p_c[:, None] * doc2.to(ACC_DTYPE)[None, :]
            dk2 += ds_c[:, None] * qc2.to(ACC_DTYPE)[None, :]
    for start_m in range(q_lo, q_hi, BLOCK_M):
        rows = start_m + offs_m
        row_in = rows < Nq
        row_sp = row_in  # (the query blocks cover spatial rows only)
        qd_mask = row_in[:, None] & d_in[None, :]
        q = tl.load(Q + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * sdn + offs_d[None, :] * sdd, mask=qd_mask, other=0.0)
        lse = tl.load(LSE + pid_bh * Nq + rows, mask=row_in, other=0.0)
        delta = tl.load(DELTA + pid_bh * Nq + rows, mask=row_in, other=0.0)
        rel_rows = rel_bh + (rows - HAS_CLS) * KSUM
        if not ALIGNED and FULL:
            r0, r1, r2 = _rel_windows(rel_rows, row_sp, K0, K1, K2, W0, W1, W2, OFF0, OFF1, OFF2,
                                      USE0, USE1, USE2, PK, WP, KSUM)  # fmt: skip
        if SPLIT:
            qd_mask2 = row_in[:, None] & d_in2[None, :]
            q2 = tl.load(Q + rows[:, None] * sqn + offs_d2[None, :] * sqd, mask=qd_mask2,
                         other=0.0)  # fmt: skip
            do2 = tl.load(DO + rows[:, None] * sdn + offs_d2[None, :] * sdd, mask=qd_mask2,
                          other=0.0)  # fmt: skip
            qt2 = tl.trans(q2)
        # Transposed (keys x rows): P^T and dS^T are the register operands of the dV, dK
        # matmuls as they come, and every matmul's M is BLOCK_N.
        st = _scores(kb, tl.trans(q), kb2, qt2, qk_scale, rel_rows, row_sp, start, js, col_in, r0, r1, r2,
                     oh0, oh1, oh2, ALIGNED, FULL, K1, K2, USE0, USE1, USE2, OFF0, OFF1, OFF2, ACC_DTYPE,
                     DOT_PRECISION, True, SPLIT, PK)  # fmt: skip
        pt = tl.where(col_in[:, None] & row_in[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dpt = tl.dot(vb, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if SPLIT:
            dv2 = tl.dot(pt.to(do2.dtype), do2, dv2, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)  # fmt: skip
            dpt = tl.dot(vb2, tl.trans(do2), dpt, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)  # fmt: skip
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if SPLIT:
            dk2 = tl.dot(dst.to(q2.dtype), q2, dk2, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)  # fmt: skip

    if PARTIAL:
        DK += split.to(tl.int64) * BH * Nk * D
        DV += split.to(tl.int64) * BH * Nk * D
    out_off = pid_bh * Nk * D + (HAS_CLS + js[:, None]) * D + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if SPLIT:
        out_off2 = pid_bh * Nk * D + (HAS_CLS + js[:, None]) * D + offs_d2[None, :]
        tl.store(DK + out_off2, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=kv_mask2)
        tl.store(DV + out_off2, dv2.to(DV.dtype.element_ty), mask=kv_mask2)


@triton.jit
def _accumulate_drel_atomic(
    drel_rows, row_sp, ds, js, js0, col_sp,
    OFF: tl.constexpr, KA: tl.constexpr, STRIDE: tl.constexpr, DIRECT: tl.constexpr,
    W: tl.constexpr, ACC_DTYPE: tl.constexpr, REL_PRECISION: tl.constexpr,
):  # fmt: skip
    """Gather fallback: d_relq[i, OFF + y] += sum over this tile's keys with j_a = y of dS[i, j]."""
    c = (js // STRIDE) % KA
    if DIRECT:
        # ka >= BLOCK_N on the fastest axis: the tile's keys have distinct j_a.
        mask = row_sp[:, None] & col_sp[None, :]
        tl.atomic_add(drel_rows[:, None] + OFF + c[None, :], ds, mask=mask, sem="relaxed")
    else:
        # u = j_a relative to the tile's first key, mod ka, lies in [0, W): window column u
        # holds one distinct y = (c0 + u) % ka.
        c0 = (js0 // STRIDE) % KA
        u = (c - c0 + KA) % KA
        w = tl.arange(0, W)
        onehot = tl.where((u[:, None] == w[None, :]) & col_sp[:, None], 1.0, 0.0).to(ACC_DTYPE)
        win = tl.dot(ds, onehot, input_precision=REL_PRECISION)
        y = (c0 + w) % KA
        mask = row_sp[:, None] & (w < KA)[None, :]
        tl.atomic_add(drel_rows[:, None] + OFF + y[None, :], win, mask=mask, sem="relaxed")


@triton.jit
def _store_window(drel_rows, row_sp, g, OFF: tl.constexpr, KA: tl.constexpr, W: tl.constexpr):
    """Store a (BLOCK_M, W) register accumulator of d_relq to its KA columns OFF .. OFF + KA."""
    w = tl.arange(0, W)
    tl.store(drel_rows[:, None] + OFF + w[None, :], g.to(drel_rows.dtype.element_ty),
             mask=row_sp[:, None] & (w < KA)[None, :])  # fmt: skip


@triton.jit
def _drel_aligned(ds, r, d2, g0, g1, K1: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                  USE0: tl.constexpr, USE1: tl.constexpr):  # fmt: skip
    """d_relq of an aligned tile (key row r of the slow axes, one column block of the
    fastest): dS adds into the column block's register accumulator d2, and its row sum into
    the slow axes' (the tile's keys share their slow coordinates r % K1, r // K1)."""
    d2 += ds
    if USE1:
        rs = tl.sum(ds, 1)[:, None]
        g1 += tl.where(tl.arange(0, W1)[None, :] == r % K1, rs, 0.0)
        if USE0:
            g0 += tl.where(tl.arange(0, W0)[None, :] == r // K1, rs, 0.0)
    return d2, g0, g1


@triton.jit
def _drel_general(
    ds, js, start, col_in, row_sp, drel_rows, g0, g1, g2, oh0, oh1, oh2, FULL: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
    DIRECT0: tl.constexpr, DIRECT1: tl.constexpr, DIRECT2: tl.constexpr,
    GW0: tl.constexpr, GW1: tl.constexpr, GW2: tl.constexpr,
    ACC_DTYPE: tl.constexpr, REL_PRECISION: tl.constexpr, PK: tl.constexpr,
):  # fmt: skip
    """d_relq of a tile in key order: short axes (FULL) into the (BLOCK_M, W_a) register
    accumulators g_a += dS @ onehot_a^T (PK: g0 += dS @ multihot^T, all packed columns at
    once: the axes' columns are disjoint); otherwise atomics into d_relq."""
    if PK:
        g0 = tl.dot(ds, tl.trans(oh0.to(ACC_DTYPE)), g0, input_precision=REL_PRECISION,
                    out_dtype=ACC_DTYPE)  # fmt: skip
    elif FULL:
        # d_relq_a += dS @ onehot_a^T (dS rounded to tf32 for 16-bit inputs)
        if USE0:
            g0 = tl.dot(
                ds,
                tl.trans(oh0.to(ACC_DTYPE)),
                g0,
                input_precision=REL_PRECISION,
                out_dtype=ACC_DTYPE,
            )
        if USE1:
            g1 = tl.dot(
                ds,
                tl.trans(oh1.to(ACC_DTYPE)),
                g1,
                input_precision=REL_PRECISION,
                out_dtype=ACC_DTYPE,
            )
        if USE2:
            g2 = tl.dot(
                ds,
                tl.trans(oh2.to(ACC_DTYPE)),
                g2,
                input_precision=REL_PRECISION,
                out_dtype=ACC_DTYPE,
            )
    else:
        col_sp = col_in
        if USE0:
            _accumulate_drel_atomic(
                drel_rows, row_sp, ds, js, start, col_sp, OFF0, K0, K1 * K2, DIRECT0,
                GW0, ACC_DTYPE, REL_PRECISION,
            )  # fmt: skip
        if USE1:
            _accumulate_drel_atomic(
                drel_rows, row_sp, ds, js, start, col_sp, OFF1, K1, K2, DIRECT1, GW1,
                ACC_DTYPE, REL_PRECISION,
            )  # fmt: skip
        if USE2:
            _accumulate_drel_atomic(
                drel_rows, row_sp, ds, js, start, col_sp, OFF2, K2, 1, DIRECT2, GW2,
                ACC_DTYPE, REL_PRECISION,
            )  # fmt: skip
    return g0, g1, g2


@triton.jit
def _dq_step(
    q, q2, do, do2, dq, dq2, lse, delta, K, V, js, col_in, row_in, offs_d, d_in, offs_d2, d_in2,
    skn, skd, svn, svd, qk_scale, rel_rows, row_sp, start, r0, r1, r2, oh0, oh1, oh2,
    ALIGNED: tl.constexpr, FULL: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, PK: tl.constexpr,
):  # fmt: skip
    """One key tile of the dQ kernel (both of its loop orders): recompute P from the scores,
    dS = P (dO V^T - delta), dQ += dS K (per head-dim chunk). Returns (dS, dq, dq2)."""
    kb = tl.load(K + js[:, None] * skn + offs_d[None, :] * skd,
                 mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
    vb = tl.load(V + js[:, None] * svn + offs_d[None, :] * svd,
                 mask=col_in[:, None] & d_in[None, :], other=0.0)  # fmt: skip
    kt2 = 0
    if SPLIT:
        kb2 = tl.load(K + js[:, None] * skn + offs_d2[None, :] * skd,
                      mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
        vb2 = tl.load(V + js[:, None] * svn + offs_d2[None, :] * svd,
                      mask=col_in[:, None] & d_in2[None, :], other=0.0)  # fmt: skip
        kt2 = tl.trans(kb2)
    s = _scores(q, tl.trans(kb), q2, kt2, qk_scale, rel_rows, row_sp, start, js, col_in, r0, r1,
                r2, oh0, oh1, oh2, ALIGNED, FULL, K1, K2, USE0, USE1, USE2, OFF0, OFF1, OFF2,
                ACC_DTYPE, DOT_PRECISION, False, SPLIT, PK)  # fmt: skip
    p = tl.where(row_in[:, None] & col_in[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(vb), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if SPLIT:
        dp = tl.dot(do2, tl.trans(vb2), dp, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kb.dtype), kb, dq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if SPLIT:
        dq2 = tl.dot(ds.to(kb2.dtype), kb2, dq2, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)  # fmt: skip
    return ds, dq, dq2


@triton.jit
def _dq_tile(
    q, q2, do, do2, dq, dq2, g0, g1, g2, lse, delta, K, V, start, js, NKS, row_in,
    offs_d, d_in, offs_d2, d_in2, skn, skd, svn, svd, qk_scale, rel_rows, drel_rows,
    row_sp, r0, r1, r2, FULL: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
    K2: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr,
    DIRECT0: tl.constexpr, DIRECT1: tl.constexpr, DIRECT2: tl.constexpr,
    GW0: tl.constexpr, GW1: tl.constexpr, GW2: tl.constexpr, PK: tl.constexpr, WP: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, REL_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """One key tile (keys js, as wide as js) of the dQ kernel's key-order loop (the short-axes
    and gather paths): dQ and the d_relq accumulators."""
    col_in = js < NKS
    oh0, oh1, oh2 = 0, 0, 0
    if FULL:
        oh0, oh1, oh2 = _onehots(js, q.dtype, K0, K1, K2, W0, W1, W2, USE0, USE1, USE2,
                                 PK, WP, OFF0, OFF1, OFF2)  # fmt: skip
    ds, dq, dq2 = _dq_step(
        q, q2, do, do2, dq, dq2, lse, delta, K, V, js, col_in, row_in, offs_d, d_in,
        offs_d2, d_in2, skn, skd, svn, svd, qk_scale, rel_rows, row_sp, start,
        r0, r1, r2, oh0, oh1, oh2, False, FULL, K1, K2, USE0, USE1, USE2, OFF0, OFF1, OFF2,
        ACC_DTYPE, DOT_PRECISION, SPLIT, PK,
    )  # fmt: skip
    g0, g1, g2 = _drel_general(
        ds, js, start, col_in, row_sp, drel_rows, g0, g1, g2, oh0, oh1, oh2, FULL,
        K0, K1, K2, USE0, USE1, USE2, OFF0, OFF1, OFF2, DIRECT0, DIRECT1, DIRECT2,
        GW0, GW1, GW2, ACC_DTYPE, REL_PRECISION, PK,
    )  # fmt: skip
    return dq, dq2, g0, g1, g2


@triton.jit
def _dq_store(
    dq, do, DQ, pid_bh, rows, row_in, offs_d, d_in, Nq, D, sm_scale,
    RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """The dQ kernel's epilogue for the head-dim columns offs_d of spatial rows (the CLS
    row's is ``_cls_dq_store``): scale, the residual's dO."""
    dq = dq * sm_scale
    if RESIDUAL:
        dq += do.to(ACC_DTYPE)
    tl.store(DQ + pid_bh * Nq * D + rows[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])  # fmt: skip


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, REL, DO, LSE, DELTA, DS_CLS, DQ, DREL,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    H, Nq, Nk, D, sm_scale, qk_scale,
    HAS_CLS: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
    OFF0: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, KSUM: tl.constexpr,
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, FULL: tl.constexpr, WP: tl.constexpr,
    ALIGN_OK: tl.constexpr, DIRECT0: tl.constexpr, DIRECT1: tl.constexpr, DIRECT2: tl.constexpr,
    GW0: tl.constexpr, GW1: tl.constexpr, GW2: tl.constexpr,
    RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REL_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
):  # fmt: skip
    """dQ = scale * dS K (+ dO) and d_relq for one query block, looping over all key blocks
    (BLOCK_D2 > 0: the head dim in two chunks, as in the forward).

    d_relq without atomics: aligned tiles (K2 % BLOCK_N == 0, slow axes <= 64) loop over the
    fastest axis' column blocks outside and the slow rows inside, so the fastest axis' d_relq
    block is a register accumulator stored once, and each tile's row sum (the slow axes'
    share) is added to the (BLOCK_M, W_a) register accumulators of the slow axes; short axes
    (FULL) accumulate dS @ onehot_a^T in registers. Other shapes use atomics.
    """
    NQS = Nq - HAS_CLS
    pid_m, pid_bh = _row_block(NQS, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    K += b * skb + h * skh
    V += b * svb + h * svh
    ALIGNED: tl.constexpr = USE2 and (K2 % BLOCK_N == 0) and ALIGN_OK
    PK: tl.constexpr = WP > 0 and not ALIGNED and FULL  # the packed short-axes bias
    NCB: tl.constexpr = K2 // BLOCK_N

    # the row blocks cover the spatial queries only (the delta kernel computes the CLS row's)
    rows = HAS_CLS + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = rows < Nq
    d_in = offs_d < D
    row_sp = row_in
    qd_mask = row_in[:, None] & d_in[None, :]
    row_off = (pid_bh * NQS + rows - HAS_CLS) * KSUM
    rel_rows = REL + row_off
    drel_rows = DREL + row_off

    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
        mask=qd_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :] * sdd,
        mask=qd_mask,
        other=0.0,
    )
    lse = tl.load(LSE + pid_bh * Nq + rows, mask=row_in, other=0.0)
    delta = tl.load(DELTA + pid_bh * Nq + rows, mask=row_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    q2, do2, dq2, offs_d2, d_in2 = 0, 0, 0, 0, 0
    if SPLIT:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        d_in2 = offs_d2 < D
        qd_mask2 = row_in[:, None] & d_in2[None, :]
        q2 = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d2[None, :] * sqd,
                     mask=qd_mask2, other=0.0)  # fmt: skip
        do2 = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d2[None, :] * sdd,
                      mask=qd_mask2, other=0.0)  # fmt: skip
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=ACC_DTYPE)
    if HAS_CLS:
        kc = tl.load(K + offs_d * skd, mask=d_in, other=0.0)
        ds_c = tl.load(DS_CLS + pid_bh * Nq + rows, mask=row_in, other=0.0)
        dq += ds_c[:, None] * kc.to(ACC_DTYPE)[None, :]
        if SPLIT:
            kc2 = tl.load(K + offs_d2 * skd, mask=d_in2, other=0.0)
            dq2 += ds_c[:, None] * kc2.to(ACC_DTYPE)[None, :]
        K += skn
        V += svn
    NKS = Nk - HAS_CLS
    WG0: tl.constexpr = WP if PK else W0  # PK: g0 holds all of d_relq's packed columns
    g0 = tl.zeros([BLOCK_M, WG0], dtype=ACC_DTYPE)
    g1 = tl.zeros([BLOCK_M, W1], dtype=ACC_DTYPE)
    g2 = tl.zeros([BLOCK_M, W2], dtype=ACC_DTYPE)
    if ALIGNED:
        NR = NKS // K2
        for cb in range(NCB):
            d2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
            for r in range(0, NR):
                start = r * K2 + cb * BLOCK_N
                js = start + offs_n
                ds, dq, dq2 = _dq_step(
                    q, q2, do, do2, dq, dq2, lse, delta, K, V, js, js < NKS, row_in, offs_d, d_in,
                    offs_d2, d_in2, skn, skd, svn, svd, qk_scale, rel_rows, row_sp, start,
                    0, 0, 0, 0, 0, 0, True, False, K1, K2, USE0, USE1, USE2, OFF0, OFF1, OFF2,
                    ACC_DTYPE, DOT_PRECISION, SPLIT, False,
                )  # fmt: skip
                d2, g0, g1 = _drel_aligned(ds, r, d2, g0, g1, K1, W0, W1, USE0, USE1)
            tl.store(drel_rows[:, None] + OFF2 + cb * BLOCK_N + offs_n[None, :],
                     d2.to(DREL.dtype.element_ty), mask=row_sp[:, None])  # fmt: skip
    else:
        r0, r1, r2 = 0, 0, 0
        if FULL:
            r0, r1, r2 = _rel_windows(rel_rows, row_sp, K0, K1, K2, W0, W1, W2, OFF0, OFF1, OFF2,
                                      USE0, USE1, USE2, PK, WP, KSUM)  # fmt: skip
        # the last keys in a narrower tile, as in the forward
        TAIL_N: tl.constexpr = _tail_width(K0 * K1 * K2, BLOCK_N, FULL and (USE0 or USE1 or USE2))
        n_main = NKS
        if TAIL_N > 0:  # whole tiles, then the last keys in a narrower one (_tail_width)
            n_main = K0 * K1 * K2 // BLOCK_N * BLOCK_N
        for start in range(0, n_main, BLOCK_N):
            dq, dq2, g0, g1, g2 = _dq_tile(
                q, q2, do, do2, dq, dq2, g0, g1, g2, lse, delta, K, V, start, start + offs_n,
                NKS, row_in, offs_d, d_in, offs_d2, d_in2, skn, skd, svn, svd, qk_scale,
                rel_rows, drel_rows, row_sp, r0, r1, r2, FULL, K0, K1, K2, W0, W1, W2, USE0,
                USE1, USE2, OFF0, OFF1, OFF2, DIRECT0, DIRECT1, DIRECT2, GW0, GW1, GW2, PK, WP,
                ACC_DTYPE, DOT_PRECISION, REL_PRECISION, SPLIT,
            )  # fmt: skip
        if TAIL_N > 0:
            dq, dq2, g0, g1, g2 = _dq_tile(
                q, q2, do, do2, dq, dq2, g0, g1, g2, lse, delta, K, V, n_main,
                n_main + tl.arange(0, TAIL_N), NKS, row_in, offs_d, d_in, offs_d2, d_in2, skn,
                skd, svn, svd, qk_scale, rel_rows, drel_rows, row_sp, r0, r1, r2, FULL, K0, K1,
                K2, W0, W1, W2, USE0, USE1, USE2, OFF0, OFF1, OFF2, DIRECT0, DIRECT1, DIRECT2,
                GW0, GW1, GW2, PK, WP, ACC_DTYPE, DOT_PRECISION, REL_PRECISION, SPLIT,
            )  # fmt: skip
    if PK:
        _store_window(drel_rows, row_sp, g0, 0, KSUM, WP)
    elif ALIGNED or FULL:
        if USE0:
            _store_window(drel_rows, row_sp, g0, OFF0, K0, W0)
        if USE1:
            _store_window(drel_rows, row_sp, g1, OFF1, K1, W1)
        if USE2 and not ALIGNED:
            _store_window(drel_rows, row_sp, g2, OFF2, K2, W2)

    _dq_store(dq, do, DQ, pid_bh, rows, row_in, offs_d, d_in, Nq, D, sm_scale, RESIDUAL,
              ACC_DTYPE)  # fmt: skip
    if SPLIT:
        _dq_store(dq2, do2, DQ, pid_bh, rows, row_in, offs_d2, d_in2, Nq, D, sm_scale, RESIDUAL,
                  ACC_DTYPE)  # fmt: skip


# ----------------------------------------------------------------------------- launchers


_FULL_MAX = 64  # axes up to this long keep their relq columns in registers (one-hot path)


def _geometry(n_tables: int, k_grid: Grid, has_cls: bool) -> dict:
    """Constexpr description of the key grid, padded to 3-D, and of relq's column layout."""
    k3 = (1,) * (3 - len(k_grid)) + tuple(k_grid)
    use = [n_tables > 0 and a >= 3 - n_tables for a in range(3)]
    offs, off = [], 0
    for a in range(3):
        offs.append(off)
        off += k3[a] if use[a] else 0
    widths = [max(16, triton.next_power_of_2(k)) for k in k3]
    full = all(k <= _FULL_MAX for k, u in zip(k3, use) if u)
    packed = max(16, triton.next_power_of_2(off))
    return dict(
        HAS_CLS=int(has_cls),
        K0=k3[0],
        K1=k3[1],
        K2=k3[2],
        USE0=use[0],
        USE1=use[1],
        USE2=use[2],
        OFF0=offs[0],
        OFF1=offs[1],
        OFF2=offs[2],
        KSUM=max(off, 1),
        W0=widths[0],
        W1=widths[1],
        W2=widths[2],
        FULL=full,
        # the short axes' bias as one matmul over the packed relq columns where that is
        # narrower than one per axis (MViTv2-B's 8 x 7 x 7 keys: K = 32, not 3 x 16)
        WP=packed if full and packed < sum(w for w, u in zip(widths, use) if u) else 0,
        # the aligned path keeps the slow axes' d_relq in (BLOCK_M, W_a) registers
        ALIGN_OK=all(k <= _FULL_MAX for k, u in zip(k3[:2], use[:2]) if u),
    )


def _window(ka: int, stride: int, block_n: int) -> tuple[bool, int]:
    """(direct, W) for the gather fallback's d_relq sum along an axis of ka keys with
    flattened stride ``stride``: a tile of block_n consecutive keys spans at most
    (block_n + stride - 2) // stride + 1 values of the axis coordinate."""
    direct = stride == 1 and ka >= block_n
    span = min(ka, (block_n + stride - 2) // stride + 1)
    return direct, max(16, triton.next_power_of_2(span))


def _dkdv_splits(nq: int, nk_spatial: int, bh: int) -> int:
    """Into how many runs of query blocks the dK/dV launch splits the queries, when the key
    blocks alone give fewer than four programs per SM (528 on 132 SMs): the count up to twice
    that whose last wave is fullest (at the pinned config's 2 programs per SM), each run at
    least 8 blocks of 32 queries. (Counted with 64-key blocks, whatever the config.)"""
    if dispatch.interpreting():
        return 2 if nq > 32 else 1  # the tests run the split path on their small sizes
    programs = triton.cdiv(nk_spatial, 64) * bh
    lo = triton.cdiv(4 * 132, programs)
    if lo <= 1:
        return 1
    slots = 2 * 132

    def fill(n: int) -> float:
        waves = programs * n / slots
        return waves / math.ceil(waves)

    best = max(range(lo, 2 * lo + 1), key=lambda n: (round(fill(n), 3), -n))
    return max(1, min(best, nq // 256))


# The dQ kernel's configs (not autotuned: the slow-axis buffer is sized by BLOCK_N), each
# checked by the compile gate. 128 x 32 with 8 warps (64 rows per warpgroup, no duplicated
# warps): no spill at MAT stage 1; 32 divides every MAT key row (128, 64, 32): the aligned
# path. 64 x 32 with 4 warps where 128-row blocks pad the queries by over 5% more (MAT
# stages 3 and 4), as in the forward. On sm_80 (A100) key tiles of 32 spill (48-360 B),
# of 16 not.
tuning.register(
    OP_NAME, "_bwd_dq_kernel",
    [({"BLOCK_M": 128, "BLOCK_N": 32}, 8, 2, "sm90"), ({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1, "sm90"),
     ({"BLOCK_M": 128, "BLOCK_N": 16}, 8, 1, "sm80"), ({"BLOCK_M": 64, "BLOCK_N": 16}, 4, 1, "sm80")],
    ({"BLOCK_M": 16, "BLOCK_N": 16}, 4, 1), tuning.fewer_padded_rows("Nq", minus="HAS_CLS"),
)  # fmt: skip


def _dq_blocks(nq: int, has_cls: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dQ kernel for ``nq`` queries (their
    row blocks cover the spatial ones: the CLS row is peeled off)."""
    kw, warps, stages = tuning.pinned_entry(OP_NAME, "_bwd_dq_kernel",
                                            {"Nq": nq, "HAS_CLS": int(has_cls)})  # fmt: skip
    return kw["BLOCK_M"], kw["BLOCK_N"], warps, stages


def _launch_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
    scale: float,
    residual: bool,
    residual_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, o): o is the output without the residual (an empty placeholder when there
    is none: out is it), saved for the backward with lse. The packed relq the kernel reads is
    not kept: the backward rebuilds it (:func:`_launch_bwd`)."""
    B, H, Nq, D = q.shape
    res_from = int(has_cls and not residual_cls)
    Nk = k.shape[2]
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    o_att = torch.empty_like(out) if residual else q.new_empty(0)
    lse = torch.empty((B, H, Nq), dtype=acc_dtype(q.dtype), device=q.device)
    if B * H == 0:
        return out, lse, o_att
    geo = _geometry(len(rel_tables), k_grid, has_cls)
    rel = _relq_packed(q, rel_tables, q_grid, k_grid, has_cls, geo)

    def grid(meta):  # row blocks of the spatial queries (the CLS row is peeled off)
        return (triton.cdiv(Nq - int(has_cls), meta["BLOCK_M"]) * B * H,)

    bd1, bd2 = _block_d_split(D)

    tuning.launch(
        _fwd_kernel, grid, OP_NAME,
        q, k, v, rel, out, o_att if residual else out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        H, B * H, Nq, Nk, D, scale * _LOG2E,
        **geo,
        RESIDUAL=residual, RES_FROM=res_from, ACC_DTYPE=tl_acc_dtype(q.dtype),
        DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=bd1, BLOCK_D2=bd2,
    )  # fmt: skip
    return out, lse, o_att


def _launch_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    o: torch.Tensor,
    lse: torch.Tensor,
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
    scale: float,
    residual: bool,
    residual_cls: bool = True,
) -> list[torch.Tensor]:
    """[dq, dk, dv, *d(tables)]; ``o`` is the attention output without the residual. The
    packed relq is rebuilt first from q and the tables (one small matmul per axis), so that
    neither autograd nor a selective-checkpoint cache holds it between the passes."""
    B, H, Nq, D = q.shape
    res_from = int(has_cls and not residual_cls)
    Nk = k.shape[2]
    acc = acc_dtype(q.dtype)
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Nk, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, H, Nk, D), dtype=q.dtype, device=q.device)
    if B * H == 0:
        return [dq, dk, dv, *[torch.zeros_like(t) for t in rel_tables]]
    block_d = _block_d(D)
    ACC_DTYPE = tl_acc_dtype(q.dtype)
    prec = _dot_precision(q.dtype)

    delta = torch.empty((B, H, Nq), dtype=acc, device=q.device)
    block_m_delta = 16 if dispatch.interpreting() else 64
    n_blocks_delta = triton.cdiv(Nq, block_m_delta)
    ds_cls = torch.empty((B, H, Nq), dtype=acc, device=q.device) if has_cls else delta
    dkv_cls = (
        torch.empty((B, H, n_blocks_delta, 2, D), dtype=acc, device=q.device) if has_cls else delta
    )
    bd1, bd2 = _block_d_split(D)
    _bwd_delta_kernel[(n_blocks_delta * B * H,)](
        o, dout, q, k, v, lse, delta, ds_cls, dkv_cls,
        *o.stride(), *dout.stride(), *q.stride(), *k.stride(), *v.stride(),
        dq, H, Nq, Nk, D, scale, scale * _LOG2E,
        HAS_CLS=bool(has_cls), RESIDUAL=residual, RES_FROM=res_from, ACC_DTYPE=ACC_DTYPE,
        BLOCK_M=block_m_delta, BLOCK_D=block_d, CLS_N=block_m_delta, CLS_D=bd1, CLS_D2=bd2,
    )  # fmt: skip
    if has_cls:
        # The CLS key's dV, dK: the delta kernel's per-block shares, summed (B H x 2 x D rows).
        part = dkv_cls.sum(2)
        dv[:, :, 0] = part[:, :, 0].to(q.dtype)
        dk[:, :, 0] = (part[:, :, 1] * scale).to(q.dtype)

    geo = _geometry(len(rel_tables), k_grid, has_cls)
    rel = _relq_packed(q, rel_tables, q_grid, k_grid, has_cls, geo)

    # Few key blocks (MViTv2's 7 x 7 pooled keys: 7 blocks x batch 8 = 56 programs for 132
    # SMs): split the queries over grid axis 1 and sum the fp32 shares
    splits = _dkdv_splits(Nq, Nk - int(has_cls), B * H)
    dk_out, dv_out = dk, dv
    if splits > 1:
        dk_out, dv_out = (torch.empty((splits, B, H, Nk, D), dtype=acc, device=q.device)
                          for _ in range(2))  # fmt: skip

    def grid_n(meta):
        return (triton.cdiv(Nk - int(has_cls), meta["BLOCK_N"]) * B * H, splits)

    _bwd_dkdv_kernel[grid_n](
        q, k, v, rel, dout, lse, delta, dk_out, dv_out,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        H, B * H, Nq, Nk, D, scale, scale * _LOG2E,
        **geo,
        ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=prec, PARTIAL=splits > 1, BLOCK_D=bd1, BLOCK_D2=bd2,
    )  # fmt: skip
    if splits > 1:
        cls = int(has_cls)
        dk[:, :, cls:] = dk_out[:, :, :, cls:].sum(0).to(q.dtype)
        dv[:, :, cls:] = dv_out[:, :, :, cls:].sum(0).to(q.dtype)

    k3 = (1,) * (3 - len(k_grid)) + tuple(k_grid)
    block_m, block_n, warps, stages = _dq_blocks(Nq, has_cls)
    windows = [_window(k3[a], math.prod(k3[a + 1 :]), block_n) for a in range(3)]
    nq_sp = math.prod(q_grid)
    aligned = bool(geo["USE2"]) and k3[2] % block_n == 0 and geo["ALIGN_OK"]
    if not len(rel_tables):
        drel = q.new_empty(1)
    elif aligned or geo["FULL"]:
        # every column of every spatial row is stored once, rounded to q's dtype (as the
        # reference rounds d_relq before its matmuls)
        drel = torch.empty((B, H, nq_sp, geo["KSUM"]), dtype=q.dtype, device=q.device)
    else:  # the gather path's atomics accumulate into zeros
        drel = torch.zeros((B, H, nq_sp, geo["KSUM"]), dtype=acc, device=q.device)
    _bwd_dq_kernel[(triton.cdiv(Nq - int(has_cls), block_m) * B * H,)](
        q, k, v, rel, dout, lse, delta, ds_cls, dq, drel,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        H, Nq, Nk, D, scale, scale * _LOG2E,
        **geo,
        DIRECT0=windows[0][0], DIRECT1=windows[1][0], DIRECT2=windows[2][0],
        GW0=windows[0][1], GW1=windows[1][1], GW2=windows[2][1],
        RESIDUAL=residual, ACC_DTYPE=ACC_DTYPE, DOT_PRECISION=prec,
        # dS is rounded to tf32 (no underflow, 10-bit mantissa) for 16-bit inputs.
        REL_PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd1, BLOCK_D2=bd2,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    dtables = _relq_backward(drel, q, dq, rel_tables, q_grid, k_grid, has_cls, geo)
    return [dq, dk, dv, *dtables]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("mmt_fast::relpos_attention_fwd", mutates_args=())
def _relpos_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: list[torch.Tensor],
    q_grid: list[int],
    k_grid: list[int],
    has_cls: bool,
    scale: float,
    residual: bool,
    residual_cls: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton forward: out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32/fp64 in log2 units,
    and for the backward the output without the residual (0 elements without a residual).
    The packed relq the kernel reads is not returned: the backward rebuilds it from q and the
    tables (one small matmul per axis), so that neither autograd nor a selective-checkpoint
    cache (which keeps every output of a saved op) holds it."""
    out, lse, o_att = _launch_fwd(
        q, k, v, rel_tables, q_grid, k_grid, has_cls, scale, residual, residual_cls
    )
    return out, lse, o_att


@_relpos_attention_fwd.register_fake
def _(q, k, v, rel_tables, q_grid, k_grid, has_cls, scale, residual, residual_cls):
    B, H, Nq, _ = q.shape
    return (
        q.new_empty(q.shape),
        q.new_empty((B, H, Nq), dtype=acc_dtype(q.dtype)),
        q.new_empty(q.shape if residual else (0,)),
    )


@torch.library.custom_op("mmt_fast::relpos_attention_bwd", mutates_args=())
def _relpos_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: list[torch.Tensor],
    o: torch.Tensor,
    lse: torch.Tensor,
    q_grid: list[int],
    k_grid: list[int],
    has_cls: bool,
    scale: float,
    residual: bool,
    residual_cls: bool,
) -> list[torch.Tensor]:
    """Triton backward: [dq, dk, dv, *d(rel_tables)]; rebuilds the packed relq first."""
    return _launch_bwd(dout, q, k, v, rel_tables, o, lse, q_grid, k_grid, has_cls, scale,
                       residual, residual_cls)  # fmt: skip


@_relpos_attention_bwd.register_fake
def _(dout, q, k, v, rel_tables, o, lse, q_grid, k_grid, has_cls, scale, residual,
      residual_cls):  # fmt: skip
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)] + [
        t.new_empty(t.shape) for t in rel_tables
    ]


def _setup_context(ctx, inputs, output):
    q, k, v, rel_tables, q_grid, k_grid, has_cls, scale, residual, residual_cls = inputs
    out, lse, o_att = output
    # the backward's delta needs the output without the residual: out - q, rounded after the
    # add, would lose precision as |q| grows
    ctx.save_for_backward(q, k, v, o_att if residual else out, lse, *rel_tables)
    ctx.args = (list(q_grid), list(k_grid), has_cls, scale, residual, residual_cls)
    ctx.mark_non_differentiable(lse, o_att)


def _backward(ctx, dout, _dlse, _do_att):
    q, k, v, o, lse, *rel_tables = ctx.saved_tensors
    dout = aligned(dout)
    dq, dk, dv, *dtables = _relpos_attention_bwd(dout, q, k, v, rel_tables, o, lse, *ctx.args)
    return dq, dk, dv, dtables, None, None, None, None, None, None


_relpos_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry point


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
) -> None:
    """Raise ValueError / TypeError naming the problem; shared by both paths."""
    p = f"{OP_NAME}:"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{p} {name} must be a 4-D tensor (B, H, N, D), got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"{p} k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{p} q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and "
            "head dim D"
        )
    if not 1 <= len(q_grid) <= 3 or len(q_grid) != len(k_grid):
        raise ValueError(
            f"{p} q_grid {tuple(q_grid)} and k_grid {tuple(k_grid)} must have the same rank, "
            "1, 2 or 3"
        )
    if any(int(s) < 1 for s in (*q_grid, *k_grid)):
        raise ValueError(f"{p} grid sizes must be >= 1, got {tuple(q_grid)}, {tuple(k_grid)}")
    cls = int(has_cls)
    if q.shape[2] != cls + math.prod(q_grid):
        raise ValueError(
            f"{p} q has Nq={q.shape[2]} tokens but has_cls={bool(has_cls)} and q_grid "
            f"{tuple(q_grid)} give {cls + math.prod(q_grid)}"
        )
    if k.shape[2] != cls + math.prod(k_grid):
        raise ValueError(
            f"{p} k has Nk={k.shape[2]} tokens but has_cls={bool(has_cls)} and k_grid "
            f"{tuple(k_grid)} give {cls + math.prod(k_grid)}"
        )
    if len(rel_tables) not in (0, len(q_grid)):
        raise ValueError(
            f"{p} got {len(rel_tables)} rel-pos tables for a {len(q_grid)}-D grid "
            "(one per axis, or none)"
        )
    D = q.shape[3]
    for a, t in enumerate(rel_tables):
        want = (2 * max(q_grid[a], k_grid[a]) - 1, D)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{p} rel_tables[{a}] must have shape (2 * max({q_grid[a]}, {k_grid[a]}) - 1, D) "
                f"= {want}, got {shape}"
            )
    if not q.dtype.is_floating_point:
        raise TypeError(f"{p} q must be a floating-point tensor, got {q.dtype}")
    tensors = {"k": k, "v": v, **{f"rel_tables[{a}]": t for a, t in enumerate(rel_tables)}}
    for name, t in tensors.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{p} {name} has dtype {t.dtype} but q has {q.dtype}")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{p} {name} is on {t.device} but q is on {q.device}")


def triton_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_tables: Sequence[torch.Tensor] = ()
) -> list[str]:
    """Why the Triton path cannot run these (valid) inputs; [] when it can. (batch x heads has
    no limit: the grids are one axis; the tables are made contiguous, being small.)"""
    reasons = dispatch.device_reasons([q, k, v, *rel_tables])
    if q.shape[-1] > _MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}")
    reasons += dispatch.dtype_reasons(q.dtype, fp32_on_cuda=False)
    reasons += dispatch.alignment_reasons({"q": q, "k": k, "v": v})
    return reasons


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_tables: Sequence[torch.Tensor],
    q_grid: Grid,
    k_grid: Grid,
    has_cls: bool,
    scale: float,
    residual: bool = True,
    residual_cls: bool = True,
) -> torch.Tensor:
    """Attention with decomposed relative-position bias (MViTv2), fused on the Triton path.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); Nq = has_cls + prod(q_grid),
    Nk = has_cls + prod(k_grid); q_grid, k_grid: 1-3 ints each ((F, T) for
    audio, (T, H, W) for video); rel_tables: one (2 max(q_grid[a], k_grid[a]) - 1, D)
    table per axis, or none. Returns (B, H, Nq, D) in q's dtype::

        out = softmax(q k^T * scale + bias) v + (q if residual else 0),
        (the CLS row gets no "+ q" when has_cls and not residual_cls: SlowFast's MViTv2)
        bias[i, j] = sum_a q_i . rel_tables[a][dist_a(i_a, j_a)]   (spatial i, j)

    Differentiable in q, k, v and every table. The path (Triton or
    :func:`relpos_attention_ref`) is chosen by :func:`mmt_fast.kernels.dispatch.choose`.
    """
    _check_inputs(q, k, v, rel_tables, q_grid, k_grid, has_cls)
    # views the kernels' 16-byte alignment cannot take are copied (autograd sees the copy)
    qa, ka, va = aligned(q), aligned(k), aligned(v)
    if dispatch.choose(OP_NAME, triton_reasons(qa, ka, va, rel_tables)):
        out, *_ = _relpos_attention_fwd(
            qa,
            ka,
            va,
            list(rel_tables),
            [int(s) for s in q_grid],
            [int(s) for s in k_grid],
            bool(has_cls),
            float(scale),
            bool(residual),
            bool(residual_cls),
        )
        return out
    return relpos_attention_ref(
        q, k, v, rel_tables, q_grid, k_grid, has_cls, scale, residual, residual_cls
    )
