"""``mmt-fast plan``: the largest batch per process that fits a GPU's memory.

    mmt-fast plan --model MMT --gpu-mem 40GiB [--precision bf16] [--kernels auto|reference]
                  [--checkpointing none|blocks|stage1|selective] [--reserve 1GiB]

Every figure is an *estimate* from shapes alone (FakeTensorMode, see
:mod:`mmt_fast.profiling`: :func:`~mmt_fast.profiling.estimate_step_memory` and
:func:`~mmt_fast.profiling.estimate_inference_memory`), so it runs on a machine
without a GPU in seconds per model size. Training: one AdamW step (fp32 weights, gradients and AdamW
state; activations in the chosen precision with CUDA's autocast policy).
Inference: a forward pass under ``torch.no_grad()``. Peak memory is affine in
the batch size to a good approximation: the planner fits the line through two
estimates, predicts the largest batch under the budget, and then checks that
batch (and the next) with estimates of their own.

The budget is ``--gpu-mem`` minus ``--reserve`` (default 1 GiB), which stands
for the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation that
the tensor-level estimate does not see.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmt_fast.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a plan runs, not when the CLI parses
    from torch import nn

    from mmt_fast.profiling import MemoryResult

PRECISIONS = ("fp32", "fp16", "bf16")

GiB = 2**30
_UNITS = {"": GiB, "gib": GiB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}


def parse_size(text: str) -> int:
    """'40GiB', '40 GB', '32768MiB', '40' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"cannot read a memory size from {text!r}: use e.g. 40GiB, 40GB, 32768MiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def input_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Per-sample input shapes of a model built from a preset."""
    cfg = model.cfg
    if hasattr(cfg, "audio") and hasattr(cfg, "video"):
        out = {}
        if cfg.audio is not None:
            out["audio"] = (1, *cfg.audio.input_size)
        if cfg.video is not None:
            out["video"] = (cfg.video.in_chans, *cfg.video.input_size)
        return out
    return {"x": (getattr(cfg, "in_chans", 1), *cfg.input_size)}


@dataclass
class Plan:
    """The largest batch that fits (0 if none) and the estimate at that batch."""

    mode: str  # "training" | "inference"
    batch_size: int
    result: Any  # MemoryResult | None
    per_sample_bytes: float
    fixed_bytes: float


def largest_batch(
    estimate, budget: int, max_batch: int, progress=None
) -> tuple[int, Any, float, float]:
    """The largest b <= max_batch with estimate(b).peak_bytes <= budget.

    Peak memory is nearly affine in b: fit it through b = 1 and 4, then
    search with interpolation between the largest batch known to fit and the
    smallest known not to (bisection when interpolation makes no progress),
    so a plan takes a handful of estimates. Returns (b, result at b or None,
    bytes per sample, fixed bytes) of the fitted line.
    """
    cache: dict[int, Any] = {}

    def peak(b: int) -> int:
        if b not in cache:
            cache[b] = estimate(b)
            if progress:
                progress(b, cache[b].peak_bytes)
        return cache[b].peak_bytes

    p1, p4 = peak(1), peak(min(4, max_batch))
    per = (p4 - p1) / 3 if max_batch >= 4 else 0.0
    fixed = p1 - per
    if p1 > budget:
        return 0, None, per, fixed
    lo, hi = 1, None  # peak(lo) fits; peak(hi) does not
    if p4 <= budget:
        lo = min(4, max_batch)
    else:
        hi = 4
    guess = int((budget - fixed) // per) if per > 0 else max_batch
    while True:
        if hi is None:
            if lo >= max_batch:
                break
            b = min(max_batch, guess if guess > lo else 2 * lo)
        elif hi - lo <= 1:
            break
        else:
            pl, ph = peak(lo), peak(hi)
            b = lo + int((budget - pl) * (hi - lo) // max(ph - pl, 1))
            if b in cache or not lo < b < hi:
                b = lo + 1 if lo + 1 not in cache else (lo + hi) // 2
        if peak(b) <= budget:
            lo = b
            # re-aim with the line through b = 1 and lo (the boundary is
            # usually next to it); at least one step further
            slope = (peak(lo) - p1) / (lo - 1) if lo > 1 else per
            guess = int(1 + (budget - p1) // slope) if slope > 0 else max_batch
            guess = max(guess, lo + 1)
        else:
            hi = b
    if lo > 1:  # the line through the measured ends of the range searched
        per = (peak(lo) - p1) / (lo - 1)
        fixed = p1 - per
    return lo, cache[lo], per, fixed


def plan(
    preset: str,
    gpu_mem: int,
    precision: str = "bf16",
    kernels: str = "auto",
    checkpointing: str = "none",
    reserve: int = GiB,
    num_classes: int | None = None,
    max_batch: int = 4096,
    verbose: bool = True,
) -> dict[str, Plan]:
    """Largest training and inference batch of ``preset`` per process."""
    from mmt_fast import create_model
    from mmt_fast.models.checkpointing import set_activation_checkpointing
    from mmt_fast.profiling import estimate_inference_memory, estimate_step_memory, fake_mode

    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
    if kernels not in ("auto", "reference", "triton"):
        raise ConfigError(f"kernels {kernels!r}: expected auto, reference or triton")
    budget = gpu_mem - reserve
    if budget <= 0:
        raise ConfigError(f"--gpu-mem {gpu_mem / GiB:.2f} GiB leaves nothing after the reserve")
    overrides = {} if num_classes is None else {"num_classes": num_classes}
    out: dict[str, Plan] = {}
    with fake_mode(kernels):
        model = create_model(preset, **overrides)
        set_activation_checkpointing(model, checkpointing)
        shapes = input_shapes(model)
        n_cls = getattr(model.cfg, "num_classes", 2)
        n_cls = n_cls if isinstance(n_cls, int) and n_cls > 0 else 2
        for mode in ("training", "inference"):

            def say(b: int, nbytes: int, mode: str = mode) -> None:
                if verbose:
                    print(f"  {mode}: batch {b:>5} -> {nbytes / GiB:7.2f} GiB", flush=True)

            if mode == "training":

                def est(b: int) -> MemoryResult:
                    return estimate_step_memory(model, shapes, b, n_cls, precision)
            else:

                def est(b: int) -> MemoryResult:
                    return estimate_inference_memory(model, shapes, b, precision)

            b, res, per, fixed = largest_batch(est, budget, max_batch, say)
            out[mode] = Plan(mode, b, res, per, fixed)
    return out


_KINDS = (
    ("parameters", "weights"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations + temporaries"),
    ("inputs", "inputs"),
)


def format_plan(preset: str, plans: dict[str, Plan], args: dict) -> str:
    lines = [
        f"{preset}: {args['gpu_mem'] / GiB:.1f} GiB GPU, {args['reserve'] / GiB:.1f} GiB reserved, "
        f"{args['precision']}, kernels {args['kernels']}, checkpointing {args['checkpointing']} "
        "(estimated from shapes, not measured)",
    ]
    for mode, p in plans.items():
        if p.batch_size == 0:
            lines.append(f"{mode:>9}: batch 1 does not fit ({p.fixed_bytes / GiB:.2f} GiB fixed)")
            continue
        bd = p.result.breakdown
        parts = ", ".join(f"{label} {bd[k] / GiB:.2f}" for k, label in _KINDS if bd.get(k))
        limit = " (the --max-batch limit)" if p.batch_size == args.get("max_batch") else ""
        lines.append(
            f"{mode:>9}: largest batch per process {p.batch_size}{limit}, peak {p.result.peak_bytes / GiB:.2f} GiB "
            f"({p.per_sample_bytes / 2**20:.2f} MiB/sample); at the peak, GiB: {parts}"
        )
    return "\n".join(lines)


HELP = "largest batch that fits a GPU (estimated, no GPU needed)"
DESCRIPTION = None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="preset name (MMT, MAT, AST, MMT-tiny, ...)")
    ap.add_argument("--gpu-mem", required=True, help="GPU memory, e.g. 40GiB, 80GB, 24576MiB")
    ap.add_argument("--precision", default="bf16", choices=PRECISIONS)
    ap.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "reference"),
        help="auto: the fused Triton ops where they apply (as on CUDA); reference: eager PyTorch",
    )
    ap.add_argument(
        "--checkpointing",
        default="none",
        choices=("none", "blocks", "stage1", "selective"),
        help="activation checkpointing (train.activation_checkpointing): selective keeps "
        "the matmul outputs and recomputes the rest, blocks recomputes whole blocks",
    )
    ap.add_argument("--reserve", default="1GiB", help="kept free for the CUDA context etc.")
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--max-batch", type=int, default=4096)


def run(args: argparse.Namespace) -> int:
    """``mmt-fast plan`` (arguments from :func:`add_arguments`); a bad size or budget is a
    :class:`~mmt_fast.errors.ConfigError`, reported by the CLI in one line (exit code 2)."""
    gpu_mem, reserve = parse_size(args.gpu_mem), parse_size(args.reserve)
    print(f"estimating {args.model} (each line is one traced step)...", flush=True)
    plans = plan(
        args.model,
        gpu_mem,
        args.precision,
        args.kernels,
        args.checkpointing,
        reserve,
        args.num_classes,
        args.max_batch,
    )
    print(
        format_plan(
            args.model,
            plans,
            dict(
                gpu_mem=gpu_mem,
                reserve=reserve,
                precision=args.precision,
                kernels=args.kernels,
                checkpointing=args.checkpointing,
                max_batch=args.max_batch,
            ),
        )
    )
    return 0
