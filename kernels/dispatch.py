"""The one place that decides whether a fused op runs its Triton kernel or its
PyTorch reference.

Rules, in order:
1. ``MMT_FAST_KERNELS=reference`` forces the reference path everywhere.
2. ``MMT_FAST_KERNELS=triton`` forces the Triton path; if an input cannot run
   there, :class:`KernelUnsupportedError` lists every reason (no silent
   fallback). On a machine without CUDA this works only under Triton's
   interpreter (``TRITON_INTERPRET=1``), which is how the tests run kernels on
   the CPU; without the switch, CPU tensors take the reference even when
   interpreting.
3. Unset (or ``auto``): Triton when every tensor is on CUDA and the op's own
   checks pass; the reference otherwise. :func:`last_refusal` tells why the
   Triton path was not taken for the most recent call of an op.

The pattern follows xformers' ``fmha/dispatch.py``: each backend names why it
cannot run an input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from . import _triton

ENV_VAR = "MMT_FAST_KERNELS"
_MODES = ("auto", "triton", "reference")
_last_refusal: dict[str, list[str]] = {}
_shape_only = 0


# Why float32 attention stays on the reference path on CUDA (relpos and bottleneck ops).
FP32_ON_CUDA = (
    "float32 attention runs the PyTorch reference on CUDA: IEEE-fp32 tiles compiled for "
    "sm_90 spilled (6-17 KB per thread, no tensor cores) and took 11-311 s each to compile; "
    "train under bf16/fp16 autocast (the trainer does) to use the kernel"
)


# The largest grid the kernels launch along CUDA's second and third grid axes.
GRID_YZ_MAX = 65535


def dtype_reasons(dtype: torch.dtype, *, fp32_on_cuda: bool) -> list[str]:
    """The dtype policy of every fused op, in one place: fp16 and bf16 compiled for the GPU
    (fp32 too when ``fp32_on_cuda``; attention refuses it, :data:`FP32_ON_CUDA`); under the
    interpreter fp16, fp32 and fp64 (the tests' gradcheck dtype), not bf16."""
    if gpu_rules():
        if dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and fp32_on_cuda):
            return []
        if dtype == torch.float32:
            return [FP32_ON_CUDA]
        if dtype == torch.float64:
            return ["float64 runs on Triton only under the interpreter (tests)"]
        return [f"dtype {dtype} is not supported on CUDA (supported: float16, bfloat16)"]
    if dtype in (torch.float16, torch.float32, torch.float64):
        return []
    why = " (bfloat16 arithmetic is broken there)" if dtype == torch.bfloat16 else ""
    return [
        f"dtype {dtype} is not supported under the Triton interpreter{why} "
        "(supported: float16, float32, float64)"
    ]


def alignment_reasons(named: dict[str, torch.Tensor | None]) -> list[str]:
    """Why these tensors break the 16-byte alignment the kernels are compiled for (the compile
    gate specialises every pointer and every stride as a multiple of 16 bytes): a data pointer
    or a stride (of a dimension longer than 1, other than a unit stride) that is not. The ops
    first copy views that a contiguous copy repairs (:func:`._common.aligned`), so what remains
    is a last dim whose bytes are not a multiple of 16. Compiled kernels only (the interpreter
    has no such assumption)."""
    reasons = []
    if not gpu_rules():
        return reasons
    from ._common import has_storage

    for name, t in named.items():
        if t is None or not has_storage(t):
            continue
        size = t.element_size()
        if t.data_ptr() % 16:
            reasons.append(
                f"{name} starts at an address that is not a multiple of 16 bytes "
                "(an offset view): pass a copy (.clone())"
            )
        bad = [d for d, (n, st) in enumerate(zip(t.shape, t.stride()))
               if n > 1 and st != 1 and (st * size) % 16]  # fmt: skip
        if bad:
            reasons.append(
                f"{name} has strides {tuple(t.stride())} whose dims {bad} are not multiples of "
                f"16 bytes: pass a .contiguous() copy with a last dim multiple of {16 // size}"
            )
    return reasons


def grid_reasons(name: str, n: int) -> list[str]:
    """A reason when ``n`` programs (e.g. batch x heads) exceed a second/third grid axis."""
    if n > GRID_YZ_MAX:
        return [
            f"{name} = {n} > {GRID_YZ_MAX}, the CUDA grid's limit on the axis it is launched on"
        ]
    return []


class KernelUnsupportedError(ValueError):
    """Raised when the Triton path is forced but cannot run the given input."""


def mode() -> str:
    """The requested backend: ``auto``, ``triton`` or ``reference``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(_MODES)}")
    return value


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_rules() -> bool:
    """Whether an op's dtype rules are the GPU's: compiled kernels, or a shape-only trace
    (:func:`shape_only`), which stands for a GPU run even under the interpreter."""
    return not interpreting() or _shape_only > 0


def device_reasons(tensors: Iterable[torch.Tensor | None]) -> list[str]:
    """Reasons, common to every op, why these tensors cannot go to Triton."""
    reasons: list[str] = []
    ts = [t for t in tensors if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        reasons.append(f"tensors are on different devices: {sorted(map(str, devices))}")
    for dev in devices:
        if dev.type == "cuda" or _shape_only > 0:
            continue
        if dev.type == "cpu" and interpreting():
            if mode() == "triton":
                continue
            reasons.append(
                "CPU tensors run the interpreted Triton kernels only when forced "
                f"({ENV_VAR}=triton); the reference is much faster here"
            )
            continue
        if dev.type == "meta":
            reasons.append("meta tensors (shape-only tracing) use the reference path")
        else:
            reasons.append(
                f"device {dev} is not CUDA (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
            )
    return reasons


@contextmanager
def shape_only() -> Iterator[None]:
    """Accept any device for the Triton path while tracing shapes only.

    Under ``FakeTensorMode`` the custom ops run their fake implementations, so
    no kernel is launched; this lets memory estimates and ``torch.compile``
    tracing on a machine without CUDA see the fused ops and their true saved
    tensors. Never use it around real computation.
    """
    global _shape_only
    _shape_only += 1
    try:
        yield
    finally:
        _shape_only -= 1


@contextmanager
def use(value: str) -> Iterator[None]:
    """Run a block with ``MMT_FAST_KERNELS`` set to ``value`` (restored after)."""
    if value not in _MODES:
        raise ValueError(f"{ENV_VAR} mode {value!r} is not one of {', '.join(_MODES)}")
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def _record(op: str, reasons: list[str] | None) -> None:
    """Remember why ``op`` was refused (None: it was not). Skipped while torch.compile
    traces: a traced activation-checkpoint region may not change module state."""
    if torch.compiler.is_compiling():
        return
    if reasons is None:
        _last_refusal.pop(op, None)
    else:
        _last_refusal[op] = reasons


def choose(op: str, reasons: Sequence[str]) -> bool:
    """Decide the path for one call of ``op``.

    ``reasons`` are the op's own reasons why Triton cannot run this input
    (empty when it can). Returns True for the Triton path.
    """
    m = mode()
    if m == "reference":
        _record(op, [f"{ENV_VAR}=reference"])
        return False
    if not _triton.AVAILABLE and _shape_only == 0:
        reasons = [f"Triton cannot be imported ({_triton.IMPORT_ERROR})", *reasons]
    if reasons:
        _record(op, list(reasons))
        if m == "triton":
            lines = "\n  - ".join(reasons)
            raise KernelUnsupportedError(
                f"{op}: {ENV_VAR}=triton but the Triton kernel cannot run this input:\n  - {lines}"
            )
        return False
    _record(op, None)
    return True


def last_refusal(op: str) -> list[str]:
    """Why the most recent call of ``op`` did not take the Triton path ([] if it did)."""
    return list(_last_refusal.get(op, []))
