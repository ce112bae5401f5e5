"""Regenerate the README's result tables from the committed JSON files.

    python -m benchmarks.report            # rewrite README.md in place
    python -m benchmarks.report --check    # exit 1 if README.md is out of date

Each table sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``
markers; nothing in them is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _pct(x, ref) -> str:
    return "" if x is None or ref is None else f"{100 * (x - ref) / ref:+.1f}%"


def _f(x, nd=1) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


_PREC = {"fp32": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}


def flops_memory_table(data: dict) -> str:
    head = data.get("precision")
    method = data.get("memory_method") or "estimated"
    lines = [
        f"Run on: {data['device']}, torch {data['torch']}, {data['date'][:10]} "
        f"(`benchmarks/results/{data['_file']}`). Memory: {method}, "
        f"{_PREC.get(head, head)}, GiB.",
        "",
        "| model | params (M) | paper | Δ | GFLOPs | paper | Δ | batch | peak train memory (GiB) | GiB / sample | method |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {_f(r['params_m'])} | {_f(r['paper_params_m'])} | {_pct(r['params_m'], r['paper_params_m'])} "
            f"| {_f(r['gflops'])} | {_f(r['paper_gflops'])} | {_pct(r['gflops'], r['paper_gflops'])} "
            f"| {r['batch_size'] or '–'} | {_f(r['peak_memory_gb'], 2)} | {_f(r.get('per_sample_gb'), 3)} "
            f"| {r['memory_method'] or '–'} |"
        )
    memory = data.get("memory") or {}
    precs = [p for p in ("fp32", "fp16", "bf16") if memory.get(p)]
    if precs:
        lines += [
            "",
            f"Peak training memory by precision ({method}, GiB at the batch shown; "
            "fp32 weights, gradients and AdamW state in every column):",
            "",
            "| model | batch | " + " | ".join(_PREC[p] for p in precs) + " |",
            "|---|---:|" + "---:|" * len(precs),
        ]
        for name, pts in memory[precs[0]].items():
            vals = [memory[p][name][-1]["peak_memory_gb"] for p in precs]
            lines.append(
                f"| {name} | {pts[-1]['batch_size']} | "
                + " | ".join(f"{v:.2f}" for v in vals)
                + " |"
            )
        ratios = data.get("per_sample_memory_ratios") or {}
        pairs = list(ratios.get(precs[0], {}))
        lines += [
            "",
            f"Per-sample training memory ratios (paper: **{data['paper_per_sample_memory_ratio']}x**, "
            "AST 20.6 GB at batch 8 / MAT 16.8 GB at batch 64 on a V100):",
            "",
            "| ratio | " + " | ".join(_PREC[p] for p in precs) + " |",
            "|---|" + "---:|" * len(precs),
        ]
        for pair in pairs:
            lines.append(
                f"| {pair} | " + " | ".join(f"{ratios[p][pair]:.2f}x" for p in precs) + " |"
            )
    return "\n".join(lines)


def mmt_flops_table(data: dict) -> str:
    lines = [
        f"Counted on: {data['device']}, torch {data['torch']}, {data['date'][:10]} "
        f"(`benchmarks/results/{data['_file']}`, `python -m benchmarks.mmt_flops`).",
        "",
        "| reading | AVBottleneck input tokens | video encoder | fusion | total GFLOPs | vs 206 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['reading']} | {r['avbottleneck_tokens']} | {r['video_encoder']:.1f} "
            f"| {r['fusion']:.1f} | {r['total']:.1f} | {100 * r['vs_paper']:+.1f}% |"
        )
    r0 = data["rows"][0]
    lines += [
        "",
        f"Common to every reading: MAT {r0['audio_encoder']:.1f} GFLOPs, heads, norms and "
        f"projections {r0['rest']:.3f}.",
    ]
    return "\n".join(lines)


SECTIONS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "flops_memory": ("flops_memory_cpu.json", flops_memory_table),
    "mmt_flops": ("mmt_flops_readings.json", mmt_flops_table),
}


def render(readme: str) -> str:
    for name, (fname, fn) in SECTIONS.items():
        path = RESULTS / fname
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        data["_file"] = fname
        body = fn(data)
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        readme = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), readme)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if args.check:
        if old != new:
            print(
                "README.md tables are out of date: run python -m benchmarks.report", file=sys.stderr
            )
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
