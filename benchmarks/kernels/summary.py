"""Reading results: the printed table, the issue's targets, the compile-time estimate."""

from __future__ import annotations

from typing import Any

# The case the issue's targets are stated for.
TARGET_CASE = "relpos/mat_s1"
INTERPRETER_NOTE = (
    "CPU: the Triton kernels run in Triton's interpreter (numpy, one program at a time); "
    "these timings check that every path runs and say nothing about GPU speed"
)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets at MAT stage 1, measured (never asserted); none for interpreter
    timings."""
    if results.get("interpreter"):
        return {"note": "not evaluated: " + INTERPRETER_NOTE}
    case = results["cases"].get(TARGET_CASE)
    if not case:
        return {"note": f"{TARGET_CASE} not measured"}
    p = case["paths"]
    fused = p.get("fused", {})
    out: dict[str, Any] = {"case": TARGET_CASE}

    def ratio(other: str, key: str = "fwd_bwd_ms") -> float | None:
        o = p.get(other, {})
        if key in fused and key in o:
            return o[key] / fused[key]
        return None

    out["fwd_bwd_speedup_vs_flex"] = ratio("flex")
    out["fwd_bwd_speedup_vs_flex_target"] = 1.5
    out["fwd_bwd_speedup_vs_sdpa_bias"] = ratio("sdpa")
    out["fwd_bwd_speedup_vs_sdpa_bias_target"] = 2.0
    out["fwd_bwd_speedup_vs_reference"] = ratio("reference")
    nm_gb = case["nm_bf16_gb"]
    out["nm_bf16_gb"] = nm_gb
    if "fwd_bwd_extra_gb" in fused:
        out["fused_fwd_bwd_extra_gb"] = fused["fwd_bwd_extra_gb"]
        out["fused_extra_over_nm"] = fused["fwd_bwd_extra_gb"] / nm_gb
    if "fwd_bwd_of_floor" in fused:
        out["fused_fwd_bwd_of_floor"] = fused["fwd_bwd_of_floor"]
        out["fused_fwd_of_floor"] = fused["fwd_of_floor"]
    mm = results.get("baselines", {}).get("matmul_bf16_tflops")
    if mm and fused.get("status") == "ok":
        out["fused_fwd_tflops"] = fused["fwd_tflops"]
        out["fwd_fraction_of_matmul"] = fused["fwd_tflops"] / mm
        out["fwd_fraction_of_matmul_target"] = 0.5
    for key, tgt in (
        ("fwd_bwd_speedup_vs_flex", 1.5),
        ("fwd_bwd_speedup_vs_sdpa_bias", 2.0),
        ("fwd_fraction_of_matmul", 0.5),
    ):
        if out.get(key) is not None:
            out[f"{key}_met"] = out[key] >= tgt
    return out


def _check_summary(r: dict[str, Any]) -> str:
    """One line per checked path: the worst tensor's error against its tolerance."""
    head = f"  check {r['case']:20s} {r['path']:10s} {r['status']:8s}"
    if r["status"] in ("ok", "FAIL"):
        return f"{head} {r['worst']}: {r['err']:.2e} (tol {r['tol']:.1e})"
    return f"{head} {r.get('why') or r.get('error', '')}"[:200]


def _fmt_row(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('why') or r.get('error') or r.get('attempted')}"[:160]
    parts = []
    for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
        if f"{mode}_ms" not in r:
            parts.append(f"{label} n/a")
            continue
        s = f"{label} {r[f'{mode}_ms']:9.3f} ms"
        if f"{mode}_tflops" in r:
            s += f" ({r[f'{mode}_tflops']:6.1f} TF/s, {r[f'{mode}_of_floor']:.2f} of floor)"
        parts.append(s)
    mem = r.get("fwd_bwd_extra_gb")
    return "  ".join(parts) + (f" extra {mem:7.3f} GB" if mem is not None else "")


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def print_summary(results: dict[str, Any]) -> None:
    """The table of an existing result: per case and path the times; on CUDA also the
    forward+backward rate, the roofline floor and the fraction of it reached."""
    interp = results.get("interpreter", results.get("env", {}).get("device") == "cpu")
    if interp:
        print("\n" + INTERPRETER_NOTE)
    b = results.get("baselines") or {}
    if b.get("matmul_bf16_tflops"):
        print(
            f"\nbf16 matmul 8192^3: {b['matmul_bf16_tflops']:.0f} TFLOP/s; "
            f"copy: {b.get('copy_tbps', float('nan')):.2f} TB/s"
        )
    head = f"\n{'case':22s} {'path':10s} {'fwd ms':>9s} {'f+b ms':>9s}"
    if not interp:
        head += f" {'f+b TF/s':>9s} {'floor ms':>9s} {'of floor':>8s} {'extra GB':>9s}"
    print(head)
    for name, c in results["cases"].items():
        if c.get("skipped"):
            print(f"{name:22s} skipped: {c['skipped']}")
            continue
        floor = (c.get("roofline") or {}).get("fwd_bwd", {}).get("floor_ms")
        for path, r in c["paths"].items():
            if r.get("status") != "ok":
                print(f"{name:22s} {path:10s} {r.get('status')}: {r.get('why', '')}"[:140])
                continue
            line = (
                f"{name:22s} {path:10s} {r['fwd_ms']:9.3f} {_num(r.get('fwd_bwd_ms'), '.3f'):>9s}"
            )
            if not interp:
                mem = r.get("fwd_bwd_extra_gb")
                line += (
                    f" {_num(r.get('fwd_bwd_tflops'), '.1f'):>9s} {_num(floor, '.4f'):>9s}"
                    f" {_num(r.get('fwd_bwd_of_floor'), '.2f'):>8s} {_num(mem, '.3f'):>9s}"
                )
            print(line)
    t = results.get("targets") or {}
    if t:
        print("\ntargets (" + TARGET_CASE + "):")
        for k, v in t.items():
            if k != "case":
                print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


def compile_time_estimate(gate: dict[str, Any], arch: str = "90") -> list[str]:
    """What the compile gate's JSON says the GPU run will spend compiling: per dtype, the
    sum of ``compile_s`` over the pinned rows for ``sm_<arch>`` (rows with ``pinned`` true;
    if no row carries that field, the selectable rows, an upper bound)."""
    rows = [r for r in gate.get("rows", []) if arch in str(r.get("arch", arch))]
    if any("pinned" in r for r in rows):
        chosen, what = [r for r in rows if r.get("pinned")], "pinned"
    else:
        chosen, what = [r for r in rows if r.get("selectable", True)], "selectable (no pins)"
    per_dtype: dict[str, list[float]] = {}
    for r in chosen:
        per_dtype.setdefault(str(r.get("dtype", "?")), []).append(float(r.get("compile_s", 0.0)))
    if not per_dtype:
        return [f"compile estimate: no {what} sm_{arch} rows in the compile gate's JSON"]
    lines = [
        f"compile estimate (sm_{arch}, {what} variants, compile_s as measured by the compile "
        "gate on its machine; Triton's on-disk cache then serves later processes):"
    ]
    for dtype, secs in sorted(per_dtype.items()):
        lines.append(f"  {dtype:9s} {len(secs):3d} variants  {sum(secs):7.1f} s")
    total = sum(sum(v) for v in per_dtype.values())
    lines.append(f"  {'total':9s} {len(chosen):3d} variants  {total:7.1f} s")
    return lines
