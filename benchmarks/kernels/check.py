"""Correctness of every benchmark path against a float64 reference.

The rule is the kernel tests' (flash-attention's): for the output and every input
gradient, ``max |path - fp64| <= 2 max |reference in the same dtype - fp64| + atol``,
with the tests' atol per op (a few units in the last place, for a different but
equally good summation order): ``ATOL_REL[dtype] * max |fp64|`` for rel-pos
attention (``tests/test_relpos_attention.py``), ``ATOL[dtype]`` for the bottleneck
and pooled Q/K/V ops (``tests/kernel_helpers.py``). The timings run only the paths
that pass (``timing.run_benchmarks``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.kernels.baselines import (
    COMPILED_PATHS,
    PATHS,
    build_path,
    forward_only,
    path_unavailable,
    zero_grads,
)
from benchmarks.kernels.cases import Case, Inputs, make_inputs

ATOL_REL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # x max |fp64|
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def max_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """max |x - ref| in float64 (inf when x is missing or not finite)."""
    if x is None or ref is None:
        return float("inf") if (x is None) != (ref is None) else 0.0
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).abs().max()) if x.numel() else 0.0


def tolerance(
    ref_low: torch.Tensor | None, ref64: torch.Tensor | None, dtype: torch.dtype, op: str
) -> float:
    """2 x PyTorch's own error in ``dtype`` + atol: ``ATOL_REL[dtype] x max |fp64|`` for
    ``op == "relpos"``, ``ATOL[dtype]`` otherwise."""
    if ref64 is None or not ref64.numel():
        return 0.0
    if op == "relpos":
        atol = ATOL_REL[dtype] * float(ref64.detach().double().abs().max())
    else:
        atol = ATOL[dtype]
    return 2 * max_err(ref_low, ref64) + atol


def _results(
    run: Callable[[], tuple], inp: Inputs, backward: bool = True
) -> dict[str, torch.Tensor | None]:
    zero_grads(inp)
    outs = run()
    res: dict[str, torch.Tensor | None] = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    if backward:
        torch.autograd.backward(list(outs), list(inp.douts))
        res.update({f"d{k}": v.grad for k, v in inp.leaves.items()})
    zero_grads(inp)
    return res


def check_case(
    name: str,
    case: Case,
    device: torch.device,
    dtype: torch.dtype,
    compile_flex: bool,
    paths: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per path of ``case``: output and every gradient against float64.

    Row ``status``: ``ok``, ``FAIL`` (with the tensors that failed), ``error`` (the path
    raised) or ``skipped`` (the path cannot run here). The paths in ``COMPILED_PATHS`` run
    eagerly (the same function, not recompiled at the check's shape).
    """
    rows: list[dict[str, Any]] = []
    base = make_inputs(case, device, torch.float64, seed=zlib.crc32(name.encode()) % 1000)
    ref64 = _results(build_path("reference", base, False), base)
    low = base.cast(dtype)
    ref_low = _results(build_path("reference", low, False), low)
    tols_all = {k: tolerance(ref_low[k], ref64[k], dtype, case.op) for k in ref64}
    for path in PATHS[case.op]:
        if paths and path not in paths:
            continue
        row: dict[str, Any] = {"case": name, "path": path, "dtype": str(dtype)}
        why = path_unavailable(path, device)
        if why:
            rows.append({**row, "status": "skipped", "why": why})
            continue
        fwd_only = forward_only(path, low)
        try:
            got = _results(build_path(path, low, False), low, backward=not fwd_only)
        except Exception as e:
            rows.append({**row, "status": "error", "error": _short(e)})
            continue
        keys = [k for k in ref64 if k in got] if fwd_only else list(ref64)
        errs = {k: max_err(got.get(k), ref64[k]) for k in keys}
        tols = {k: tols_all[k] for k in keys}
        bad = [k for k in keys if not errs[k] <= tols[k]]
        notes = [fwd_only] if fwd_only else []
        if compile_flex and path in COMPILED_PATHS:
            notes.append("checked eagerly (timed compiled)")
        if notes:
            row["note"] = "; ".join(notes)
        worst = max(keys, key=lambda k: errs[k] / tols[k] if tols[k] else float("inf"))
        rows.append(
            {
                **row,
                "status": "FAIL" if bad else "ok",
                "worst": worst,
                "err": errs[worst],
                "tol": tols[worst],
                "failed": bad,
                "errors": errs,
                "tolerances": tols,
            }
        )
    return rows


def run_checks(
    device: torch.device,
    dtype: torch.dtype,
    cases: dict[str, Case],
    compile_flex: bool,
    paths: Sequence[str] | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """:func:`check_case` for every case. ``verbose`` prints each row as it is made (a time
    limit then keeps what was checked)."""
    rows: list[dict[str, Any]] = _Rows(verbose)
    for name, case in cases.items():
        for row in check_case(name, case, device, dtype, compile_flex, paths):
            rows.append(row)
    return rows


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text[:400]


class _Rows(list):
    """A list of check rows that can print each row when it is appended."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        if verbose:
            print(CHECK_HEADER, flush=True)

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        if self.verbose:
            print(_check_line(row), flush=True)


CHECK_HEADER = f"{'case':24s} {'path':10s} {'status':8s} worst tensor: max abs err (tol)"


def print_checks(rows: list[dict[str, Any]]) -> None:
    print(CHECK_HEADER)
    for r in rows:
        print(_check_line(r))


def _check_line(r: dict[str, Any]) -> str:
    if r["status"] in ("ok", "FAIL"):
        detail = f"{r['worst']}: {r['err']:.2e} ({r['tol']:.1e})"
        if r["failed"]:
            detail += f"  failed: {', '.join(r['failed'])}"
        if r.get("note"):
            detail += f"  [{r['note']}]"
    else:
        detail = r.get("why") or r.get("error", "")
    return f"{r['case']:24s} {r['path']:10s} {r['status']:8s} {detail}"
