"""Params, FLOPs and training memory of AST, MAT, MViTv2-B and MMT, beside the
paper's figures (Table 2 and § 4).

    python -m benchmarks.flops_memory [--json out.json] [--plot out.png]

FLOPs: fvcore, one multiply-add = one FLOP, attention included (see
``mmt_fast.profiling``), batch 1, full input sizes (128x1024 spectrogram,
16x224x224 clip). Training memory (fp32 weights and activations, AdamW):
measured on CUDA, estimated without computing on a machine without it
(FakeTensorMode + MemTracker). GB here is GiB (2**30 bytes), as nvidia-smi
reports it. Runs on the CPU in about two minutes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

import mmt_fast
from mmt_fast import create_model
from mmt_fast.profiling import (
    count_flops,
    count_params,
    estimate_train_memory,
    measure_train_memory,
)

NUM_CLASSES = 309  # VGGSound
GiB = 2**30
AUDIO = (1, 128, 1024)
VIDEO = (3, 16, 224, 224)

# name -> (preset, forward inputs, paper params (M), paper GFLOPs, source)
MODELS = {
    "AST": ("AST", {"x": AUDIO}, 87.0, 131.0, "MMT paper, Table 2 / § 4"),
    "MAT": ("MAT", {"x": AUDIO}, 52.0, 46.2, "MMT paper, Table 2 / § 4"),
    "MAT (kernels)": (
        "MAT",
        {"x": AUDIO},
        52.0,
        46.2,
        "the same model as MAT, with the fused Triton ops",
    ),
    "MViTv2-B-16": (
        "MViTv2-B-16",
        {"x": VIDEO},
        51.2,
        None,
        "params: MViTv2 paper (MViTv2-B); no 16-frame FLOPs published",
    ),
    "MMT": (
        "MMT",
        {"audio": AUDIO, "video": VIDEO},
        None,
        206.0,
        "MMT paper, Table 2 (Epic-Kitchens)",
    ),
}
# training-memory rows: model -> (headline batch, second batch for the curve, paper peak GB)
MEMORY = {"AST": (8, 2, 20.6), "MAT": (64, 16, 16.8), "MAT (kernels)": (64, 16, None)}
KERNEL_ROWS = {
    "MAT (kernels)"
}  # rows whose fused ops take the Triton path (or its fake implementation)
PAPER_RATIO = 9.8


def _build(preset: str):
    return lambda: create_model(preset, num_classes=NUM_CLASSES)


def flops_rows() -> list[dict]:
    """FLOPs are counted once per preset: the kernels compute the same model
    (``count_flops`` runs the references, whose ops fvcore counts)."""
    rows = []
    counted: dict[str, tuple[float, int]] = {}
    for name, (preset, shapes, p_params, p_gflops, _) in MODELS.items():
        if preset not in counted:
            model = create_model(preset, num_classes=NUM_CLASSES)
            inputs = {k: torch.randn(1, *s) for k, s in shapes.items()}
            if set(inputs) == {"x"}:
                inputs = (inputs["x"],)
            counted[preset] = (count_flops(model, inputs)["total"], count_params(model))
            del model
        total, n_params = counted[preset]
        rows.append(
            {
                "model": name,
                "params_m": n_params / 1e6,
                "gflops": total / 1e9,
                "paper_params_m": p_params,
                "paper_gflops": p_gflops,
                "batch_size": None,
                "peak_memory_gb": None,
                "memory_method": None,
            }
        )
    return rows


def memory_points(device: str) -> dict[str, list[dict]]:
    """Peak training memory at two batch sizes per model."""
    points: dict[str, list[dict]] = {}
    for name, (batch, small, _paper) in MEMORY.items():
        if name not in MODELS:
            continue
        preset, shapes = MODELS[name][0], MODELS[name][1]
        points[name] = []
        kernels = name in KERNEL_ROWS
        for bs in (small, batch):
            if device == "cuda":
                res = measure_train_memory(_build(preset), shapes, bs, NUM_CLASSES, kernels=kernels)
            else:
                res = estimate_train_memory(
                    _build(preset), shapes, bs, NUM_CLASSES, kernels=kernels
                )
            points[name].append(
                {"batch_size": bs, "peak_memory_gb": res.peak_bytes / GiB, "method": res.method}
            )
    return points


def _affine(points: list[dict]) -> tuple[float, float]:
    (b0, m0), (b1, m1) = ((p["batch_size"], p["peak_memory_gb"]) for p in points)
    slope = (m1 - m0) / (b1 - b0)
    return m0 - slope * b0, slope


def plot(points: dict[str, list[dict]], path: Path, device_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    colors = {"AST": "tab:red", "MAT": "tab:blue", "MAT (kernels)": "tab:green"}
    bmax = 64
    for name, pts in points.items():
        fixed, per = _affine(pts)
        xs = list(range(1, bmax + 1))
        method = pts[0]["method"]
        ax.plot(
            xs,
            [fixed + per * b for b in xs],
            color=colors[name],
            lw=2,
            ls="--" if name in KERNEL_ROWS else "-",
            label=f"{name} ({method}: {per:.2f} GB/sample + {fixed:.2f} GB)",
        )
        ax.scatter(
            [p["batch_size"] for p in pts],
            [p["peak_memory_gb"] for p in pts],
            color=colors[name],
            zorder=3,
        )
        batch, _, paper = MEMORY[name]
        if paper is None:
            continue
        ax.scatter(
            [batch],
            [paper],
            marker="*",
            s=160,
            color=colors[name],
            edgecolor="k",
            zorder=4,
            label=f"{name}, paper (batch {batch}): {paper} GB",
        )
    for cap, lab in ((32, "V100 32 GB"), (40, "A100 40 GB")):
        ax.axhline(cap, color="grey", ls=":", lw=1)
        ax.text(1.5, cap + 0.8, lab, color="grey", fontsize=8)
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak training memory (GiB), fp32 + AdamW")
    ax.set_title(f"Training memory vs batch size, 128x1024 spectrogram ({device_label})")
    ax.set_xlim(0, bmax + 2)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _pct(x: float | None, ref: float | None) -> str:
    return "" if x is None or ref is None else f"{100 * (x - ref) / ref:+.1f}%"


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<13}{'params M':>9}{'paper':>7}{'dev':>8}{'GFLOPs':>9}{'paper':>8}{'dev':>8}{'batch':>7}{'peak GB':>9}  method"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<13}{_fmt(r['params_m']):>9}{_fmt(r['paper_params_m']):>7}"
            f"{_pct(r['params_m'], r['paper_params_m']):>8}{_fmt(r['gflops']):>9}"
            f"{_fmt(r['paper_gflops']):>8}{_pct(r['gflops'], r['paper_gflops']):>8}"
            f"{_fmt(r['batch_size'], 0) if r['batch_size'] else '-':>7}{_fmt(r['peak_memory_gb'], 2):>9}  {r['memory_method'] or '-'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.flops_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--plot", type=Path, help="write a memory-vs-batch-size PNG here")
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
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH")
        data = json.loads(args.replot.read_text())
        cpu = data["device"].startswith("cpu")
        label = "estimated, no GPU" if cpu else "measured on " + data["device"]
        plot(data["memory_points"], args.plot, label)
        print(f"wrote {args.plot}")
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    device_name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )

    t0 = time.time()
    rows = flops_rows()
    t_flops = time.time() - t0
    points: dict[str, list[dict]] = {}
    if not args.no_memory:
        points = memory_points(device)
        for r in rows:
            if r["model"] in points:
                head = points[r["model"]][-1]
                r.update(
                    batch_size=head["batch_size"],
                    peak_memory_gb=head["peak_memory_gb"],
                    memory_method=head["method"],
                )
    elapsed = time.time() - t0

    print(f"mmt-fast {mmt_fast.__version__} | torch {torch.__version__} | device: {device_name}")
    print(
        "FLOPs: fvcore, 1 multiply-add = 1 FLOP, batch 1, attention counted. Memory: fp32 + AdamW training step.\n"
    )
    print(format_table(rows))
    ratio = ratio_k = saved = None
    if points:
        mem = {r["model"]: r for r in rows if r["peak_memory_gb"] is not None}
        ast, mat = mem["AST"], mem["MAT"]
        ratio = (ast["peak_memory_gb"] / ast["batch_size"]) / (
            mat["peak_memory_gb"] / mat["batch_size"]
        )
        method = mat["memory_method"]
        print(
            f"\nper-sample training memory, AST (batch {ast['batch_size']}) / MAT (batch {mat['batch_size']}): "
            f"{ratio:.2f}x ({method})   paper: {PAPER_RATIO}x (20.6 GB / 8 vs 16.8 GB / 64)"
        )
        if "MAT (kernels)" in mem:
            fused = mem["MAT (kernels)"]
            ratio_k = (ast["peak_memory_gb"] / ast["batch_size"]) / (
                fused["peak_memory_gb"] / fused["batch_size"]
            )
            saved = fused["peak_memory_gb"] / mat["peak_memory_gb"]
            print(
                f"with the fused kernels: AST / MAT (kernels) per sample {ratio_k:.2f}x; "
                f"MAT (kernels) / MAT at batch {mat['batch_size']}: {saved:.2f}"
            )
    print(f"\n[{t_flops:.0f} s FLOPs, {elapsed:.0f} s in all]")

    if args.json:
        payload = {
            "device": device_name,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "flops_convention": "fvcore: one multiply-add = one FLOP; batch 1; attention counted",
            "rows": rows,
            "per_sample_memory_ratio_ast_over_mat": ratio,
            "per_sample_memory_ratio_ast_over_mat_kernels": ratio_k,
            "memory_ratio_mat_kernels_over_mat": saved,
            "paper_per_sample_memory_ratio": PAPER_RATIO,
            "memory_points": points,
            "paper_sources": {k: v[4] for k, v in MODELS.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        if not points:
            parser.error("--plot needs the memory rows (drop --no-memory)")
        plot(
            points,
            args.plot,
            "measured on " + device_name if device == "cuda" else "estimated, no GPU",
        )
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
