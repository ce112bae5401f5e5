"""The roofline of every benchmark case: FLOPs, minimum HBM bytes and the time floor.

Counts come from the ops' definitions (``kernels/*.py`` docstrings), 2 FLOPs per
multiply-add; only matmul-like work is counted (softmax, LayerNorm, bias
additions and the residual are elementwise and left out). The same work is
counted for every path: the op's own, not what an implementation re-does
(flash-style backward kernels recompute Q K^T; that is not counted, so a fused
kernel's floor is not lowered by its own recomputation).

rel-pos attention, q (B, H, Nq, D), k, v (B, H, Nk, D), grids q_grid / k_grid,
c = has_cls::

    forward  = 2 B H Nq Nk D  (Q K^T)  + 2 B H Nq Nk D  (P V)
             + sum_a 2 B H (Nq - c) k_grid[a] D          (relq_a = q . R_a[dist_a], the bias)
    backward = 2 x forward   (each matmul has two operand gradients: dQ, dK; dP, dV;
                              d(q) and d(R_a) through relq)

bottleneck attention, N = n_main + n_extra tokens, every query against every key::

    forward  = 4 B H N^2 D,  backward = 2 x forward

pooled Q/K/V, x (B, N, C_in), C_out = H D, pooled grids g_q, g_k (= g_v)::

    forward  = 2 B N C_in 3 C_out                        (the linear projection)
             + 2 B H D prod(kernel) (prod(g_q) + 2 prod(g_k))   (depthwise conv taps)
    backward = 2 x forward   (dx and dW of the linear; d(input) and d(weight) of the conv)

so forward+backward = 3 x forward for every op.

Bytes: the minimum HBM traffic, every input read once and every output
written once, in the benchmark dtype. Forward: the op's inputs (including the
rel-pos tables and the pooling/LayerNorm parameters) and outputs. Forward+
backward: additionally the output gradients read and the input gradients
written (nothing saved for backward is counted: a kernel that stores and
re-reads activations pays more than the floor).

Floor: ``max(FLOPs / 790 TFLOP/s, bytes / 4.3 TB/s)``, the H200's dense bf16
matmul rate (8192^3, random data) and device-to-device copy rate measured on
this project's GPU machine. A measured time is reported as ``floor / time``
(1.0 = at the roofline).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.kernels.cases import Case

PEAK_FLOPS = 790e12  # H200 dense bf16 matmul, FLOP/s, measured
PEAK_BYTES = 4.3e12  # H200 HBM copy, bytes/s (read + write), measured
MODES = ("fwd", "fwd_bwd")
CONVENTION = (
    "2 FLOPs per multiply-add, matmul-like work of the op's definition only (softmax, "
    "LayerNorm, bias additions not counted; recomputation inside a kernel not counted): "
    "rel-pos attention fwd = 4*B*H*Nq*Nk*D + sum_a 2*B*H*(Nq-cls)*k_grid[a]*D; bottleneck "
    "fwd = 4*B*H*N^2*D; pooled QKV fwd = 2*B*N*C_in*3*C_out + 2*B*H*D*prod(kernel)*"
    "(prod(g_q) + 2*prod(g_k)); fwd_bwd = 3x fwd. Bytes: every input read and every output "
    "written once (fwd_bwd adds the output gradients read and the input gradients written). "
    f"Floor = max(FLOPs / {PEAK_FLOPS / 1e12:.0f} TFLOP/s, bytes / {PEAK_BYTES / 1e12:.1f} TB/s) "
    "(H200, measured bf16 matmul and copy rates)."
)


def flops(case: Case, mode: str = "fwd") -> float:
    """FLOPs of ``case`` for ``mode`` (``fwd`` or ``fwd_bwd``), 2 per multiply-add."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    B, H, D = case.batch, case.heads, case.head_dim
    nq, nk = case.nq_nk
    if case.op == "relpos":
        rows = nq - int(case.has_cls)
        fwd = 4.0 * B * H * nq * nk * D + sum(2.0 * B * H * rows * ka * D for ka in case.k_grid)
    elif case.op == "bottleneck":
        fwd = 4.0 * B * H * nq * nk * D
    elif case.op == "pooled":
        n = int(case.has_cls) + math.prod(case.in_grid)
        linear = 2.0 * B * n * case.dim_in * 3 * H * D
        taps = math.prod(case.q_grid) + 2 * math.prod(case.k_grid)
        fwd = linear + 2.0 * B * H * D * math.prod(case.kernel) * taps
    else:
        raise ValueError(f"unknown op {case.op!r}")
    return fwd if mode == "fwd" else 3.0 * fwd


def tensor_numels(case: Case) -> tuple[dict[str, int], dict[str, int]]:
    """(inputs, outputs) of the op as name -> number of elements."""
    B, H, D = case.batch, case.heads, case.head_dim
    nq, nk = case.nq_nk
    if case.op == "relpos":
        ins = {"q": B * H * nq * D, "k": B * H * nk * D, "v": B * H * nk * D}
        for a, (qa, ka) in enumerate(zip(case.q_grid, case.k_grid)):
            ins[f"rel{a}"] = (2 * max(qa, ka) - 1) * D
        return ins, {"out": B * H * nq * D}
    if case.op == "bottleneck":
        m, e = case.n_main, case.n_extra
        ins = {f"{t}_{s}": B * H * n * D for s, n in (("main", m), ("extra", e)) for t in "qkv"}
        return ins, {"out_main": B * H * m * D, "out_extra": B * H * e * D}
    if case.op == "pooled":
        n = int(case.has_cls) + math.prod(case.in_grid)
        c_out = H * D
        ins = {
            "x": B * n * case.dim_in,
            "qkv_weight": 3 * c_out * case.dim_in,
            "qkv_bias": 3 * c_out,
        }
        for t in "qkv":
            ins[f"pool_{t}"] = D * math.prod(case.kernel)
            ins[f"gamma_{t}"] = ins[f"beta_{t}"] = D
        return ins, {"q": B * H * nq * D, "k": B * H * nk * D, "v": B * H * nk * D}
    raise ValueError(f"unknown op {case.op!r}")


def min_bytes(case: Case, mode: str = "fwd", itemsize: int = 2) -> float:
    """Minimum HBM bytes: inputs read and outputs written once (``fwd_bwd``: plus the output
    gradients read and the input gradients written)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    ins, outs = tensor_numels(case)
    n_in, n_out = sum(ins.values()), sum(outs.values())
    elems = n_in + n_out if mode == "fwd" else 2 * (n_in + n_out)
    return float(elems * itemsize)


def floor_s(case: Case, mode: str = "fwd", itemsize: int = 2) -> dict[str, Any]:
    """The roofline of one case and mode: FLOPs, bytes, intensity, the two floors (ms) and
    which one binds."""
    f, b = flops(case, mode), min_bytes(case, mode, itemsize)
    compute_ms, memory_ms = f / PEAK_FLOPS * 1e3, b / PEAK_BYTES * 1e3
    return {
        "flops": f,
        "bytes": b,
        "flop_per_byte": f / b,
        "compute_floor_ms": compute_ms,
        "memory_floor_ms": memory_ms,
        "floor_ms": max(compute_ms, memory_ms),
        "bound": "compute" if compute_ms >= memory_ms else "memory",
    }


def roofline(case: Case, itemsize: int = 2) -> dict[str, dict[str, Any]]:
    """``{"fwd": floor_s(...), "fwd_bwd": floor_s(...)}`` for the JSON."""
    return {mode: floor_s(case, mode, itemsize) for mode in MODES}


def fraction_of_floor(case: Case, mode: str, measured_ms: float, itemsize: int = 2) -> float:
    """floor / measured: 1.0 means the measured time is at the roofline."""
    return floor_s(case, mode, itemsize)["floor_ms"] / measured_ms


def _fmt_count(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def table(cases: dict[str, Case], itemsize: int = 2) -> str:
    """The expectation per case and mode, as printed by ``--roofline``."""
    lines = [
        f"Roofline, H200: {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 matmul, "
        f"{PEAK_BYTES / 1e12:.1f} TB/s HBM (measured); {itemsize}-byte elements; "
        "2 FLOPs per multiply-add; fwd_bwd = 3x fwd FLOPs.",
        f"{'case':22s} {'mode':8s} {'FLOPs':>11s} {'bytes':>10s} {'FLOP/B':>7s} "
        f"{'compute ms':>11s} {'memory ms':>10s} {'floor ms':>9s}  bound",
    ]
    for name, case in cases.items():
        for mode in MODES:
            r = floor_s(case, mode, itemsize)
            lines.append(
                f"{name:22s} {mode:8s} {_fmt_count(r['flops'], 'F'):>11s} "
                f"{_fmt_count(r['bytes'], 'B'):>10s} {r['flop_per_byte']:7.0f} "
                f"{r['compute_floor_ms']:11.4f} {r['memory_floor_ms']:10.4f} "
                f"{r['floor_ms']:9.4f}  {r['bound']}"
            )
    return "\n".join(lines)
