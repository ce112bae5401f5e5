"""Params, FLOPs and training memory of AST, MAT, MViTv2-B and MMT, beside the
paper's figures (Table 2 and § 4).

    python -m benchmarks.flops_memory [--precision fp16|bf16|fp32|all] [--json out.json] [--plot out.png]

FLOPs: fvcore, one multiply-add = one FLOP, attention included (see
``mmt_fast.profiling``), batch 1, full input sizes (128x1024 spectrogram,
16x224x224 clip). Training memory: one AdamW step with fp32 weights, in the
chosen precision (default fp16 autocast, the paper's V100 setting; AST's own
training code also uses fp16 autocast + GradScaler); measured on CUDA,
estimated without computing on a machine without it (FakeTensorMode + a
memory tracker, CUDA's autocast cast policy). Memory is in GiB (2**30 bytes),
as nvidia-smi reports it. Each row is printed as it completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

import mmt_fast
from mmt_fast import create_model
from mmt_fast.models.checkpointing import set_activation_checkpointing
from mmt_fast.profiling import (
    PRECISIONS,
    count_flops,
    count_params,
    estimate_step_memory,
    fake_mode,
    measure_train_memory,
)

NUM_CLASSES = 309  # VGGSound
GiB = 2**30
AUDIO = (1, 128, 1024)
VIDEO = (3, 16, 224, 224)
PAPER_PRECISION = "fp16"  # V100: fp16 autocast (no bf16 on that GPU)
PRECISION_LABEL = {"fp32": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}

# name -> (preset, config overrides, forward inputs, paper params (M), paper GFLOPs, source)
MODELS = {
    "AST": ("AST", {}, {"x": AUDIO}, 87.0, 131.0, "MMT paper, Table 2 / § 4"),
    "AST (SDPA)": (
        "AST",
        {"attn_impl": "sdpa"},
        {"x": AUDIO},
        87.0,
        131.0,
        "the same model as AST, with F.scaled_dot_product_attention",
    ),
    "MAT": ("MAT", {}, {"x": AUDIO}, 52.0, 46.2, "MMT paper, Table 2 / § 4"),
    "MAT (kernels)": (
        "MAT",
        {},
        {"x": AUDIO},
        52.0,
        46.2,
        "the same model as MAT, with the fused Triton ops",
    ),
    "MAT (kernels, stage1)": (
        "MAT",
        {},
        {"x": AUDIO},
        52.0,
        46.2,
        "MAT (kernels), first-stage blocks recomputed",
    ),
    "MAT (kernels, blocks)": (
        "MAT",
        {},
        {"x": AUDIO},
        52.0,
        46.2,
        "MAT (kernels), every block recomputed",
    ),
    "MAT (kernels, selective)": (
        "MAT",
        {},
        {"x": AUDIO},
        52.0,
        46.2,
        "MAT (kernels), selective recomputation (matmul outputs kept)",
    ),
    "AST (SDPA, selective)": (
        "AST",
        {"attn_impl": "sdpa"},
        {"x": AUDIO},
        87.0,
        131.0,
        "AST (SDPA) with the same selective recomputation",
    ),
    "MViTv2-B-16": (
        "MViTv2-B-16",
        {},
        {"x": VIDEO},
        51.2,
        None,
        "params: MViTv2 paper (MViTv2-B); no 16-frame FLOPs published",
    ),
    "MMT": (
        "MMT",
        {},
        {"audio": AUDIO, "video": VIDEO},
        None,
        206.0,
        "MMT paper, Table 2 (Epic-Kitchens)",
    ),
}
# training-memory rows: model -> (headline batch, second batch for the curve, paper peak GB)
MEMORY = {
    "AST": (8, 2, 20.6),
    "AST (SDPA)": (8, 2, None),
    "MAT": (64, 16, 16.8),
    "MAT (kernels)": (64, 16, None),
    "MAT (kernels, stage1)": (64, 16, None),
    "MAT (kernels, blocks)": (64, 16, None),
    "MAT (kernels, selective)": (64, 16, None),
    "AST (SDPA, selective)": (8, 2, None),
}
# rows whose fused ops take the Triton path (or its fake)
KERNEL_ROWS = {n for n in MEMORY if n.startswith("MAT (kernels")}
# activation checkpointing per row (mmt_fast.models.checkpointing); "none" otherwise
CHECKPOINTING = {
    "MAT (kernels, stage1)": "stage1",
    "MAT (kernels, blocks)": "blocks",
    "MAT (kernels, selective)": "selective",
    "AST (SDPA, selective)": "selective",
}
# the rows whose recomputation cost is traced (benchmarks.step_model): MAT (kernels) per mode
MODE_ROWS = ("MAT (kernels)", "MAT (kernels, stage1)", "MAT (kernels, blocks)",
             "MAT (kernels, selective)")  # fmt: skip
PAPER_RATIO = 9.8
# per-sample ratios reported: (numerator, denominator)
RATIOS = (
    ("AST", "MAT"),
    ("AST", "MAT (kernels)"),
    ("AST (SDPA)", "MAT (kernels)"),
    ("AST", "MAT (kernels, selective)"),
    ("AST (SDPA, selective)", "MAT (kernels, selective)"),
)


def _build(name: str):
    preset, overrides = MODELS[name][0], MODELS[name][1]
    mode = CHECKPOINTING.get(name, "none")
    return lambda: set_activation_checkpointing(
        create_model(preset, num_classes=NUM_CLASSES, **overrides), mode
    )


# encoders whose FLOPs are read off the MMT count (fvcore's per-module totals)
# plus their own head, instead of tracing them a second time
MMT_ENCODERS = {"MAT": "audio_encoder", "MViTv2-B-16": "video_encoder"}


def _count_direct(preset: str, shapes: dict, modules: tuple[str, ...] = ()):
    model = create_model(preset, num_classes=NUM_CLASSES)
    inputs = {k: torch.randn(1, *s) for k, s in shapes.items()}
    args = (inputs["x"],) if set(inputs) == {"x"} else inputs
    return model, count_flops(model, args, modules=modules)


def preset_flops(preset: str, shapes: dict, cache: dict[str, tuple[float, int]]) -> None:
    """Fill ``cache[preset] = (FLOPs, params)``. FLOPs are a property of the
    model: the kernels and SDPA compute the same one, and count_flops runs the
    references (whose ops fvcore counts). MAT and MViTv2-B-16 are read off
    the MMT trace (the same encoder configs; checked) plus their heads."""
    if preset in cache:
        return
    if preset == "MMT" or preset in MMT_ENCODERS:
        if "MMT" not in cache:
            mmt, f = _count_direct("MMT", MODELS["MMT"][2], tuple(MMT_ENCODERS.values()))
            cache["MMT"] = (f["total"], count_params(mmt))
            cache["_mmt_modules"] = {k: f[f"module:{k}"] for k in MMT_ENCODERS.values()}
            cache["_mmt_cfg"] = mmt.cfg
            del mmt
        if preset == "MMT":
            return
        sub = MMT_ENCODERS[preset]
        model = create_model(preset, num_classes=NUM_CLASSES)
        enc_cfg = getattr(cache["_mmt_cfg"], "audio" if sub == "audio_encoder" else "video")
        if dataclasses.replace(enc_cfg, num_classes=NUM_CLASSES) == model.cfg:
            head = count_flops(model.head, (torch.randn(1, model.num_features),))["total"]
            cache[preset] = (cache["_mmt_modules"][sub] + head, count_params(model))
            return
    model, f = _count_direct(preset, next(v[2] for v in MODELS.values() if v[0] == preset))
    cache[preset] = (f["total"], count_params(model))


def flops_row(name: str, cache: dict) -> dict:
    preset, _, shapes, p_params, p_gflops, _ = MODELS[name]
    preset_flops(preset, shapes, cache)
    total, n_params = cache[preset]
    return {
        "model": name,
        "params_m": n_params / 1e6,
        "gflops": total / 1e9,
        "paper_params_m": p_params,
        "paper_gflops": p_gflops,
        "precision": None,
        "batch_size": None,
        "peak_memory_gb": None,
        "per_sample_gb": None,
        "memory_method": None,
    }


def memory_points(name: str, device: str, precisions: list[str]) -> dict[str, list[dict]]:
    """Peak training memory of one model at its two batch sizes, per precision.
    On the CPU the model is built once (fake) and stepped per setting."""
    batch, small, _ = MEMORY[name]
    kernels = name in KERNEL_ROWS
    shapes = MODELS[name][2]
    out: dict[str, list[dict]] = {}
    if device == "cuda":
        for prec in precisions:
            out[prec] = []
            for bs in (small, batch):
                res = measure_train_memory(
                    _build(name), shapes, bs, NUM_CLASSES, kernels=kernels, precision=prec
                )
                out[prec].append(_point(bs, res))
        return out
    with fake_mode(kernels):
        model = _build(name)()
        for prec in precisions:
            out[prec] = [
                _point(bs, estimate_step_memory(model, shapes, bs, NUM_CLASSES, prec))
                for bs in (small, batch)
            ]
        del model
    return out


def _point(bs: int, res) -> dict:
    return {
        "batch_size": bs,
        "peak_memory_gb": res.peak_bytes / GiB,
        "method": res.method,
        "breakdown_gb": {k: v / GiB for k, v in res.breakdown.items()},
    }


def step_cost(name: str) -> dict[str, float]:
    """One traced training step of ``name`` at its headline batch in the paper's precision
    (:func:`benchmarks.step_model.trace_step`, FakeTensors): its FLOPs (2 per
    multiply-add, all ops and the matmuls alone) and the bytes its ops read and write."""
    from benchmarks.step_model import totals, trace_step

    preset, overrides, shapes = MODELS[name][0], MODELS[name][1], MODELS[name][2]
    step = trace_step(
        preset, MEMORY[name][0], shapes, CHECKPOINTING.get(name, "none"),
        PAPER_PRECISION, name in KERNEL_ROWS, **overrides,
    )  # fmt: skip
    t = totals(step)
    return {
        "step_tflop": t["flops"] / 1e12,
        "step_matmul_tflop": t["matmul_flops"] / 1e12,
        "step_gb": t["bytes"] / 1e9,
    }


def mode_rows(rows: list[dict], costs: dict[str, dict]) -> list[dict]:
    """MAT (kernels) per checkpointing mode: peak, per sample, and what the recomputation
    adds per step over no checkpointing (FLOPs, matmul FLOPs, bytes)."""
    by_name = {r["model"]: r for r in rows}
    base = costs[MODE_ROWS[0]]
    out = []
    for name in MODE_ROWS:
        r, c = by_name[name], costs[name]
        out.append(
            {
                "model": name,
                "checkpointing": CHECKPOINTING.get(name, "none"),
                "batch_size": r["batch_size"],
                "peak_memory_gb": r["peak_memory_gb"],
                "per_sample_gb": r["per_sample_gb"],
                **c,
                "extra_tflop": c["step_tflop"] - base["step_tflop"],
                "extra_matmul_tflop": c["step_matmul_tflop"] - base["step_matmul_tflop"],
                "extra_gb": c["step_gb"] - base["step_gb"],
            }
        )
    return out


MODE_HEAD = (
    f"{'MAT (kernels), batch 64':<26}{'mode':>10}{'peak GiB':>10}{'GiB/sample':>12}"
    f"{'step TFLOP':>12}{'+TFLOP':>9}{'+matmul':>9}{'step GB':>9}{'+GB':>8}"
)


def format_mode_row(r: dict) -> str:
    return (
        f"{r['model']:<26}{r['checkpointing']:>10}{r['peak_memory_gb']:>10.2f}"
        f"{r['per_sample_gb']:>12.3f}{r['step_tflop']:>12.2f}{r['extra_tflop']:>+9.2f}"
        f"{r['extra_matmul_tflop']:>+9.2f}{r['step_gb']:>9.1f}{r['extra_gb']:>+8.1f}"
    )


def affine(points: list[dict]) -> tuple[float, float]:
    """(fixed GiB, GiB per sample) of the line through the two points."""
    (b0, m0), (b1, m1) = ((p["batch_size"], p["peak_memory_gb"]) for p in points)
    slope = (m1 - m0) / (b1 - b0)
    return m0 - slope * b0, slope


def ratios(points: dict[str, list[dict]]) -> dict[str, float]:
    """Per-sample training memory at each model's headline batch: peak / batch,
    numerator over denominator, for the pairs in RATIOS."""
    per = {n: pts[-1]["peak_memory_gb"] / pts[-1]["batch_size"] for n, pts in points.items()}
    return {f"{a} / {b}": per[a] / per[b] for a, b in RATIOS if a in per and b in per}


def plot(
    points: dict[str, list[dict]], path: Path, device_label: str, precision: str = "fp16"
) -> None:
    """Memory vs batch size: solid between the two computed points, dashed
    where the line is extrapolated beyond them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    colors = {
        "AST": "tab:red",
        "AST (SDPA)": "tab:orange",
        "MAT": "tab:blue",
        "MAT (kernels)": "tab:green",
        "MAT (kernels, stage1)": "tab:olive",
        "MAT (kernels, blocks)": "tab:cyan",
        "MAT (kernels, selective)": "tab:purple",
        "AST (SDPA, selective)": "tab:brown",
    }
    bmax = 64
    for name, pts in points.items():
        color = colors.get(name, "tab:gray")
        fixed, per = affine(pts)
        lo, hi = pts[0]["batch_size"], pts[-1]["batch_size"]
        method = pts[0]["method"]
        ax.plot(
            [lo, hi],
            [fixed + per * lo, fixed + per * hi],
            color=color,
            lw=2,
            label=f"{name} ({method}: {per:.3f} GiB/sample + {fixed:.2f} GiB)",
        )
        for a, b in ((1, lo), (hi, bmax)):
            if b > a:
                ax.plot([a, b], [fixed + per * a, fixed + per * b], color=color, lw=1.5, ls="--")
        ax.scatter(
            [p["batch_size"] for p in pts],
            [p["peak_memory_gb"] for p in pts],
            color=color,
            zorder=3,
        )
        batch, _, paper = MEMORY.get(name, (None, None, None))
        if paper is None:
            continue
        ax.scatter(
            [batch],
            [paper],
            marker="*",
            s=160,
            color=color,
            edgecolor="k",
            zorder=4,
            label=f"{name}, paper (batch {batch}, V100): {paper} GB",
        )
    ax.plot(
        [], [], color="k", lw=1.5, ls="--", label="dashed: extrapolated beyond the computed points"
    )
    for cap, lab in ((32, "V100 32 GB (32 GiB)"), (40, "A100 40 GB (40 GiB)")):
        ax.axhline(cap, color="grey", ls=":", lw=1)
        ax.text(1.5, cap + 0.8, lab, color="grey", fontsize=8)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"peak training memory (GiB), {PRECISION_LABEL[precision]} + AdamW")
    ax.set_title(
        f"Training memory vs batch size, 128x1024 spectrogram ({device_label})", fontsize=10
    )
    ax.set_xlim(0, bmax + 2)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _pct(x: float | None, ref: float | None) -> str:
    return "" if x is None or ref is None else f"{100 * (x - ref) / ref:+.1f}%"


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


HEAD = (
    f"{'model':<26}{'params M':>9}{'paper':>7}{'dev':>8}{'GFLOPs':>9}{'paper':>8}{'dev':>8}"
    f"{'batch':>7}{'peak GiB':>10}{'GiB/sample':>12}  memory"
)


def format_row(r: dict) -> str:
    return (
        f"{r['model']:<26}{_fmt(r['params_m']):>9}{_fmt(r['paper_params_m']):>7}"
        f"{_pct(r['params_m'], r['paper_params_m']):>8}{_fmt(r['gflops']):>9}"
        f"{_fmt(r['paper_gflops']):>8}{_pct(r['gflops'], r['paper_gflops']):>8}"
        f"{_fmt(r['batch_size'], 0) if r['batch_size'] else '-':>7}"
        f"{_fmt(r['peak_memory_gb'], 2):>10}{_fmt(r['per_sample_gb'], 3):>12}"
        f"  {r['memory_method'] or '-'}"
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEAD, "-" * len(HEAD)] + [format_row(r) for r in rows])


def _parse_precisions(value: str) -> list[str]:
    if value == "all":
        return [PAPER_PRECISION] + [p for p in PRECISIONS if p != PAPER_PRECISION]
    out = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in out if v not in PRECISIONS]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"--precision {value!r}: expected one of {', '.join(PRECISIONS)}, a comma list, or all"
        )
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.flops_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--plot", type=Path, help="write a memory-vs-batch-size PNG here")
    parser.add_argument(
        "--precision",
        type=_parse_precisions,
        default=[PAPER_PRECISION],
        help="training precision(s) of the memory rows: fp16 (autocast, the paper's; default), "
        "bf16 (autocast), fp32, a comma list, or all. The table shows the first; the JSON holds all",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cuda: measure memory; cpu: estimate it (default: cuda when available)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the training-memory rows")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw --plot from a saved --json file"
    )
    return parser


def _replot(source: Path, out: Path) -> int:
    data = json.loads(source.read_text())
    cpu = data["device"].startswith("cpu")
    label = "estimated, no GPU" if cpu else "measured on " + data["device"]
    plot(data["memory_points"], out, label, data.get("precision", "fp32"))
    print(f"wrote {out}")
    return 0


def _print_header(device: str, device_name: str, head: str, memory: bool) -> None:
    print(f"mmt-fast {mmt_fast.__version__} | torch {torch.__version__} | device: {device_name}")
    print("FLOPs: fvcore, 1 multiply-add = 1 FLOP, batch 1, attention counted.")
    if memory:
        how = (
            "measured with torch.cuda.max_memory_allocated"
            if device == "cuda"
            else "ESTIMATED, not measured: no GPU here, so one step is traced on shapes only "
            "(FakeTensorMode) with CUDA's autocast policy"
        )
        print(
            f"Memory: peak of one AdamW training step, {PRECISION_LABEL[head]}, fp32 weights, "
            f"GiB = 2^30 bytes; {how}."
        )
    print()
    print(HEAD)
    print("-" * len(HEAD), flush=True)


def _model_rows(device: str, precisions: list[str], memory_rows: bool):
    """One row per model (FLOPs, params and, with ``memory_rows``, the memory of the head
    precision), printed as each completes; and every precision's memory points."""
    head = precisions[0]
    rows: list[dict] = []
    cache: dict = {}
    memory: dict[str, dict[str, list[dict]]] = {p: {} for p in precisions}
    for name in MODELS:
        t = time.time()
        row = flops_row(name, cache)
        if name in MEMORY and memory_rows:
            per_prec = memory_points(name, device, precisions)
            for prec, pts in per_prec.items():
                memory[prec][name] = pts
            top = per_prec[head][-1]
            row.update(
                precision=head,
                batch_size=top["batch_size"],
                peak_memory_gb=top["peak_memory_gb"],
                per_sample_gb=top["peak_memory_gb"] / top["batch_size"],
                memory_method=f"{top['method']}, {PRECISION_LABEL[head]}",
            )
        rows.append(row)
        print(f"{format_row(row)}   [{time.time() - t:.0f} s]", flush=True)
    return rows, memory


def _checkpointing_modes(rows: list[dict], head: str) -> list[dict]:
    costs = {n: step_cost(n) for n in MODE_ROWS}
    modes = mode_rows(rows, costs)
    print(
        "\nactivation checkpointing (mmt_fast.models.checkpointing), one traced step in "
        f"{PRECISION_LABEL[head]}: FLOPs 2 per multiply-add, GB read + written by its ops; "
        "+: what the recomputation adds"
    )
    print(MODE_HEAD)
    print("-" * len(MODE_HEAD))
    for r in modes:
        print(format_mode_row(r))
    return modes


def _print_ratios(all_ratios: dict, precisions: list[str], method: str) -> None:
    head = precisions[0]
    if head not in all_ratios:
        return
    print(
        f"\nper-sample training memory ({method}, {PRECISION_LABEL[head]}), "
        f"paper {PAPER_RATIO}x (AST 20.6 GB / 8 vs MAT 16.8 GB / 64):"
    )
    for pair, r in all_ratios[head].items():
        print(f"  {pair:<50} {r:5.2f}x")
    for prec in precisions[1:]:
        line = ", ".join(f"{k} {v:.2f}x" for k, v in all_ratios[prec].items())
        print(f"  {PRECISION_LABEL[prec]}: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH")
        return _replot(args.replot, args.plot)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.plot and args.no_memory:
        parser.error("--plot needs the memory rows (drop --no-memory)")
    device_name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    precisions: list[str] = args.precision
    head = precisions[0]
    method = "measured" if device == "cuda" else "estimated"
    _print_header(device, device_name, head, not args.no_memory)

    t0 = time.time()
    rows, memory = _model_rows(device, precisions, not args.no_memory)
    modes: list[dict] = []
    if not args.no_memory and head == PAPER_PRECISION:
        modes = _checkpointing_modes(rows, head)
    elapsed = time.time() - t0
    all_ratios = {p: ratios(pts) for p, pts in memory.items() if pts}
    _print_ratios(all_ratios, precisions, method)
    print(f"\n[{elapsed:.0f} s in all]")

    if args.json:
        payload = {
            "device": device_name,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "flops_convention": "fvcore: one multiply-add = one FLOP; batch 1; attention counted",
            "memory_unit": "GiB (2**30 bytes)",
            "memory_method": method if not args.no_memory else None,
            "precision": head if not args.no_memory else None,
            "rows": rows,
            "per_sample_memory_ratios": all_ratios,
            "paper_per_sample_memory_ratio": PAPER_RATIO,
            "memory_points": memory.get(head, {}),
            "checkpointing_modes": modes,
            "memory": memory,
            "paper_sources": {k: v[5] for k, v in MODELS.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        label = "measured on " + device_name if device == "cuda" else "estimated, no GPU"
        plot(memory[head], args.plot, label, head)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
