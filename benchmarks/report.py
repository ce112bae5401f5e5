"""Regenerate the result tables of README.md and docs/*.md from the committed JSON files.

    python -m benchmarks.report            # rewrite README.md and docs/*.md in place
    python -m benchmarks.report --check    # exit 1 if any of them is out of date

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
    modes = data.get("checkpointing_modes") or []
    if modes:
        lines += [
            "",
            f"Activation checkpointing, {modes[0]['model']} at batch {modes[0]['batch_size']} "
            f"({_PREC.get(head, head)}, {method}); one traced training step: TFLOP at 2 per "
            "multiply-add, GB read + written by its ops; + is what the recomputation adds:",
            "",
            "| row | mode | peak (GiB) | GiB / sample | step TFLOP | + TFLOP | + matmul TFLOP "
            "| step GB | + GB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in modes:
            lines.append(
                f"| {r['model']} | {r['checkpointing']} | {r['peak_memory_gb']:.2f} "
                f"| {r['per_sample_gb']:.3f} | {r['step_tflop']:.2f} | {r['extra_tflop']:+.2f} "
                f"| {r['extra_matmul_tflop']:+.2f} | {r['step_gb']:.1f} | {r['extra_gb']:+.1f} |"
            )
    return "\n".join(lines)


def step_model_table(data: dict) -> str:
    """benchmarks/step_model.py: per model, category and variant, H200 milliseconds;
    then step time and clips/s per GPU."""
    variants = ("eager", "selective", "fused")
    lines = [
        f"Model, not a measurement: one training step traced on FakeTensors "
        f"(`benchmarks/results/{data['_file']}`, {data['date'][:10]}, torch {data['torch']}), "
        "each op at its roofline; fused attention ops at the compile gate's model time. "
        "H200: "
        + data["gpus"]["H200"]["source"]
        + "; A100: "
        + data["gpus"]["A100"]["source"]
        + ".",
        "",
        "| model | category | eager GFLOP | eager GB | eager ms | selective ms | fused ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in data["models"].items():
        v = m["variants"]
        cats = v["eager"]["H200"]["categories"]
        for c, x in cats.items():
            ms = [v[k]["H200"]["categories"].get(c, {}).get("ms") for k in variants]
            lines.append(
                f"| {name} (batch {m['batch']}) | {c} | {x['flops'] / 1e9:.0f} "
                f"| {x['bytes'] / 1e9:.1f} | " + " | ".join(_f(t, 2) for t in ms) + " |"
            )
    lines += [
        "",
        "| model | batch | GPU | eager ms (clips/s) | selective ms (clips/s) | fused ms (clips/s) "
        "| dominant (eager) |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for name, m in data["models"].items():
        v = m["variants"]
        for gpu in data["gpus"]:
            cells = [
                f"{v[k][gpu]['step_ms']:.1f} ({v[k][gpu]['clips_per_s']:.0f})" for k in variants
            ]
            lines.append(
                f"| {name} | {m['batch']} | {gpu} | "
                + " | ".join(cells)
                + f" | {v['eager'][gpu]['dominant']} |"
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


def compile_gate_table(data: dict) -> str:
    """Per kernel: its pinned config and the worst figures over the model shapes, sm_90."""
    rows = data["rows"]
    env = data["environment"]
    from benchmarks.compile_gate import GATED_ARCHS, Row

    sel = [r for r in rows if r["selectable"]]
    bad = [r for r in rows if Row(**r).failures()]
    slow = [r for r in bad if not Row(**r).compile_problems()]
    ungated = [r for r in rows if r["arch"] not in GATED_ARCHS and Row(**r).compile_problems()]
    archs = "/".join(f"sm_{a}" for a in GATED_ARCHS)
    sm80 = [r for r in rows if r["arch"] == 80]
    spill80 = [r for r in sm80 if r["selectable"] and r["spill_bytes"] > 0]
    lines = [
        f"Compiled on: {env['host']}, triton {env['triton']}, {env['date'][:10]} "
        f"(`benchmarks/results/{data['_file']}`, subset `{data['subset']}`): "
        f"{len(rows)} variants, {len(sel)} selectable, {len(bad)} failing the gate ({archs}; "
        f"{len(slow)} of them only for speed: duplicated warps, mma.sync or C7515). "
        f"sm_80: {len(sm80)} variants, {sum(r['selectable'] for r in sm80)} selectable, "
        f"{len(spill80)} of them spilling."
        + (
            f" Not gated: {len(ungated)} variants spill (up to "
            f"{max([r['spill_bytes'] for r in ungated], default=0)} B)."
            if ungated
            else ""
        ),
        "",
        "| op | kernel | pinned config | max registers | max spill (B) | max shared (KiB) "
        "| tensor-core instr. | warp duplication | C7515 | compile s (pinned, all shapes) |",
        "|---|---|---|---:|---:|---:|---|---:|---|---:|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["arch"] == 90 and r["dtype"] == "bfloat16" and r["pinned"]:
            groups.setdefault((r["op"], r["kernel"]), []).append(r)
    for (op, kernel), rs in sorted(groups.items()):
        tc = "n/a (no matmul)" if not rs[0].get("needs_tensor_core", True) else (
            f"HGMMA, {min(r['tc_instructions'] for r in rs)}-{max(r['tc_instructions'] for r in rs)}"
        )  # fmt: skip
        dup = max(r.get("warp_duplication", 1.0) for r in rs)
        c7515 = sum(bool(r.get("wgmma_serialized")) for r in rs)
        lines.append(
            f"| {op} | `{kernel}` | {rs[0]['config']} | {max(r['registers'] for r in rs)} "
            f"| {max(r['spill_bytes'] for r in rs)} | {max(r['shared_bytes'] for r in rs) / 1024:.1f} "
            f"| {tc} | {dup:g} | {f'{c7515} of {len(rs)} shapes' if c7515 else 'no'} "
            f"| {sum(r['compile_s'] for r in rs):.1f} |"
        )
    before = RESULTS / "compile_gate_before.json"
    if before.exists():
        old = json.loads(before.read_text())["rows"]
        spilled = [r for r in old if r["spill_bytes"] > 0]
        lines += [
            "",
            f"Before this gate (the same tool on the previous kernels, bf16, sm_90, stage-1 shapes, "
            f"every autotune config): {len(spilled)} of {len(old)} variants spilled (up to "
            f"{max(r['spill_bytes'] for r in old)} B per thread), and the slowest took "
            f"{max(r['compile_s'] for r in old):.0f} s to compile.",
        ]
    return "\n".join(lines)


MODEL_BEFORE = "compile_gate_model_before.json"


def kernel_model_table(data: dict) -> str:
    """The compile gate's performance model per case: before (the kernels before issue 14's
    redesign, ``compile_gate_model_before.json``) and now (``compile_gate.json``)."""
    before_path = RESULTS / MODEL_BEFORE
    before = json.loads(before_path.read_text()) if before_path.exists() else data
    old = {c["case"]: c for c in before["cases"]}
    lines = [
        f"Estimated, not measured (no GPU has run these kernels): "
        f"`benchmarks/results/{data['_file']}` ({data['environment']['date'][:10]}) against "
        f"`benchmarks/results/{MODEL_BEFORE}` ({before['environment']['date'][:10]}, the kernels "
        "before the redesign). Forward + backward, bf16, pinned configs, sm_90; model = executed "
        "tensor-core FLOPs in whole waves / 790 TFLOP/s + the rel-pos CLS work on the CUDA cores "
        "/ 67 TFLOP/s + glue bytes / 4.3 TB/s; floor: the roofline above.",
        "",
        "| case | useful TFLOP | executed TFLOP before | now | executed / useful before | now "
        "| glue GB before | now | model ms before | now | floor ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in data["cases"]:
        b = old.get(c["case"], c)
        lines.append(
            f"| {c['case']} | {c['useful_tflop']:.3f} | {b['executed_tflop']:.3f} "
            f"| {c['executed_tflop']:.3f} | {b['executed_over_useful']:.2f} "
            f"| {c['executed_over_useful']:.2f} | {b['glue_bytes'] / 1e9:.3f} "
            f"| {c['glue_bytes'] / 1e9:.3f} | {b['model_ms']:.3f} | {c['model_ms']:.3f} "
            f"| {c['floor_ms']:.3f} |"
        )
    fails = data.get("case_failures", [])
    targets = "; ".join(
        f"{k}: " + ", ".join(f"{n} <= {v:g}" for n, v in t.items())
        for k, t in data["targets"].items()
    )
    missed = f"Missed now: {'; '.join(fails)}." if fails else "All met."
    lines += ["", f"Targets (`benchmarks.compile_gate.TARGETS`): {targets}. {missed}"]
    return "\n".join(lines)


def data_loader_table(data: dict) -> str:
    env = data["env"]
    load = data.get("load_average")
    load_txt = f", load average {load['start'][0]:.1f} at the start" if load else ""
    lines = [
        f"Measured on: {env['cpu']} ({env['cores']} cores, shared{load_txt}), one process, "
        f"one thread, torch {env['torch']}, decord {env['decord']}, PyAV {env['av']}, "
        f"{env['date'][:10]}{' (--quick)' if data['settings'].get('quick') else ''} "
        f"(`benchmarks/results/{data['_file']}`; before = {data['before_is']}).",
        "",
    ]
    if "rows" not in data:  # a result file from before `mmt-fast prepare`
        gpu = data["settings"]["gpu_clips_per_s"]
        lines += [
            f"| source | mode | before (clips/s per worker) | after | speed-up | workers per GPU "
            f"at {gpu:.0f} clips/s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for key, r in data["summary"].items():
            kind, mode = key.split("/")
            lines.append(
                f"| {kind} | {mode} | {r['before']:.2f} | {r['after']:.2f} | {r['speedup']:.1f}x "
                f"| {r['workers_per_gpu']:.0f} |"
            )
    else:
        rate = {
            (r["source"], r["mode"], r["prepared"], r["code"], r.get("device_transforms", False)): r
            for r in data["rows"]
        }
        lines += [
            "| source | mode | before (clips/s per worker) | after | prepared (`mmt-fast "
            "prepare`) | prepared vs after | prepared, device transforms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for src, mode, _, code, _ in rate:
            if code != "before":
                continue
            b, a = (
                rate[(src, mode, False, "before", False)],
                rate[(src, mode, False, "after", False)],
            )
            p = rate[(src, mode, True, "after", False)]
            d = rate.get((src, mode, True, "after", True))
            lines.append(
                f"| {src} | {mode} | {b['clips_per_s']:.2f} | {a['clips_per_s']:.2f} "
                f"| {p['clips_per_s']:.2f} ({p['short_side']} px) "
                f"| {p['clips_per_s'] / a['clips_per_s']:.1f}x "
                f"| {_f(d['clips_per_s'], 2) if d else '–'} |"
            )
    names = list(next(iter(data["stages_s"].values())))
    lines += [
        "",
        "| ms CPU per clip | " + " | ".join(n.replace("_", " ") for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, st in data["stages_s"].items():
        lines.append(f"| {key} | " + " | ".join(f"{1000 * st[n]:.0f}" for n in names) + " |")
    demand = data.get("demand")
    if demand:
        lines += [
            "",
            "| model preset | GPU | training clips/s the GPU consumes | how | workers per GPU: "
            "360p-10s | prepared | prepared, device transforms |",
            "|---|---|---:|---|---:|---:|---:|",
        ]
        for d in demand:
            w = d["workers_per_gpu"]
            dev = w.get("360p-10s prepared, device transforms")
            lines.append(
                f"| {d['preset']} | {d['gpu']} | {d['clips_per_s']:.0f} | {d['method']} "
                f"| {w['360p-10s']:.0f} | {w['360p-10s prepared']:.0f} | {_f(dev, 0)} |"
            )
    return "\n".join(lines)


SECTIONS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "flops_memory": ("flops_memory_cpu.json", flops_memory_table),
    "compile_gate": ("compile_gate.json", compile_gate_table),
    "kernel_model": ("compile_gate.json", kernel_model_table),
    "data_loader": ("data_cpu.json", data_loader_table),
    "mmt_flops": ("mmt_flops_readings.json", mmt_flops_table),
    "step_model": ("step_model.json", step_model_table),
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


def documents() -> list[Path]:
    """The files whose tables :func:`render` fills: README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        old = path.read_text()
        new = render(old)
        if old == new:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(new)
    if stale:
        print(
            f"tables out of date in {', '.join(stale)}: run python -m benchmarks.report",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
