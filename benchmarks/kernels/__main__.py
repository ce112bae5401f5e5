"""``python -m benchmarks.kernels``: the command line (``--help`` lists the modes).

torch is imported only after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("benchmarks/results")


def _select(cases: dict[str, Any], wanted: Sequence[str] | None) -> dict[str, Any]:
    """The cases named (or prefixed) by ``wanted``, in the order asked for."""
    if not wanted:
        return cases
    unknown = [w for w in wanted if not any(n == w or n.startswith(w) for n in cases)]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(cases)}")
    out: dict[str, Any] = {}
    for w in wanted:
        out.update({n: c for n, c in cases.items() if n == w or n.startswith(w)})
    return out


def compile_report(argv: list[str]) -> int:
    """Run the compile gate, ``benchmarks.compile_gate.main(argv)``."""
    # import_module, not ``from benchmarks import compile_gate``: the latter takes the
    # package's attribute when another import (benchmarks.report) has loaded the module, and
    # skips sys.modules, which is what says whether the module is there
    try:
        compile_gate = importlib.import_module("benchmarks.compile_gate")
    except ImportError as e:
        print(
            "--compile-report needs benchmarks/compile_gate.py, which this checkout does not "
            f"have ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 2
    return int(compile_gate.main(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description="Speed and memory of the fused ops against the PyTorch alternatives, "
        "gated by a float64 check; the roofline of every case.",
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the only mode on the CPU)")
    ap.add_argument("--check", action="store_true", help="correctness of every path vs fp64 only")
    ap.add_argument("--roofline", action="store_true", help="print FLOPs, bytes, floors; no GPU")
    ap.add_argument(
        "--compile-report",
        action="store_true",
        help="run the compile gate (benchmarks.compile_gate) with the other arguments",
    )
    ap.add_argument("--train-memory", action="store_true", help="MAT training-step memory only")
    ap.add_argument("--replot", type=Path, help="redraw the plot of an existing JSON")
    ap.add_argument("--summary", type=Path, help="print the summary of an existing JSON")
    ap.add_argument(
        "--merge",
        nargs=2,
        type=Path,
        metavar=("INTO", "FROM"),
        help="add the paths timed in FROM (a run with --paths) to INTO's cases, targets redone",
    )
    ap.add_argument(
        "--compile-estimate",
        type=Path,
        metavar="GATE_JSON",
        help="print the compile time the compile gate's JSON predicts for the GPU run",
    )
    ap.add_argument(
        "--out", type=Path, help=f"output folder (default {DEFAULT_OUT}; --small: none)"
    )
    ap.add_argument("--cases", nargs="*", help="case names or prefixes, run in this order")
    ap.add_argument("--paths", nargs="*", help="paths to time (default: all)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop starting cases after this")
    ap.add_argument("--mat-batch", type=int, default=64, help="MAT, MMT (and training) batch")
    ap.add_argument("--model", default="MAT", help="--train-memory: the model preset")
    ap.add_argument("--video-batch", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="run FlexAttention eagerly")
    ap.add_argument(
        "--no-gate", action="store_true", help="time every path without checking it first"
    )
    return ap


def _print_train_summary(data: dict[str, Any]) -> None:
    for mode, r in data["modes"].items():
        keys = ("status", "peak_gb", "step_ms", "kernel_ops_seen", "error")
        print(f"train step {data['model']} batch {data['batch']} {mode}: "
              + ", ".join(f"{k}={r[k]}" for k in keys if k in r))  # fmt: skip
    for k in ("triton_over_reference_peak", "target", "target_met", "note"):
        if k in data:
            print(f"  {k}: {data[k]}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compile-report" in argv:
        argv.remove("--compile-report")
        return compile_report(argv)
    args = _parser().parse_args(argv)

    if args.compile_estimate:
        if not args.compile_estimate.is_file():
            print(
                f"compile estimate: {args.compile_estimate} not found (the compile gate writes it)"
            )
            return 0
        from benchmarks.kernels.summary import compile_time_estimate

        print("\n".join(compile_time_estimate(json.loads(args.compile_estimate.read_text()))))
        return 0
    if args.merge:
        return _merge(*args.merge)
    if args.summary:
        data = json.loads(args.summary.read_text())
        if "modes" in data:  # --train-memory
            _print_train_summary(data)
        else:
            from benchmarks.kernels.summary import print_summary

            print_summary(data)
        return 0
    if args.replot:
        from benchmarks.kernels.plot import plot

        data = json.loads(args.replot.read_text())
        print(plot(data, args.replot.with_suffix(".png")))
        return 0
    if args.roofline:
        return _roofline(args)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA: nothing to time (`--device cpu --small` checks the script on the CPU; "
            "`--roofline` prints the expected floors)"
        )
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        if not (args.small or args.check or args.train_memory):
            print("--device cpu runs only the tiny shapes: add --small")
            return 2
        # The kernels run through Triton's interpreter; set before any kernel is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if "kernels.relpos_attention" in sys.modules and os.environ["TRITON_INTERPRET"] == "0":
            print("TRITON_INTERPRET=0 on the CPU: the kernels cannot run")
            return 2
    return _run(args, device)


def _merge(into: Path, other: Path) -> int:
    """Add what ``other`` timed and checked (e.g. a bounded FlexAttention-only run) to the
    cases of ``into``; the targets are recomputed from the merged paths."""
    from benchmarks.kernels.summary import targets
    from benchmarks.kernels.timing import _write_json

    for f in (into, other):
        if not f.is_file():
            print(f"--merge: {f} not found")
            return 2
    data, extra = json.loads(into.read_text()), json.loads(other.read_text())
    merged = []
    for name, entry in extra["cases"].items():
        if name not in data["cases"]:
            continue
        dest = data["cases"][name]
        for path, r in entry.get("paths", {}).items():
            dest["paths"][path] = r
            merged.append(f"{name}/{path}")
        if "check" in entry:
            rows = {r["path"]: r for r in dest.get("check", {}).get("rows", [])}
            rows.update({r["path"]: r for r in entry["check"]["rows"]})
            dest.setdefault("check", entry["check"])["rows"] = list(rows.values())
    data["targets"] = targets(data)
    _write_json(into, data)
    print(f"merged into {into}: {', '.join(merged) or 'nothing'}")
    return 0


def _roofline(args: argparse.Namespace) -> int:
    from benchmarks.kernels import roofline
    from benchmarks.kernels.cases import real_cases
    from benchmarks.kernels.timing import _write_json

    cases = _select(real_cases(args.mat_batch, args.video_batch), args.cases)
    print(roofline.table(cases, itemsize=2))
    print("\n" + roofline.CONVENTION)
    if args.out:
        data = {
            "convention": roofline.CONVENTION,
            "peak_flops": roofline.PEAK_FLOPS,
            "peak_bytes_per_s": roofline.PEAK_BYTES,
            "dtype": "bfloat16",
            "cases": {
                n: {"shapes": c.shapes(), **roofline.roofline(c, 2)} for n, c in cases.items()
            },
        }
        _write_json(args.out / "roofline.json", data)
        print(f"\nwrote {args.out / 'roofline.json'}")
    return 0


def _run(args: argparse.Namespace, device) -> int:
    import torch

    from benchmarks.kernels.baselines import EAGER_FLEX_NOTE
    from benchmarks.kernels.cases import SMALL_SUBSET, check_cases, real_cases, small_cases
    from benchmarks.kernels.check import run_checks
    from benchmarks.kernels.plot import plot
    from benchmarks.kernels.summary import INTERPRETER_NOTE, print_summary
    from benchmarks.kernels.timing import _write_json, run_benchmarks
    from benchmarks.kernels.train_memory import train_memory

    cpu = device.type == "cpu"
    if cpu:
        print(f"NOTE: {INTERPRETER_NOTE}.")
    # bf16 arithmetic is broken in the interpreter: the CPU runs fp32.
    dtype = torch.float32 if cpu else torch.bfloat16
    compile_flex = not cpu and not args.no_compile
    if not compile_flex and not args.train_memory:
        print(f"NOTE: {EAGER_FLEX_NOTE}" + (" on the CPU." if cpu else " (--no-compile)."))

    if args.train_memory:
        res = train_memory(device, args.mat_batch, args.model)
        _write_json((args.out or DEFAULT_OUT) / "kernels_train_memory.json", res)
        print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1, default=str))
        return 0

    gate = None if args.no_gate else check_cases(device)
    if args.check:
        cases = _select(gate or check_cases(device), args.cases or SMALL_SUBSET)
        print(f"correctness: every path vs a float64 reference, {dtype}, {device}")
        rows = run_checks(device, dtype, cases, compile_flex, args.paths, verbose=True)
        return 1 if any(r["status"] in ("FAIL", "error") for r in rows) else 0

    if args.small:
        small = {n: c for n, c in small_cases().items() if n in SMALL_SUBSET}
        cases = _select(small, args.cases)
        out_json = args.out / "kernels_small.json" if args.out else None
    else:
        cases = _select(real_cases(args.mat_batch, args.video_batch), args.cases)
        out_json = (args.out or DEFAULT_OUT) / "kernels.json"
    if gate is not None:
        print(f"each path is checked against float64 ({dtype}) before it is timed")
    results = run_benchmarks(
        device,
        dtype,
        cases,
        out_json,
        compile_flex,
        args.budget_s,
        reps=1 if cpu else 3,
        paths=args.paths,
        gate=gate,
    )
    print_summary(results)
    if out_json:
        png = plot(results, out_json.with_suffix(".png"))
        print(f"\nwrote {out_json}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
