"""Glue traffic: the bytes every PyTorch op around a fused op's Triton launches moves.

A fused op is fast only if what runs around its kernels is small: building a packed
operand with ``einsum`` + ``cat``, ``.contiguous()`` copies, dtype conversions,
``torch.zeros`` that nothing needs, reductions of a buffer in PyTorch. This module
runs an op's forward and backward launchers (``kernels/*.py``) on ``meta`` tensors,
the Triton launches captured instead of run, under a ``TorchDispatchMode`` that adds
up, for every ATen op, the bytes it reads and writes:

- read: every tensor argument, once per distinct element it can address (an expanded
  view's stride-0 axes count once); an ``out=``/in-place target that the op only
  overwrites (``copy_``, ``fill_``, ``zero_``) is not read;
- written: every tensor output (an in-place op's target counts as written);
- free: views (an output that aliases an input without writing it: ``view``,
  ``reshape`` of a contiguous tensor, ``narrow``, ``select``, ``expand``,
  ``permute``...) and ``empty``/``empty_like``/``empty_strided`` (nothing written).

This is the traffic of an unfused eager run, each op reading its inputs from and
writing its outputs to HBM; it is the ``glue_bytes`` of the compile gate's
performance model (:mod:`benchmarks.compile_gate`), priced at the H200's 4.3 TB/s.
The Triton kernels' own loads and stores are not counted here (the model prices the
kernels by their tensor-core work).

    python -m benchmarks.glue [CASE ...] [--dtype bfloat16] [--by-line]

prints the breakdown by op and phase for each case (default: the compile gate's CI
cases); ``--by-line`` adds the source lines of ``kernels/*.py`` that issue the traffic.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops that allocate without writing (the kernels write them)
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "detach", "lift_fresh", "alias", "_unsafe_view", "_local_scalar_dense", "set_"}  # fmt: skip
# in-place ops that overwrite their target without reading it
_WRITE_ONLY_TARGET = {"copy_", "fill_", "zero_", "zeros", "zeros_like", "ones", "full",
                      "new_zeros", "new_full", "arange", "scalar_tensor"}  # fmt: skip


def _bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view addresses (stride-0 axes count once)."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return n * t.element_size()


_MATMULS = {"mm": ("self", "mat2"), "bmm": ("self", "mat2"), "addmm": ("mat1", "mat2"),
            "baddbmm": ("batch1", "batch2"), "addbmm": ("batch1", "batch2")}  # fmt: skip


def _matmul_flops(base: str, bound: dict[str, Any]) -> int:
    """2 M N K (times the batch) of a matmul ATen op; 0 for other ops."""
    if base not in _MATMULS:
        return 0
    a, b = (bound[n] for n in _MATMULS[base])
    return 2 * math.prod(a.shape) * b.shape[-1]


def _op_name(func: Any) -> str:
    return func._schema.name.split("::")[-1] + (
        f".{func._overloadname}" if func._overloadname not in ("default", "") else ""
    )


def _base(func: Any) -> str:
    return func._schema.name.split("::")[-1]


@dataclass
class OpBytes:
    """Traffic of one ATen op overload in one phase."""

    calls: int = 0
    read: int = 0
    written: int = 0
    flops: int = 0  # matmuls (mm, bmm, addmm, baddbmm): 2 per multiply-add

    @property
    def total(self) -> int:
        return self.read + self.written


@dataclass
class GlueCount:
    """Bytes per (phase, op): the result of :func:`glue_bytes`."""

    case: str
    dtype: str
    ops: dict[tuple[str, str], OpBytes] = field(default_factory=dict)
    launches: dict[str, int] = field(default_factory=dict)  # phase -> Triton launches
    lines: dict[tuple[str, str], int] = field(default_factory=dict)  # (phase, source) -> B

    def total(self, phase: str | None = None) -> int:
        return sum(o.total for (ph, _), o in self.ops.items() if phase in (None, ph))

    def flops(self, phase: str | None = None) -> int:
        """FLOPs of the glue's matmuls (cuBLAS work beside the Triton kernels)."""
        return sum(o.flops for (ph, _), o in self.ops.items() if phase in (None, ph))

    def by_op(self, phase: str | None = None) -> dict[str, int]:
        """op -> bytes, largest first (``phase`` None: forward + backward)."""
        acc: dict[str, int] = defaultdict(int)
        for (ph, name), o in self.ops.items():
            if phase in (None, ph):
                acc[name] += o.total
        return dict(sorted(acc.items(), key=lambda kv: -kv[1]))

    def as_dict(self) -> dict[str, Any]:
        return {
            "glue_bytes": self.total(),
            "glue_bytes_fwd": self.total("fwd"),
            "glue_bytes_bwd": self.total("bwd"),
            "glue_matmul_flops": self.flops(),
            "glue_matmul_flops_fwd": self.flops("fwd"),
            "glue_by_op": {
                ph: {n: b for n, b in self.by_op(ph).items() if b} for ph in ("fwd", "bwd")
            },
        }

    def table(self, top: int = 12) -> str:
        lines = [f"{self.case} ({self.dtype}): glue {self.total() / 1e9:.3f} GB "
                 f"(forward {self.total('fwd') / 1e9:.3f} GB, backward "
                 f"{self.total('bwd') / 1e9:.3f} GB; {self.launches} Triton launches)"]  # fmt: skip
        for ph in ("fwd", "bwd"):
            rows = [(n, o) for (p, n), o in self.ops.items() if p == ph and o.total]
            rows.sort(key=lambda r: -r[1].total)
            for n, o in rows[:top]:
                lines.append(f"  {ph:3s} {n:28s} x{o.calls:<3d} read {o.read / 1e9:8.3f} GB  "
                             f"written {o.written / 1e9:8.3f} GB  total {o.total / 1e9:8.3f} GB")  # fmt: skip
        return "\n".join(lines)

    def by_line(self, top: int = 12) -> str:
        """The source lines in kernels/*.py whose ops move the most bytes."""
        rows = sorted(((b, ph, src) for (ph, src), b in self.lines.items() if b), reverse=True)
        return "\n".join(
            [f"{self.case}: by source line (top {top})"]
            + [f"  {ph:3s} {b / 1e9:8.3f} GB  {src}" for b, ph, src in rows[:top]]
        )


def _caller() -> str:
    """The innermost frame in the kernels' own files (kernels/*.py) that led to this op."""
    for frame in reversed(traceback.extract_stack()):
        parts = Path(frame.filename).parts
        if len(parts) >= 2 and parts[-2] == "kernels" and parts[-1] != "__init__.py":
            return f"{parts[-1]}:{frame.lineno} {frame.name}"
    return "(outside kernels/)"


class ByteCounter(TorchDispatchMode):
    """Adds up the bytes each ATen op reads and writes, per phase (``self.phase``)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "fwd"
        self.ops: dict[tuple[str, str], OpBytes] = {}
        # (phase, "file.py:line function") of the kernels' code that issued the op -> bytes
        self.lines: dict[tuple[str, str], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        base = _base(func)
        if base in _NO_TRAFFIC:
            return out
        schema = func._schema
        # arguments the op writes (in place or out=) and outputs that are views of an input
        written_args, view_out = set(), False
        for a in schema.arguments:
            if a.alias_info is not None and a.alias_info.is_write:
                written_args.add(a.name)
        for r in schema.returns:
            if r.alias_info is not None and not r.alias_info.is_write:
                view_out = True
        if view_out and not written_args:
            return out  # a view: no data moves
        read = 0
        bound = dict(zip((a.name for a in schema.arguments), args))
        bound.update(kwargs)
        for name, value in bound.items():
            if name in written_args and base in _WRITE_ONLY_TARGET:
                continue
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor):
                    read += _bytes(t)
        written = sum(_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        rec = self.ops.setdefault((self.phase, _op_name(func)), OpBytes())
        rec.calls += 1
        rec.read += read
        rec.written += written
        rec.flops += _matmul_flops(base, bound)
        self.lines[(self.phase, _caller())] += read + written
        return out


# ----------------------------------------------------------------------------- launches


@contextmanager
def capture_launches() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Record Triton kernel launches (JIT and autotuned) instead of running them."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    seen: list[tuple[Any, tuple, dict]] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def fake_jit(self, *args, grid=None, warmup=False, **kwargs):
        seen.append((self, args, dict(kwargs, grid=grid)))

    def fake_tune(self, *args, **kwargs):
        seen.append((self, args, kwargs))

    JITFunction.run, Autotuner.run = fake_jit, fake_tune
    try:
        yield seen
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def run_meta(case: Any, dtype: torch.dtype, on_phase: Callable[[str], None] = lambda p: None):
    """Run ``case``'s op forward then backward launchers on meta tensors (launches must be
    captured by the caller); returns the op name. ``on_phase("fwd"|"bwd")`` is called before
    each phase."""
    from mmt_fast.kernels import bottleneck_attention as bn
    from mmt_fast.kernels import pooled_qkv as pq
    from mmt_fast.kernels import relpos_attention as rp

    meta = dict(device="meta", dtype=dtype)
    B, H, D = case.batch, case.heads, case.head_dim
    if case.op == "relpos":
        nq, nk = case.nq_nk
        q = torch.empty(B, H, nq, D, **meta)
        k = torch.empty(B, H, nk, D, **meta)
        v = torch.empty(B, H, nk, D, **meta)
        tables = [
            torch.empty(2 * max(a, b) - 1, D, **meta) for a, b in zip(case.q_grid, case.k_grid)
        ]
        args = (tables, case.q_grid, case.k_grid, case.has_cls, D**-0.5, True, True)
        on_phase("fwd")
        out, lse, o = rp._launch_fwd(q, k, v, *args)
        dout = torch.empty_like(out)
        on_phase("bwd")  # (the backward rebuilds the packed relq: its launches are priced)
        rp._launch_bwd(dout, q, k, v, tables, o, lse, *args[1:])
        return "relpos_attention"
    if case.op == "bottleneck":
        m = [torch.empty(B, H, case.n_main, D, **meta) for _ in range(3)]
        e = [torch.empty(B, H, case.n_extra, D, **meta) for _ in range(3)]
        on_phase("fwd")
        om, oe, lse = bn._launch_fwd(*m, *e, D**-0.5)
        do_m, do_e = torch.empty_like(om), torch.empty_like(oe)
        on_phase("bwd")
        bn._launch_bwd(*m, *e, om, oe, lse, do_m, do_e, D**-0.5)
        return "bottleneck_attention"
    if case.op == "pooled":
        n = int(case.has_cls) + math.prod(case.in_grid)
        qkv = torch.empty(B, n, 3 * H * D, **meta)
        w = [torch.empty(D, 1, *case.kernel, **meta) for _ in range(3)]
        norms = [(torch.empty(D, **meta), torch.empty(D, **meta)) for _ in range(3)]
        strides = (case.stride_q, case.stride_kv)
        on_phase("fwd")
        outs = pq._launch_fwd(qkv, w, norms, case.in_grid, case.has_cls, H, strides, 1e-6)
        grads = [torch.empty_like(o) for o in outs]
        on_phase("bwd")
        pq._launch_bwd(qkv, w, norms, grads, case.in_grid, case.has_cls, H, strides, 1e-6)
        return "pooled_qkv"
    raise ValueError(f"unknown op {case.op!r}")


def glue_bytes(case: Any, dtype: torch.dtype = torch.bfloat16) -> GlueCount:
    """Bytes read + written by every non-Triton op of ``case``'s forward and backward."""
    counter = ByteCounter()
    phase_launches: dict[str, int] = {}
    with capture_launches() as seen:

        def on_phase(p: str) -> None:
            if counter.phase != p:
                phase_launches[counter.phase] = len(seen) - sum(phase_launches.values())
            counter.phase = p

        with counter:
            run_meta(case, dtype, on_phase)
        phase_launches[counter.phase] = len(seen) - sum(phase_launches.values())
    name = getattr(case, "name", str(case))
    return GlueCount(name, str(dtype).removeprefix("torch."), counter.ops, phase_launches,
                     dict(counter.lines))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.kernels.cases import real_cases

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.glue", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("cases", nargs="*", help="case names (default: the compile gate's CI cases)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--top", type=int, default=12, help="ops shown per phase")
    ap.add_argument("--by-line", action="store_true", help="also the kernels' source lines")
    args = ap.parse_args(argv)
    cases = real_cases()
    names = args.cases or ["relpos/mat_s1", "relpos/video_s1", "bottleneck/mmt_audio",
                           "pooled/mat_s1", "pooled/video_s1"]  # fmt: skip
    unknown = [n for n in names if n not in cases]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {', '.join(cases)}", file=sys.stderr)
        return 2
    for n in names:
        count = glue_bytes(cases[n], getattr(torch, args.dtype))
        print(count.table(args.top), flush=True)
        if args.by_line:
            print(count.by_line(args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
