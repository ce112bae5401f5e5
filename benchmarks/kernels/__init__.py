"""Speed and memory of the fused ops against the PyTorch alternatives.

``python -m benchmarks.kernels`` checks every path of every case against a float64
reference, then times forward and forward+backward and records peak memory of the
paths that passed, for each fused op (``kernels/``) at the real shapes of MAT-B
stages 1-4 (batch 64), MViTv2-B-16 stages 1-4 (batch 8) and the MMT AVBottleneck
(batch 64), bf16 on CUDA, against eager PyTorch, SDPA with the materialised bias,
compiled FlexAttention, xformers and (pooled Q/K/V) ``torch.compile`` of the
reference. Each time is printed beside the case's roofline floor (H200, 790
TFLOP/s bf16, 4.3 TB/s). Results go to ``<out>/kernels.json`` (written after every
path) and ``<out>/kernels.png``.

Other modes::

    python -m benchmarks.kernels --roofline           # FLOPs, bytes, time floor per case
    python -m benchmarks.kernels --check              # every path vs a float64 reference
    python -m benchmarks.kernels --train-memory       # MAT training step: reference vs triton
    python -m benchmarks.kernels --device cpu --small # tiny shapes on the CPU (interpreter)
    python -m benchmarks.kernels --compile-report ... # the compile gate (benchmarks.compile_gate)
    python -m benchmarks.kernels --replot kernels.json
    python -m benchmarks.kernels --summary kernels.json
    python -m benchmarks.kernels --compile-estimate benchmarks/results/compile_gate.json

Modules: ``cases`` (shapes and inputs), ``baselines`` (the compared paths),
``check`` (the float64 rule), ``timing`` (measurements and the JSON), ``summary`` (the printed table,
targets, compile estimate), ``roofline``
(FLOPs, bytes, floors), ``plot``, ``train_memory``, ``__main__`` (the CLI). The
names below are re-exported lazily, so ``--help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cases": (
        "CASE_NAMES",
        "CHECK_MAT_S1_GRIDS",
        "SMALL_SUBSET",
        "Case",
        "Inputs",
        "check_cases",
        "make_inputs",
        "real_cases",
        "small_cases",
    ),
    "baselines": (
        "PATHS",
        "build_path",
        "flex_fn",
        "forward_only",
        "fwd_bwd",
        "kernel_mode",
        "materialised_bias",
        "path_unavailable",
        "relpos_score_mod",
        "relq_axes",
        "zero_grads",
    ),
    "check": (
        "ATOL",
        "ATOL_REL",
        "check_case",
        "max_err",
        "print_checks",
        "run_checks",
        "tolerance",
    ),
    "timing": ("bench_path", "ceilings", "environment", "run_benchmarks", "time_ms"),
    "summary": (
        "INTERPRETER_NOTE",
        "TARGET_CASE",
        "compile_time_estimate",
        "print_summary",
        "targets",
    ),
    "plot": ("plot",),
    "train_memory": ("train_memory",),
    "__main__": ("main",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
