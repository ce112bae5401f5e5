"""Timing and memory of every path of every case, the measured ceilings, the JSON.

``run_benchmarks`` runs the cases in the order given, writing the JSON after every
path, and never raises for one path: ``OOM`` is recorded with the size of the
N x M tensor the path needed, other failures with the error text. With a gate
(the correctness-check shapes), each case's paths are first checked against
float64 (``check.check_case``) and a path that fails is not timed. Every case
carries its roofline (``roofline.roofline``) and every CUDA time its fraction of
the floor. On the CPU the kernels run in Triton's interpreter: those times say
nothing about GPU speed, so no TFLOP/s, floor fractions or target verdicts are
computed from them.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.kernels import roofline
from benchmarks.kernels.baselines import (
    PATHS,
    build_path,
    forward_only,
    fwd_bwd,
    path_unavailable,
    zero_grads,
)
from benchmarks.kernels.cases import Case, Inputs, make_inputs
from benchmarks.kernels.check import _short, check_case
from benchmarks.kernels.summary import (
    INTERPRETER_NOTE,
    _check_summary,
    _fmt_row,
    targets,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], inp: Inputs, device: torch.device, reps: int = 3) -> float:
    """Median milliseconds of ``fn``: CUDA events via ``triton.testing.do_bench`` (L2 flushed
    between runs, grads reset) on CUDA; a host clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn,
                warmup=25,
                rep=100,
                grad_to_none=list(inp.leaves.values()),
                return_mode="median",
            )
        )
    times = []
    for _ in range(reps):
        zero_grads(inp)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    zero_grads(inp)
    return statistics.median(times)


def peak_gb(fn: Callable[[], Any], inp: Inputs, device: torch.device) -> dict[str, float]:
    """Peak allocated GB while ``fn`` runs and its result lives; ``extra_gb`` excludes what
    was allocated before (inputs, output gradients)."""
    if device.type != "cuda":
        return {}
    zero_grads(inp)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    zero_grads(inp)
    return {"peak_gb": peak / 1e9, "extra_gb": (peak - base) / 1e9, "inputs_gb": base / 1e9}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_path(
    path: str, inp: Inputs, device: torch.device, compile_flex: bool, reps: int
) -> dict[str, Any]:
    """Time and measure one path on one case; never raises."""
    case = inp.case
    itemsize = next(iter(inp.leaves.values())).element_size()
    res: dict[str, Any] = {}
    try:
        run = build_path(path, inp, compile_flex)
        fwd_only = forward_only(path, inp)
        step = None if fwd_only else fwd_bwd(run, inp)
        t0 = time.perf_counter()
        (step or run)()  # compiles, autotunes, allocates workspaces: outside the measurements
        _sync(device)
        res["first_call_s"] = time.perf_counter() - t0
        zero_grads(inp)
        res.update({f"fwd_{k}": v for k, v in peak_gb(run, inp, device).items()})
        if step:
            res.update({f"fwd_bwd_{k}": v for k, v in peak_gb(step, inp, device).items()})
        modes = [("fwd", run)] + ([("fwd_bwd", step)] if step else [])
        for mode, fn in modes:
            ms = time_ms(fn, inp, device, reps)
            res[f"{mode}_ms"] = ms
            if device.type == "cuda":  # interpreter times: no rates
                res[f"{mode}_tflops"] = roofline.flops(case, mode) / ms / 1e9
                res[f"{mode}_of_floor"] = roofline.fraction_of_floor(case, mode, ms, itemsize)
        if not step:
            res["note"] = fwd_only
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:
        res["status"] = "OOM"
        res["attempted"] = (
            f"one (B, H, Nq, Nk) tensor is {case.nm_bytes(itemsize) / 1e9:.2f} GB; " + _short(e)
        )[:400]
    except Exception as e:
        res["status"] = "error"
        res["error"] = _short(e)
    finally:
        zero_grads(inp)
        _free(device)
    return res


def ceilings(device: torch.device) -> dict[str, Any]:
    """Measured ceilings: bf16 matmul TFLOP/s (8192^3, random data) and copy TB/s."""
    if device.type != "cuda":
        return {}
    import triton.testing

    def matmul_ms(n: int) -> float:
        x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return triton.testing.do_bench(lambda: x @ y, warmup=50, rep=200, return_mode="median")

    def copy_ms(numel: int) -> float:
        src = torch.randn(numel, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return triton.testing.do_bench(
            lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"
        )

    out: dict[str, Any] = {}
    try:
        n = 8192
        ms = matmul_ms(n)
        out["matmul_bf16_8192_ms"] = ms
        out["matmul_bf16_tflops"] = 2 * n**3 / ms / 1e9
        numel = 1 << 29  # 1 GiB of bf16
        out["copy_tbps"] = 2 * numel * 2 / copy_ms(numel) / 1e9  # read + write
    except Exception as e:
        out["error"] = _short(e)
    _free(device)
    return out


def environment(device: torch.device) -> dict[str, Any]:
    import triton

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "kernel_configs": os.environ.get("MMT_FAST_KERNEL_CONFIGS", ""),
    }
    try:
        import xformers

        env["xformers"] = xformers.__version__
        # False: its own CUDA extension did not load (built for another torch); then
        # memory_efficient_attention runs PyTorch's kernels ("cutlassF-pt", "cutlassB-pt").
        env["xformers_cpp_extension"] = bool(getattr(xformers, "_has_cpp_library", False))
    except Exception:
        env["xformers"] = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = p.total_memory / 1e9
        env["capability"] = f"{p.major}.{p.minor}"
    return env


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _results_header(device: torch.device, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    interpreter = device.type == "cpu"
    return {
        "benchmark": "benchmarks.kernels",
        "env": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "interpreter": interpreter,
        **({"note": INTERPRETER_NOTE} if interpreter else {}),
        "flop_convention": roofline.CONVENTION,
        "timing": (
            "triton.testing.do_bench: CUDA events, median, warmup 25 ms, rep 100 ms, L2 "
            "flushed and grads reset between runs; memory: torch.cuda.max_memory_allocated "
            "around one call after a warm-up call (compile/autotune excluded); extra_gb = "
            "peak minus what was allocated before (inputs, output gradients)"
            if device.type == "cuda"
            else f"host clock, median of {reps}; no memory figures on the CPU"
        ),
        "baselines": ceilings(device),
        "cases": {},
    }


def _case_entry(case: Case, itemsize: int) -> dict[str, Any]:
    return {
        "op": case.op,
        "source": case.source,
        "shapes": case.shapes(),
        "flops_fwd": case.flops_fwd(),
        "flops_fwd_bwd": case.flops_fwd_bwd(),
        "roofline": roofline.roofline(case, itemsize),
        "nm_bf16_gb": case.nm_bytes(2) / 1e9,
        "paths": {},
    }


def _check_at_gate_shape(name, gate_case, entry, device, dtype, compile_flex, paths):
    """Check the case's paths at the gate's shape: the failed rows by path, or None when the
    float64 reference itself failed (then nothing of the case is timed)."""
    try:
        rows = check_case(name, gate_case, device, dtype, compile_flex, paths)
    except Exception as e:  # the float64 reference itself failed: nothing is timed
        entry["skipped"] = "correctness check failed to run: " + _short(e)
        print(f"{name}: {entry['skipped']}", flush=True)
        _free(device)
        return None
    entry["check"] = {"shapes": gate_case.shapes(), "rows": rows}
    failed = {}
    for r in rows:
        print(_check_summary(r), flush=True)
        if r["status"] in ("FAIL", "error"):
            failed[r["path"]] = r
    return failed


def _why_not_timed(path, device, failed_check, compile_flex, remaining) -> dict | None:
    """The entry of a path that is not timed (unavailable, failed its check, no time left)."""
    why = path_unavailable(path, device)
    if why is None and path in failed_check:
        r = failed_check[path]
        detail = ", ".join(r["failed"]) if r["status"] == "FAIL" else r.get("error", "")
        return {
            "status": "not timed",
            "why": f"failed the correctness check ({r['status']}: {detail})"[:300],
        }
    if why is None and path == "flex" and compile_flex and remaining < 45:
        why = f"skipped: {remaining:.0f} s of the time budget left (compiling takes ~30 s)"
    return {"status": "skipped", "why": why} if why else None


def run_benchmarks(
    device: torch.device,
    dtype: torch.dtype,
    cases: dict[str, Case],
    out_json: Path | None,
    compile_flex: bool,
    budget_s: float,
    reps: int = 3,
    paths: Sequence[str] | None = None,
    gate: dict[str, Case] | None = None,
) -> dict[str, Any]:
    """Run every case in order, writing the JSON after each one; skip what the budget leaves.

    ``gate``: check shapes by case name; a case's paths are checked at that shape first
    and only the paths that pass are timed.
    """
    t_start = time.perf_counter()
    itemsize = torch.empty((), dtype=dtype).element_size()
    results = _results_header(device, dtype, reps)
    for name, case in cases.items():
        elapsed = time.perf_counter() - t_start
        entry = _case_entry(case, itemsize)
        results["cases"][name] = entry
        if elapsed > budget_s:
            entry["skipped"] = f"time budget {budget_s:.0f} s used up"
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        failed_check = {}
        if gate is not None and name in gate:
            failed_check = _check_at_gate_shape(
                name, gate[name], entry, device, dtype, compile_flex, paths
            )
            if failed_check is None:
                continue
        try:
            inp = make_inputs(case, device, dtype, seed=len(results["cases"]))
        except torch.OutOfMemoryError as e:
            entry["skipped"] = "OOM allocating inputs: " + _short(e)
            _free(device)
            continue
        for path in PATHS[case.op]:
            if paths and path not in paths:
                continue
            remaining = budget_s - (time.perf_counter() - t_start)
            skip = _why_not_timed(path, device, failed_check, compile_flex, remaining)
            if skip is not None:
                entry["paths"][path] = skip
                if skip["status"] == "not timed":
                    print(f"{name:24s} {path:10s} not timed: failed the check", flush=True)
                continue
            r = bench_path(path, inp, device, compile_flex, reps)
            entry["paths"][path] = r
            print(f"{name:24s} {path:10s} {_fmt_row(r)}", flush=True)
            if out_json:
                _write_json(out_json, results)
        del inp
        _free(device)
        results["targets"] = targets(results)
        if out_json:
            _write_json(out_json, results)
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - t_start
    if out_json:
        _write_json(out_json, results)
    return results
