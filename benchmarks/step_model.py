"""A model of one whole training step: where its time goes, per category of op.

    python -m benchmarks.step_model [--models MAT,MViTv2-B-16,MMT] [--json PATH]

One training step (forward, loss, backward, AdamW) of each model at the paper's
per-GPU batch and precision (fp16 autocast, fp32 master weights; MAT batch 64 as
in the paper's memory comparison, MViTv2-B-16 and MMT batch 8, the paper's
global 64 over 8 GPUs) is traced on FakeTensors (:func:`mmt_fast.profiling.fake_mode`,
CUDA's autocast policy, the fused ops' fake implementations where a GPU runs
them), with every ATen op's bytes read and written counted by
:class:`benchmarks.glue.ByteCounter` (the same rules as the compile gate's glue
count) and its FLOPs by the formulas below. Nothing is computed or timed.

Categories: ``matmul`` (mm, addmm, bmm, convolutions and their backward, SDPA),
one per fused op (``mmt_fast::relpos_attention``, ``pooled_qkv``,
``bottleneck_attention``, forward + backward), ``norm`` (LayerNorm forward and
backward), ``elementwise`` (adds, multiplies, GELU, dropout/drop path, dtype
casts), ``reduction`` (sums, e.g. bias gradients, softmax, the loss),
``copy`` (contiguous copies, cat, transposes made contiguous, zero fills),
``optimizer`` (every op of ``AdamW.step``: foreach, as CUDA runs it).

Time of an op on a GPU (roofline): max(FLOPs / peak, bytes / bandwidth), with
H200 790 TFLOP/s bf16 dense and 4.3 TB/s (measured on the project's H200:
bf16 matmul and copy) and A100-SXM 312 TFLOP/s bf16 dense and 2.0 TB/s
(NVIDIA's A100 datasheet: 312 TFLOP/s dense BF16, 2,039 GB/s HBM2e for the
80 GB SXM; the 40 GB part has 1,555 GB/s). The fused attention ops are priced
by the compile gate's model (``benchmarks/results/compile_gate.json``,
``model_ms`` of the case with the same shape, H200 rates; scaled by useful
FLOPs from the closest case where no case has the shape, and by the ratio of
peak rates for the A100), except pooled Q/K/V, whose gate time is its qkv
projection (counted here as a matmul): it is priced by its bytes.
Kernel launch gaps, the CPU side and communication are not modelled: the
figures are a lower bound on the step time, i.e. an upper bound on clips/s.

Variants per model:
- ``eager``: every op as PyTorch runs it, one kernel each, each reading its
  inputs from and writing its outputs to HBM.
- ``selective``: the same with selective activation checkpointing
  (:mod:`mmt_fast.models.checkpointing`): the recomputed ops are in the trace.
- ``fused``: element-wise chains fused as a compiler (inductor) would: each
  maximal run of consecutive ``elementwise`` / ``norm`` / ``reduction`` /
  ``copy`` ops between two matmuls or fused ops becomes one kernel that reads
  each input produced outside the run once and writes only the outputs some
  later op (or the backward, or the optimizer) reads, or that nothing reads
  (gradients); intermediates stay in registers. The optimizer becomes one
  fused AdamW pass (read parameter, gradient, both moments; write parameter
  and moments: 28 bytes per fp32 parameter). Matmuls and fused ops unchanged.
  An optimistic model of a compiler: it assumes every chain fuses, whatever
  its shapes and reductions.

Results go to ``benchmarks/results/step_model.json``; ``python -m
benchmarks.report`` puts a table of them in the README, and
``benchmarks/data.py`` reads the demand side (clips/s an H200 consumes) from it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

from benchmarks.glue import ByteCounter, _base

RESULTS = Path(__file__).parent / "results"
GATE_JSON = RESULTS / "compile_gate.json"
OUT_JSON = RESULTS / "step_model.json"

# name -> (peak dense bf16/fp16 FLOP/s, HBM bytes/s, source)
GPUS = {
    "H200": (790e12, 4.3e12, "measured on the project's H200 (bf16 matmul, copy)"),
    "A100": (312e12, 2.0e12, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16, 2.0 TB/s (80 GB SXM)"),
}
# model -> (preset, per-GPU batch, input shapes per sample)
AUDIO = (1, 128, 1024)
VIDEO = (3, 16, 224, 224)
MODELS = {
    "MAT": ("MAT", 64, {"x": AUDIO}),
    "MViTv2-B-16": ("MViTv2-B-16", 8, {"x": VIDEO}),
    "MMT": ("MMT", 8, {"audio": AUDIO, "video": VIDEO}),
}
NUM_CLASSES = 309
PRECISION = "fp16"
VARIANTS = ("eager", "selective", "fused")

_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}
_SDPA_FWD = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"}  # fmt: skip
_NORM = {"native_layer_norm", "native_layer_norm_backward"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "_softmax", "_softmax_backward_data",
              "_log_softmax", "_log_softmax_backward_data", "nll_loss_forward",
              "nll_loss_backward", "logsumexp", "var_mean", "norm", "linalg_vector_norm"}  # fmt: skip
_COPY = {"clone", "copy_", "cat", "stack", "constant_pad_nd", "index", "index_select",
         "slice_backward", "select_backward", "zeros", "zeros_like", "new_zeros", "fill_",
         "zero_", "full", "new_full", "ones", "ones_like", "expand_copy", "contiguous",
         "max_pool2d_with_indices", "max_pool3d_with_indices",
         "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward",
         "index_add_", "scatter_add", "gather", "split_with_sizes_copy"}  # fmt: skip
FUSIBLE = ("elementwise", "norm", "reduction", "copy")


def category(name: str, namespace: str, phase: str) -> str:
    """The category of an op (its base name without overload, its namespace)."""
    if phase == "opt":
        return "optimizer"
    if namespace == "mmt_fast":
        return name.removesuffix("_fwd").removesuffix("_bwd")
    if name in _MATMUL or name in _SDPA_FWD or name.endswith("_attention_backward"):
        return "matmul"
    if name in _NORM:
        return "norm"
    if name in _REDUCTION:
        return "reduction"
    if name in _COPY:
        return "copy"
    return "elementwise"


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def op_flops(func, name: str, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs (2 per multiply-add) of the ops that do arithmetic beyond one per element:
    matmuls, convolutions (dense and depthwise) and their backward and SDPA, by PyTorch's
    own formulas (:mod:`torch.utils.flop_counter`); the fused attention ops (useful work as
    :mod:`benchmarks.kernels.roofline` counts it: the backward twice the forward) and the
    pooling taps of pooled Q/K/V (forward). Element-wise ops: 0 (bandwidth-bound)."""
    formula = flop_registry.get(getattr(func, "_overloadpacket", None))
    if formula is not None:
        return int(formula(*args, **kwargs, out_val=out))
    if name in ("relpos_attention_fwd", "relpos_attention_bwd"):
        fwd = name.endswith("fwd")
        q, k = (args[0], args[1]) if fwd else (args[1], args[2])
        k_grid, has_cls = (args[5], args[6]) if fwd else (args[8], args[9])
        rows = q.shape[2] - int(has_cls)
        n_tables = len(args[3] if fwd else args[4])
        bias = 2 * q.shape[0] * q.shape[1] * rows * sum(k_grid) * q.shape[3] if n_tables else 0
        return (1 if fwd else 2) * (4 * math.prod(q.shape) * k.shape[2] + bias)
    if name in ("bottleneck_attention_fwd", "bottleneck_attention_bwd"):
        qm, qe = args[0], args[3]  # q_main, k_main, v_main, q_extra, ... in both
        n = qm.shape[-2] + qe.shape[-2]
        base = 4 * qm.shape[0] * qm.shape[1] * n * n * qm.shape[-1]
        return base if name.endswith("fwd") else 2 * base
    if name in ("pooled_qkv_fwd", "pooled_qkv_bwd"):  # the depthwise taps (CUDA cores)
        w = args[1]
        outs = out if name.endswith("fwd") else ()
        if not outs:
            return 0
        taps = sum(math.prod(t.shape) for t in outs)
        return 2 * taps * math.prod(w.shape[1:])
    return 0


@dataclass
class Op:
    """One ATen op of the step: category, phase, FLOPs, bytes, the storages it reads and
    writes (serial numbers) and their sizes."""

    name: str
    cat: str
    phase: str
    flops: int
    read: int
    written: int
    inputs: list[tuple[int, int]] = field(default_factory=list)  # (storage serial, bytes)
    outputs: list[tuple[int, int]] = field(default_factory=list)


class StepCounter(ByteCounter):
    """:class:`benchmarks.glue.ByteCounter` that also keeps each op (category, FLOPs,
    the storages it reads and writes) for the per-category table and the fused model.
    ``prim`` ops (``prim.device``...) and allocations are not traffic."""

    def __init__(self) -> None:
        super().__init__()
        self.trace: list[Op] = []
        self._serials: dict[int, tuple[Any, int]] = {}
        self._next = 0

    def _serial(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        key = id(st)
        hit = self._serials.get(key)
        if hit is not None and hit[0]() is st:
            return hit[1]
        self._next += 1
        self._serials[key] = (weakref.ref(st), self._next)
        return self._next

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":
            return func(*args, **kwargs)
        before = {k: (o.read, o.written) for k, o in self.ops.items()}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        changed = [(k, o) for k, o in self.ops.items() if (o.read, o.written) != before.get(k)]
        if not changed:  # a view or an allocation
            return out
        (_, _), rec = changed[0]
        r0, w0 = before.get(changed[0][0], (0, 0))
        name = _base(func)
        from torch.utils._pytree import tree_flatten

        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.trace.append(
            Op(
                name,
                category(name, func.namespace, self.phase),
                self.phase,
                op_flops(func, name, args, kwargs, out),
                rec.read - r0,
                rec.written - w0,
                [(self._serial(t), t.untyped_storage().nbytes()) for t in ins],
                [(self._serial(t), t.untyped_storage().nbytes()) for t in outs],
            )
        )
        return out


@dataclass
class StepTrace:
    """The ops of one training step and the model's parameter count."""

    ops: list[Op]
    params: int


def trace_step(
    preset: str,
    batch: int,
    shapes: dict[str, tuple[int, ...]],
    checkpointing: str = "none",
    precision: str = PRECISION,
    kernels: bool = True,
    **overrides: Any,
) -> StepTrace:
    """The ops of one training step (forward + loss, backward, AdamW with its state
    already allocated) of ``preset`` at ``batch``, traced on FakeTensors."""
    from mmt_fast import create_model
    from mmt_fast.models.checkpointing import set_activation_checkpointing
    from mmt_fast.profiling import (
        _forward_loss,
        _init_optimizer_state,
        autocast_context,
        fake_mode,
        make_batch,
        make_optimizer,
    )

    with fake_mode(kernels):
        model = create_model(preset, num_classes=NUM_CLASSES, **overrides)
        set_activation_checkpointing(model, checkpointing)
        model.train()
        opt = make_optimizer(model)
        _init_optimizer_state(model, opt)
        data = make_batch(shapes, batch, NUM_CLASSES, "cpu", torch.float32)
        counter = StepCounter()
        with counter:
            counter.phase = "fwd"
            with autocast_context(precision):
                loss = _forward_loss(model, data)
            counter.phase = "bwd"
            loss.backward()
            counter.phase = "opt"
            opt.step()
            opt.zero_grad(set_to_none=True)
        return StepTrace(counter.trace, sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- pricing


def _gate_cases(path: Path = GATE_JSON) -> dict[str, list[tuple[float, float]]]:
    """op -> [(useful FLOPs, model seconds)] of the compile gate's committed cases."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    if not path.exists():
        return out
    for c in json.loads(path.read_text())["cases"]:
        op = {"relpos": "relpos_attention", "bottleneck": "bottleneck_attention"}.get(
            c["case"].split("/")[0]
        )
        if op is not None:
            out[op].append((c["useful_tflop"] * 1e12, c["model_ms"] / 1e3))
    return out


def _fused_seconds(op: str, flops: float, gate: dict, peak: float) -> float | None:
    """Gate model time of a fused op call with ``flops`` useful FLOPs (fwd + bwd counted
    separately, so each gets its share): seconds per useful FLOP of the case closest in
    FLOPs, at the H200's rate, scaled to ``peak``."""
    cases = gate.get(op)
    if not cases:
        return None
    f, s = min(cases, key=lambda c: abs(math.log(c[0] / max(flops, 1.0))))
    return flops * (s / f) * (GPUS["H200"][0] / peak)


def price(step: StepTrace, gpu: str, gate: dict, fused: bool = False) -> dict[str, dict]:
    """Per category: FLOPs, bytes, kernels, milliseconds on ``gpu`` (``fused``: the
    compiler model)."""
    peak, bw, _ = GPUS[gpu]
    cats: dict[str, dict] = defaultdict(lambda: {"flops": 0, "bytes": 0, "ms": 0.0, "ops": 0})
    trace = step.ops
    ops = _fuse_chains(trace) if fused else [(o.cat, o.flops, o.read + o.written, o) for o in trace]
    if fused:
        # one fused AdamW pass: read parameter, gradient and both moments, write
        # parameter and moments, all fp32
        ops.append(("optimizer", 0, 28 * step.params, None))
    for cat, flops, nbytes, op in ops:
        c = cats[cat]
        c["flops"] += flops
        c["bytes"] += nbytes
        c["ops"] += 1
        secs = None
        if op is not None and cat in ("relpos_attention", "bottleneck_attention"):
            secs = _fused_seconds(cat, flops, gate, peak)
        if secs is None:
            secs = max(flops / peak, nbytes / bw)
        c["ms"] += 1e3 * secs
    return dict(cats)


def _fuse_chains(trace: list[Op]) -> list[tuple[str, int, int, Op | None]]:
    """The compiler model: runs of consecutive fusible ops (same phase, not the
    optimizer) become one kernel; see the module docstring."""
    readers: dict[int, list[int]] = defaultdict(list)  # storage -> indices of ops reading it
    for i, op in enumerate(trace):
        for s, _ in op.inputs:
            readers[s].append(i)
    out: list[tuple[str, int, int, Op | None]] = []
    i = 0
    while i < len(trace):
        op = trace[i]
        if op.cat == "optimizer":
            i += 1
            continue
        if op.cat not in FUSIBLE:
            out.append((op.cat, op.flops, op.read + op.written, op))
            i += 1
            continue
        j = i
        while j < len(trace) and trace[j].cat in FUSIBLE and trace[j].phase == op.phase:
            j += 1
        chain = trace[i:j]
        made = {s for o in chain for s, _ in o.outputs}
        read = {s: b for o in chain for s, b in o.inputs if s not in made}
        written = 0
        for o in chain:
            for s, b in o.outputs:
                later = [r for r in readers[s] if r >= j or r < i]
                if later or not readers[s]:
                    written += b
        # the chain's bytes by the category that moved the most bytes in it
        by_cat: dict[str, int] = defaultdict(int)
        for o in chain:
            by_cat[o.cat] += o.read + o.written
        main = max(by_cat, key=by_cat.get)
        out.append((main, sum(o.flops for o in chain), sum(read.values()) + written, None))
        i = j
    return out


def summarise(trace: StepTrace, batch: int, gate: dict, fused: bool = False) -> dict:
    """Per GPU: the per-category table, step milliseconds, clips/s and the category
    that takes the most time."""
    out: dict[str, Any] = {}
    for gpu in GPUS:
        cats = price(trace, gpu, gate, fused)
        ms = sum(c["ms"] for c in cats.values())
        top = max(cats, key=lambda k: cats[k]["ms"])
        out[gpu] = {
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["ms"])),
            "step_ms": ms,
            "clips_per_s": 1e3 * batch / ms,
            "dominant": top,
        }
    return out


def totals(step: StepTrace) -> dict[str, int]:
    """FLOPs and bytes of a trace: all ops, and the matmuls alone."""
    trace = step.ops
    return {
        "flops": sum(o.flops for o in trace),
        "bytes": sum(o.read + o.written for o in trace),
        "matmul_flops": sum(o.flops for o in trace if o.cat == "matmul"),
    }


def run(models: list[str], progress=print) -> dict:
    gate = _gate_cases()
    results: dict[str, Any] = {}
    for name in models:
        preset, batch, shapes = MODELS[name]
        results[name] = {"batch": batch, "precision": PRECISION, "variants": {}}
        for mode in ("none", "selective"):
            t = time.time()
            trace = trace_step(preset, batch, shapes, mode)
            variants = ("eager", "fused") if mode == "none" else ("selective",)
            for v in variants:
                s = summarise(trace, batch, gate, fused=v == "fused")
                s["totals"] = totals(trace)
                results[name]["variants"][v] = s
                h = s["H200"]
                progress(
                    f"{name:12s} {v:9s} H200 {h['step_ms']:7.1f} ms/step "
                    f"{h['clips_per_s']:7.1f} clips/s (dominant: {h['dominant']}); "
                    f"A100 {s['A100']['step_ms']:7.1f} ms  [{time.time() - t:.0f} s]"
                )
    return results


def format_table(results: dict, gpu: str = "H200") -> str:
    lines = []
    for name, r in results.items():
        lines.append(f"{name} (batch {r['batch']}, {r['precision']} autocast), {gpu}:")
        cats = sorted(
            {c for v in r["variants"].values() for c in v[gpu]["categories"]},
            key=lambda c: -r["variants"]["eager"][gpu]["categories"].get(c, {"ms": 0})["ms"],
        )
        head = f"  {'category':22s}" + "".join(
            f"{v + ' GFLOP':>16s}{v + ' GB':>14s}{v + ' ms':>14s}" for v in r["variants"]
        )
        lines.append(head)
        for c in cats:
            row = f"  {c:22s}"
            for v in r["variants"].values():
                x = v[gpu]["categories"].get(c, {"flops": 0, "bytes": 0, "ms": 0.0})
                row += f"{x['flops'] / 1e9:16.0f}{x['bytes'] / 1e9:14.2f}{x['ms']:14.2f}"
            lines.append(row)
        row = f"  {'step':22s}"
        for v in r["variants"].values():
            row += f"{'':16s}{'':14s}{v[gpu]['step_ms']:14.2f}"
        lines.append(row)
        lines.append(
            "  clips/s: "
            + ", ".join(f"{k} {v[gpu]['clips_per_s']:.0f}" for k, v in r["variants"].items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.step_model", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    ap.add_argument("--json", type=Path, default=OUT_JSON, help=f"default {OUT_JSON}")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; known: {', '.join(MODELS)}")
    t0 = time.time()
    results = run(models, progress=lambda s: print(s, flush=True))
    print()
    print(format_table(results))
    print(f"\n[{time.time() - t0:.0f} s in all]")
    payload = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "method": "FakeTensor trace of one training step; roofline per op; see "
        "benchmarks/step_model.py",
        "gpus": {k: {"flops": v[0], "bytes_per_s": v[1], "source": v[2]} for k, v in GPUS.items()},
        "compile_gate": str(GATE_JSON.relative_to(RESULTS.parent.parent)),
        "models": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
