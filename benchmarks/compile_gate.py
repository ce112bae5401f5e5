"""Compile gate: every Triton kernel of the fused ops, built for a GPU on a machine without one.

For each kernel, each config autotune or a pin may pick, each 16-bit dtype and the
shapes the models run (MAT-B, MViTv2-B-16 and MMT's AVBottleneck), the kernel is
compiled for sm_90 (H100/H200) and optionally sm_80 (A100) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, exactly as the
JIT would specialise it at launch (the arguments are captured from the op's own
launcher, run on meta tensors, and specialised by Triton's ``native_specialize_impl``).
From the cubin (``cuobjdump -res-usage`` and ``-sass``, shipped in the triton wheel):

- ``registers`` per thread (the cap is 255) and ``spill_bytes`` (the local-memory stack:
  register spills in Triton code),
- ``shared_bytes`` against the target's per-block limit (227 KiB on sm_90, 163 KiB on sm_80),
- ``tensor_core``: the ``tl.dot``s lowered to ``HGMMA`` (sm_90) or ``HMMA`` (sm_80),
- ``compile_s``: what the JIT will spend on it on the GPU machine (CPU-bound: the same there),
- ``wgmma_serialized`` and ``wgmma_serialized_reason``: ptxas's C7515 warning and its text,
- ``hmma_instructions``: mma.sync instructions in the SASS (on sm_90: a dot that missed wgmma),

and from the TTGIR (``compiled.asm["ttgir"]``, :func:`dots_from_ttgir`), per ``tl.dot``:
the tile M x N x K, the MMA layout's ``warpsPerCTA`` and ``instrShape``, how often one
program runs it (the trip counts of the loops around it, evaluated from the launch's
arguments) and ``warp_duplication``: how many warps compute the same output element (1.0 =
none; Triton stacks all warps along M when one dot feeds another, so 8 warps on a 64-row
tile compute every row twice: 2.0). The row's ``warp_duplication`` is its dots' largest.

``selectable`` marks the variants a run can pick: the pinned config (used when
``MMT_FAST_KERNEL_CONFIGS=pinned``) and every config autotune keeps after pruning.
The gate fails (exit 1; ``tests/test_compile_gate.py``) when a selectable variant does not
compile, spills, exceeds shared memory or has no tensor-core instruction
(:meth:`Row.compile_problems`), or, on sm_90, has ``warp_duplication > 1``, a dot on
mma.sync (HMMA) instead of wgmma (HGMMA), or draws C7515 (:meth:`Row.speed_problems`).

    python -m benchmarks.compile_gate [--subset ci|full] [--arch 90 80] [--json PATH] [-j N]

``--subset ci`` (the default, what CI runs) compiles every selectable config of every
kernel in bf16 at MAT stage 1, MViTv2-B stage 1 and the AVBottleneck audio side, for sm_90;
``--subset full`` compiles every config, both 16-bit dtypes, every stage and both archs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)
# The architectures whose selectable variants must pass: on both, what stops a variant from
# running well everywhere (compile errors, spills, shared memory, no tensor core); on sm_90
# also the speed problems of wgmma (duplicated warps, mma.sync, C7515). Each arch has its
# own lists and pins (tuning.target_arch: entries tagged "sm90" / "sm80").
GATED_ARCHS = (90, 80)
TC_INSTR = {90: ("HGMMA", "HMMA"), 80: ("HMMA",)}
DEFAULT_JSON = Path("benchmarks/results/compile_gate.json")


@dataclass
class Launch:
    """One kernel launch captured from an op's launcher."""

    op: str
    kernel: str
    args: dict[str, Any]  # parameter name -> value (tensors on meta)
    configs: list[dict[str, Any]]  # {"kwargs": {...}, "num_warps": w, "num_stages": s}
    selectable: list[bool]
    fn: Any = field(repr=False, default=None)
    grid: Any = field(repr=False, default=None)  # the launch grid: a tuple or f(meta)


@dataclass
class Row:
    kernel: str
    op: str
    dtype: str
    config: str
    shape: str
    arch: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    shared_limit_bytes: int = 0
    tensor_core: bool = False
    needs_tensor_core: bool = True  # the kernel has a tl.dot (its TTIR has tt.dot)
    tc_instructions: int = 0
    stack_bytes: int = -1
    wgmma_serialized: bool = False  # ptxas C7515: wgmma pipeline serialised (a speed warning)
    wgmma_serialized_reason: str = ""  # ptxas's text after "(C7515)"
    hmma_instructions: int = 0  # mma.sync in the SASS (on sm_90: a dot that missed wgmma)
    warp_duplication: float = 1.0  # the largest over the kernel's dots (1.0 = none)
    dots: list = field(default_factory=list)  # per tl.dot: dots_from_ttgir
    selectable: bool = False
    pinned: bool = False  # the config MMT_FAST_KERNEL_CONFIGS=pinned runs
    spec: str = ""  # the specialisation (launches_for): a kernel can have several per shape
    compile_s: float = 0.0
    error: str = ""
    note: str = ""
    # the compiled TTGIR, for case_model to count each launch's own loop trips (launches of
    # one specialisation can differ in their integer arguments and grid); not written to JSON
    ttgir: str = field(default="", repr=False)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "ttgir"}

    def failures(self) -> list[str]:
        """Why this variant fails the gate ([] when it passes or is not gated)."""
        if self.arch not in GATED_ARCHS:
            return []
        return self.problems() if self.arch >= 90 else self.compile_problems()

    def problems(self) -> list[str]:
        """What is wrong with a selectable variant, gated architecture or not: what stops it
        from running (:meth:`compile_problems`) and what makes it slow (:meth:`speed_problems`)."""
        return self.compile_problems() + self.speed_problems()

    def speed_problems(self) -> list[str]:
        """Duplicated warps, a dot on mma.sync where wgmma exists, a serialised wgmma pipeline
        (ptxas C7515), in any config a run can select."""
        if not self.selectable or self.error:
            return []
        out = []
        if self.warp_duplication > 1:
            worst = max(self.dots, key=lambda d: d["warp_duplication"])
            out.append(f"warp_duplication {self.warp_duplication:g} (dot {worst['m']}x{worst['n']}"
                       f"x{worst['k']}, warpsPerCTA {worst['warps_per_cta']}, instrShape "
                       f"{worst['instr_shape']})")  # fmt: skip
        if self.arch >= 90 and self.needs_tensor_core:
            slow = [d for d in self.dots if d["mma_version"] != 3]
            if slow or self.hmma_instructions:
                out.append(f"{len(slow)} dot(s) not on wgmma, {self.hmma_instructions} HMMA "
                           "(mma.sync) instruction(s) instead of HGMMA")  # fmt: skip
            if self.wgmma_serialized:
                out.append(f"ptxas C7515 (wgmma serialised): {self.wgmma_serialized_reason}")
        return out

    def compile_problems(self) -> list[str]:
        """Does not compile, spills, exceeds shared memory, no tensor-core instruction."""
        if not self.selectable:
            return []
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_bytes > 0:
            out.append(f"spills {self.spill_bytes} B")
        if self.shared_bytes > self.shared_limit_bytes:
            out.append(f"needs {self.shared_bytes} B of shared memory > {self.shared_limit_bytes}")
        if self.needs_tensor_core and not self.tensor_core:
            out.append("no tensor-core instruction")
        return out


# ----------------------------------------------------------------------------- capture


def _to_launch(op: str, obj: Any, args: tuple, kwargs: dict, arch: int = 90) -> Launch:
    from triton.runtime.autotuner import Autotuner

    from mmt_fast.kernels import tuning

    grid = kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    if isinstance(obj, Autotuner):
        fn = obj.fn
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        # the pinned config is the first of the list, so it is always among these
        kept = {id(c) for c in tuning.selectable(obj.configs, arch)}
        configs = [{"kwargs": dict(c.kwargs), "num_warps": c.num_warps,
                    "num_stages": c.num_stages} for c in obj.configs]  # fmt: skip
        selectable = [id(c) in kept for c in obj.configs]
        return Launch(op, fn.__name__, bound, configs, selectable, fn, grid)
    fn = obj
    bound = dict(zip(fn.arg_names, args))
    warps = kwargs.pop("num_warps", 4)
    stages = kwargs.pop("num_stages", 3)
    bound.update(kwargs)
    meta = {k: bound.pop(k) for k in [k for k in bound if k.startswith("BLOCK_")]}
    cfg = {"kwargs": meta, "num_warps": warps, "num_stages": stages}
    return Launch(op, fn.__name__, bound, [cfg], [True], fn, grid)


# ----------------------------------------------------------------------------- shapes


@functools.cache
def _cases() -> dict[str, Any]:
    try:
        from benchmarks.kernels.cases import real_cases
    except ImportError:
        from benchmarks.kernels import real_cases
    return real_cases()


def launches_for(case: Any, dtype, arch: int = 90) -> list[Launch]:
    """Capture every kernel launch of one case's forward and backward, on meta tensors, with
    the launchers configured for ``arch``."""
    from benchmarks.glue import capture_launches, run_meta
    from mmt_fast.kernels import tuning

    with tuning.target(arch), capture_launches() as seen:
        op = run_meta(case, dtype)
    if arch < tuning.MIN_ARCH.get(op, 0):
        return []  # the op takes the reference on this arch (dispatch refuses it)
    out: dict[tuple, Launch] = {}
    for obj, a, kw in seen:
        launch = _to_launch(op, obj, a, dict(kw), arch)
        # pooled QKV launches once per q/k/v; keep distinct specialisations only
        out.setdefault((launch.kernel, _spec(launch)), launch)
    return list(out.values())


def _spec(launch: Launch) -> str:
    """A short name for the launch's specialisation (signature and constexprs): two launches
    of a kernel that compile to the same code have the same one."""
    text = repr(_signature(launch)[0]) + repr(_constexpr_repr(launch))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- TTGIR


_MMA_DEF = re.compile(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+), versionMinor = \d+, "
                      r"warpsPerCTA = \[([\d, ]+)\].*?instrShape = \[([\d, ]+)\]")  # fmt: skip
_DOT = re.compile(r"=\s*(?:ttng\.warp_group_dot|tt\.dot)\s+%[\w.]+,\s*%[\w.]+,.*?:\s*"
                  r"(?:!ttg\.memdesc|tensor)<(\d+)x(\d+)x(\w+)[,>].*?->\s*tensor<(\d+)x(\d+)x\w+,\s*(#\w+)")  # fmt: skip
_FOR = re.compile(r"scf\.for %[\w.]+ = (%[\w.]+) to (%[\w.]+) step (%[\w.]+)")
_CONST = re.compile(r"^(%[\w.]+) = arith\.constant (-?\d+) : i(?:32|64)\b")
_BINOP = re.compile(r"^(%[\w.]+) = arith\.(addi|subi|muli|divsi|divui|remsi|remui|maxsi|minsi|"
                    r"ceildivsi|floordivsi) (%[\w.]+), (%[\w.]+) : i(?:32|64)\b")  # fmt: skip
_CAST = re.compile(
    r"^(%[\w.]+) = arith\.(?:extsi|extui|trunci|index_cast) (%[\w.]+) : i\d+ to i\d+"
)
_ARG = re.compile(r"%(\w+): i(?:32|64)\b")
_INT_OPS = {
    "addi": lambda a, b: a + b, "subi": lambda a, b: a - b, "muli": lambda a, b: a * b,
    "divsi": lambda a, b: int(a / b), "divui": lambda a, b: a // b,
    "remsi": lambda a, b: int(math.fmod(a, b)), "remui": lambda a, b: a % b,
    "maxsi": max, "minsi": min, "ceildivsi": lambda a, b: -(-a // b),
    "floordivsi": lambda a, b: a // b,
}  # fmt: skip


def dots_from_ttgir(
    ttgir: str, args: dict[str, Any], grid: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Every ``tl.dot`` of a compiled kernel, from its TTGIR, with how often one program runs it.

    Per dot: the tile ``m`` x ``n`` x ``k`` (block shapes, padding included), the MMA layout
    (``mma_version`` 3 = wgmma/HGMMA, 2 = mma.sync/HMMA, 0 = no tensor core), its
    ``warps_per_cta`` and ``instr_shape``, the ``warp_duplication`` (how many warps compute
    the same output element: the layout's CTA tile, warpsPerCTA x instrShape with 16 rows per
    warp, over the dot's tile, per axis, when larger; 1.0 = none; [8, 1] on a 64-row tile =
    2.0) and ``trips``: the product of the trip counts of the ``scf.for`` loops around it,
    their bounds evaluated from the kernel's integer arguments (``args``). A bound that
    depends on the program id (a persistent, causal or split kernel) makes ``trips`` the
    exact mean over every program of ``grid``: the loops are evaluated for each combination
    of the values of the program-id axes the bounds depend on (the other axes cannot change
    them, and each combination stands for the same number of programs), and
    ``trips_range`` is [min, max] over them. -1 when a bound cannot be evaluated (a loaded
    value, an outer loop's variable, no ``grid``). A dot under a run-time ``scf.if`` counts
    as always run.
    """
    ops = _parse_ttgir(ttgir)
    first = _walk_dots(ops, args, (0, 0, 0) if grid else None, grid)
    axes = sorted({a for d in first for a in d["pid_axes"]})
    if not grid or not axes:
        return [{k: v for k, v in d.items() if k != "pid_axes"} for d in first]
    full = tuple(grid) + (1,) * (3 - len(grid))
    per_dot: list[list[float]] = [[] for _ in first]
    for values in itertools.product(*(range(full[a]) for a in axes)):
        pid = [0, 0, 0]
        for a, v in zip(axes, values):
            pid[a] = v
        for acc, d in zip(per_dot, _walk_dots(ops, args, tuple(pid), grid)):
            acc.append(d["trips"])
    out = []
    for a, trips in zip(first, per_dot):
        d = {k: v for k, v in a.items() if k != "pid_axes"}
        if a["pid_axes"]:
            bad = any(t < 0 for t in trips)
            d["trips"] = -1 if bad else sum(trips) / len(trips)
            d["trips_range"] = [min(trips), max(trips)]
        out.append(d)
    return out


_PID = re.compile(r"^(%[\w.]+) = tt\.get_(program_id|num_programs) ([xyz]) : i32")


def _parse_ttgir(ttgir: str) -> list[tuple]:
    """The lines of a TTGIR that :func:`_walk_dots` evaluates, parsed once (a kernel whose
    loops depend on the program id is walked once per program-id value)."""
    ops: list[tuple] = []
    for raw in ttgir.splitlines():
        line = raw.strip()
        if m := _MMA_DEF.match(line):
            warps, instr = ([int(x) for x in m.group(g).split(",")] for g in (3, 4))
            ops.append(("mma", m.group(1), (int(m.group(2)), warps, instr)))
            continue
        if m := _CONST.match(line):
            ops.append(("const", m.group(1), int(m.group(2))))
        elif m := _BINOP.match(line):
            ops.append(("bin", m.group(1), m.group(2), m.group(3), m.group(4)))
        elif m := _CAST.match(line):
            ops.append(("cast", m.group(1), m.group(2)))
        elif m := _PID.match(line):
            ops.append(("pid", m.group(1), m.group(2), "xyz".index(m.group(3))))
        if m := _DOT.search(line):
            ops.append(("dot", int(m.group(2)), int(m.group(4)), int(m.group(5)), m.group(6),
                        m.group(3)))  # fmt: skip
        opened, closed = line.count("{"), line.count("}")
        if closed > opened:
            ops.append(("close", closed - opened))
        elif opened > closed:
            m = _FOR.search(line)
            ops.append(("open", opened - closed, m.groups() if m else None))
    return ops


def _walk_dots(ops: list[tuple], args: dict[str, Any], pid, grid) -> list[dict[str, Any]]:
    """One pass of :func:`dots_from_ttgir` over the parsed TTGIR with the program ids ``pid``
    (None: unknown); per dot, ``pid_axes``: the program-id axes its loop bounds depend on."""
    layouts: dict[str, tuple[int, list[int], list[int]]] = {}
    values: dict[str, int | None] = {}
    from_pid: dict[str, frozenset] = {}  # values computed from the program id: its axes
    for name, value in args.items():
        if isinstance(value, int) and not isinstance(value, bool):
            values["%" + name] = value
    stack: list[tuple[int, frozenset]] = []  # (trip count, pid axes) of each open region
    dots = []
    none: frozenset = frozenset()
    for op in ops:
        kind = op[0]
        if kind == "const":
            values[op[1]] = op[2]
        elif kind == "bin":
            _, name, fn, x, y = op
            a, b = values.get(x), values.get(y)
            ok = a is not None and b is not None and not (fn[3:] in ("si", "ui") and b == 0)
            values[name] = _INT_OPS[fn](a, b) if ok else None
            dep = from_pid.get(x, none) | from_pid.get(y, none)
            if dep:
                from_pid[name] = dep
        elif kind == "cast":
            values[op[1]] = values.get(op[2])
            if op[2] in from_pid:
                from_pid[op[1]] = from_pid[op[2]]
        elif kind == "pid":
            _, name, what, axis = op
            if what == "num_programs":
                values[name] = grid[axis] if grid and axis < len(grid) else 1 if grid else None
            else:
                values[name] = pid[axis] if pid else None
                from_pid[name] = frozenset((axis,))
        elif kind == "mma":
            layouts[op[1]] = op[2]
        elif kind == "dot":
            _, k, m_, n, lay, dtype = op
            version, warps, instr = layouts.get(lay, (0, [], []))
            dup = 1.0
            if version:
                dup = max(1.0, warps[0] * instr[0] / m_) * max(1.0, warps[1] * instr[1] / n)
            trips = -1 if any(t < 0 for t, _ in stack) else math.prod(t for t, _ in stack)
            axes = sorted(set().union(*(p for _, p in stack)))
            dots.append(dict(m=m_, n=n, k=k, dtype=dtype, mma_version=version,
                             warps_per_cta=warps, instr_shape=instr, warp_duplication=dup,
                             trips=trips, pid_axes=axes))  # fmt: skip
        elif kind == "close":
            del stack[len(stack) - op[1] :]
        elif kind == "open":
            trip, dep = 1, none
            if op[2]:
                lo, hi, step = (values.get(g) for g in op[2])
                trip = -1 if None in (lo, hi, step) else max(0, -(-(hi - lo) // step))
                dep = none.union(*(from_pid.get(g, none) for g in op[2]))
            stack.extend([(trip, dep)] * op[1])
    return dots


# ----------------------------------------------------------------------------- compile


def _grid(launch: Launch, cfg: dict) -> tuple[int, ...]:
    """The launch grid under config ``cfg`` (() when the launch carries none)."""
    grid = launch.grid
    if callable(grid):
        grid = grid({**launch.args, **cfg["kwargs"]})
    return tuple(int(g) for g in grid) if grid is not None else ()


def _signature(launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT builds them for these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = launch.fn
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name not in launch.args:
            continue  # a config's meta-parameter, added per config
        value = launch.args[name]
        if p.is_constexpr:
            sig[name], consts[name] = "constexpr", value
            continue
        if hasattr(value, "data_ptr"):
            ty, key = ("*" + _tl_name(value.dtype), "D")
        else:
            ty, key = native_specialize_impl(
                CUDABackend, value, False, not p.do_not_specialize,
                not p.do_not_specialize_on_alignment,
            )  # fmt: skip
        if ty == "constexpr":
            sig[name], consts[name] = "constexpr", key
            continue
        sig[name] = ty
        if key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _constexpr_repr(launch: Launch) -> dict:
    return {k: str(v) for k, v in _signature(launch)[1].items()}


def _tl_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}[dtype]  # fmt: skip


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _compile_one(launch: Launch, cfg: dict, arch: int) -> dict[str, Any]:
    """Compile one variant; return registers, spills, shared memory, tensor-core count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _signature(launch)
    for k, v in cfg["kwargs"].items():
        sig[k], consts[k] = "constexpr", v
    order = {p.name: i for i, p in enumerate(launch.fn.params)}
    sig = dict(sorted(sig.items(), key=lambda kv: order[kv[0]]))
    src = ASTSource(launch.fn, sig, constexprs=consts, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        gpu = f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}"
        log = subprocess.run([_tool("ptxas"), gpu, "-v", str(ptx), "-o", str(Path(tmp) / "p.cubin")],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", log).group(1))
    tc = sum(len(re.findall(rf"\b{ins}\b", sass)) for ins in TC_INSTR[arch])
    hmma = len(re.findall(r"\bHMMA\b", sass))
    serialized = sorted({m.strip() for m in re.findall(r"\(C7515\)(.*)", log)})
    dots = dots_from_ttgir(compiled.asm["ttgir"], launch.args, _grid(launch, cfg))
    return dict(dots=dots, hmma_instructions=hmma, wgmma_serialized_reason=" | ".join(serialized),
                warp_duplication=max([d["warp_duplication"] for d in dots], default=1.0),
                registers=regs, spill_bytes=max(stores, loads), stack_bytes=stack,
                shared_bytes=int(compiled.metadata.shared), tc_instructions=tc, tensor_core=tc > 0,
                wgmma_serialized="C7515" in log, needs_tensor_core="tt.dot" in compiled.asm["ttir"], compile_s=round(seconds, 2),
                ttgir=compiled.asm["ttgir"])  # fmt: skip


@functools.cache
def _worker_launches(case_name: str, dtype_name: str, arch: int) -> list[Launch]:
    """A case's launches, captured once per worker process (they are read, never changed)."""
    import torch

    return launches_for(_cases()[case_name], getattr(torch, dtype_name), arch)


def _job(case_name: str, dtype_name: str, launch_index: int, cfg_index: int, arch: int) -> dict:
    """Worker: rebuild the launch in this process (functions do not pickle) and compile."""
    launch = _worker_launches(case_name, dtype_name, arch)[launch_index]
    cfg = launch.configs[cfg_index]
    try:
        return _compile_one(launch, cfg, arch)
    except Exception as e:  # a variant that does not compile is a row with its error
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}


def _config_str(cfg: dict) -> str:
    kw = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in cfg["kwargs"].items())
    return f"{kw} w={cfg['num_warps']} s={cfg['num_stages']}".strip()


# (dtype, arch, every_config) per subset: "full" compiles every autotune config in bf16 for
# sm_90 (the H100/H200 path) and sm_80 (A100) and the pinned configs in fp16 on sm_90,
# float32 only for pooled QKV (fp32 attention takes the reference on CUDA,
# mmt_fast.kernels.dispatch.FP32_ON_CUDA).
SUBSETS = {
    "ci": dict(cases=("relpos/mat_s1", "relpos/video_s1", "bottleneck/mmt_audio", "pooled/mat_s1",
                      "pooled/video_s1"), pairs=(("bfloat16", 90, True),)),
    "full": dict(cases=None, pairs=(("bfloat16", 90, True), ("float16", 90, False),
                                    ("bfloat16", 80, True), ("float32", 90, False))),
}  # fmt: skip


def plan(subset: str, archs: Sequence[int] | None = None) -> list[tuple[Row, tuple]]:
    """The variants to compile: (row without results, worker arguments)."""
    import torch

    spec = SUBSETS[subset]
    cases = _cases()
    names = spec["cases"] or list(cases)
    pairs = [p for p in spec["pairs"] if not archs or p[1] in archs]
    jobs = []
    for name in names:
        case = cases[name]
        for dt, arch, every in pairs:
            if dt == "float32" and case.op != "pooled":
                continue
            for li, launch in enumerate(launches_for(case, getattr(torch, dt), arch)):
                for i, (cfg, sel) in enumerate(zip(launch.configs, launch.selectable)):
                    pinned = _is_pinned(launch, cfg, arch)
                    if not (every or pinned):
                        continue
                    row = Row(kernel=launch.kernel, op=launch.op, dtype=dt, config=_config_str(cfg),
                              shape=name, arch=arch, selectable=sel, pinned=pinned,
                              shared_limit_bytes=SHARED_LIMIT[arch], spec=_spec(launch))  # fmt: skip
                    jobs.append((row, (name, dt, li, i, arch)))
    return jobs


def _is_pinned(launch: Launch, cfg: dict, arch: int = 90) -> bool:
    from mmt_fast.kernels import tuning

    # the pin for this launch's shape and arch (tuning.pin_index: what the launchers follow)
    pinned = tuning.pinned_config(launch.kernel, launch.op, launch.args, arch)
    if pinned is None:
        return True
    same = all(cfg["kwargs"].get(k) == v for k, v in pinned.kwargs.items())
    return same and (cfg["num_warps"], cfg["num_stages"]) == (pinned.num_warps, pinned.num_stages)


# ----------------------------------------------------------------------------- model

# The cases the performance model prices (``--subset full``; the CI subset prices its own).
MODEL_CASES = (
    *(f"relpos/mat_s{s}" for s in range(1, 5)), "relpos/video_s1", "relpos/video_s2",
    "bottleneck/mmt_audio", "bottleneck/mmt_video", "pooled/mat_s1", "pooled/video_s1",
)  # fmt: skip
# The targets, checked per case: (field, limit). Issue 14: rel-pos at MAT stage 1 and the
# glue; issue 23: the bottleneck op at both MMT cases.
TARGETS = {
    "relpos/mat_s1": (("executed_over_useful", 1.55), ("executed_over_useful_fwd", 1.05),
                      ("glue_bytes", 0.5e9)),
    "relpos/video_s1": (("glue_bytes", 0.2e9),),
    "bottleneck/mmt_audio": (("executed_over_useful", 1.6),),
    "bottleneck/mmt_video": (("executed_over_useful", 1.6),),
}  # fmt: skip


MODEL = (
    "model_ms = executed tensor-core FLOPs in whole waves / 790 TFLOP/s + glue bytes / 4.3 TB/s "
    "(H200, measured bf16 matmul and copy rates). Executed: per Triton launch of forward + "
    "backward, programs (the launch grid) x per dot 2 M N K (block tiles, padding included) x "
    "warp_duplication x loop trips (TTGIR; the exact mean over the launch's programs where a "
    "bound depends on the program id), plus the glue's matmuls (cuBLAS) and, for pooled "
    "Q/K/V, the qkv projection. Waves: a launch runs programs_per_sm x 132 programs at a time "
    "(programs per SM from registers, shared memory and threads: 64K registers, 228 KiB, 2048 "
    "threads, 32 programs per SM on an H100/H200), each SM sharing its rate among its programs; "
    "a partial last wave takes as long as a full one, so a launch is priced as ceil(waves) full "
    "waves. Executed also counts the rel-pos op's CLS work done on the CUDA cores (the CLS "
    "query's row and the CLS key's column, peeled off the tiles: counted from the kernels' "
    "code, cuda_core_tflop), priced at 67 TFLOP/s (the H100/H200 SXM datasheet's fp32 rate, "
    "not measured). Glue: benchmarks.glue. Useful and floor: benchmarks.kernels.roofline. An "
    "estimate from the compiled code, not a measurement."
)
CUDA_CORE_FLOPS = 67e12  # H100 / H200 SXM fp32 (datasheet; an upper bound, not measured)

# An H100 SXM / H200 multiprocessor (CUDA's limits for compute capability 9.0).
SM_COUNT = 132
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
SM_SHARED_RESERVED = 1024  # per resident program (CUDA reserves 1 KiB of shared memory per block)
SM_THREADS = 2048
SM_PROGRAMS = 32


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int) -> int:
    """Programs of a kernel one SM holds at once: the fewest its registers (allocated per warp
    in units of 8 per thread), shared memory, threads and the block limit allow."""
    threads = 32 * num_warps
    regs = -(-max(registers, 1) // 8) * 8
    return min(SM_REGISTERS // (regs * threads),
               SM_SHARED_BYTES // (shared_bytes + SM_SHARED_RESERVED),
               SM_THREADS // threads, SM_PROGRAMS)  # fmt: skip


def wave_flops(programs: int, per_sm: int, flops_per_program: float) -> float:
    """A launch's FLOPs counted in whole waves of ``per_sm`` x SM_COUNT programs: the time
    the launch takes at the GPU's full rate (a partial last wave as long as a full one)."""
    slots = max(per_sm, 1) * SM_COUNT
    return -(-programs // slots) * slots * flops_per_program


def model_ms(flops: float, glue_bytes: float, cuda_core_flops: float = 0.0) -> float:
    """The model's time: ``flops`` at the measured matmul rate plus ``glue_bytes`` at the
    measured copy rate plus ``cuda_core_flops`` at the fp32 datasheet rate (:data:`MODEL`)."""
    from benchmarks.kernels import roofline

    return (flops / roofline.PEAK_FLOPS + glue_bytes / roofline.PEAK_BYTES
            + cuda_core_flops / CUDA_CORE_FLOPS) * 1e3  # fmt: skip


def cuda_core_flops(case: Any) -> tuple[float, float]:
    """(fwd, bwd) matmul-like FLOPs the rel-pos kernels run on the CUDA cores: the CLS work
    peeled off the tensor-core tiles, counted from ``kernels/relpos_attention.py`` (2 per
    multiply-add, per (b, h), Nq, Nk with the CLS token, D the head dim):

    - forward: the CLS query's row (q k^T and p V over all Nk keys: 4 Nk D) and the CLS key's
      score and value for each spatial query (the online softmax seeded with them: 4 (Nq - 1)
      D);
    - backward: the delta kernel's CLS-key column (score, dP, dV and dK shares: 8 Nq D); the
      dK/dV kernel's CLS-query column (score, dP, dV, dK: 8 (Nk - 1) D); the dQ kernel's CLS
      row (score, dP, dQ: 6 Nk D) and the CLS key's dQ term of every row (2 Nq D).

    0 for other ops and without a CLS token."""
    if case.op != "relpos" or not case.has_cls:
        return 0.0, 0.0
    nq, nk = case.nq_nk
    bhd = case.batch * case.heads * case.head_dim
    return bhd * (4.0 * nk + 4.0 * (nq - 1)), bhd * (10.0 * nq + 8.0 * (nk - 1) + 6.0 * nk)


@dataclass
class CaseModel:
    """The static performance model of one case's forward + backward (bf16, sm_90, pinned)."""

    case: str
    useful_tflop: float  # the roofline's count (benchmarks.kernels.roofline), fwd + bwd
    executed_tflop: float  # tensor-core work as compiled (Triton dots + the glue's matmuls)
    # + cuda_core_tflop
    glue_bytes: int  # benchmarks.glue: every non-Triton op of forward + backward
    model_ms: float  # executed in whole waves / 790 TFLOP/s + glue / 4.3 TB/s
    floor_ms: float  # the roofline floor, fwd + bwd
    useful_tflop_fwd: float = 0.0
    executed_tflop_fwd: float = 0.0
    glue_bytes_fwd: int = 0
    glue_tflop: float = 0.0  # of executed: the glue's matmuls (cuBLAS)
    extra_tflop: float = 0.0  # of executed: work outside the op counted by the roofline
    cuda_core_tflop: float = 0.0  # of executed: the CLS work on the CUDA cores (fwd + bwd)
    kernels: dict = field(default_factory=dict)  # kernel -> executed TFLOP (fwd + bwd)
    executed_tflop_waves: float = 0.0  # executed with each launch rounded up to whole waves
    # per launch: grid, occupancy, waves, executed TFLOP and, per dot whose loops depend on
    # the program id, pid_trips [mean, min, max] over the launch's programs
    launches: list = field(default_factory=list)
    glue_by_op: dict = field(default_factory=dict)
    note: str = ""

    @property
    def executed_over_useful(self) -> float:
        return self.executed_tflop / self.useful_tflop

    @property
    def executed_over_useful_fwd(self) -> float:
        return self.executed_tflop_fwd / self.useful_tflop_fwd

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["executed_over_useful"] = round(self.executed_over_useful, 4)
        d["executed_over_useful_fwd"] = round(self.executed_over_useful_fwd, 4)
        return d

    def failures(self) -> list[str]:
        """The targets of :data:`TARGETS` this case misses."""
        out = []
        for name, limit in TARGETS.get(self.case, ()):
            value = getattr(self, name)
            if value > limit:
                out.append(f"{self.case}: {name} {value:.4g} > {limit:g}")
        return out


def _programs(launch: Launch, cfg: dict) -> int:
    return math.prod(_grid(launch, cfg))


def _dot_flops(dots: list[dict]) -> float:
    """FLOPs one program executes on the tensor cores: 2 M N K x duplication x trips per dot."""
    return sum(2.0 * d["m"] * d["n"] * d["k"] * d["warp_duplication"] * d["trips"] for d in dots)


def case_model(name: str, rows: Sequence[Row]) -> CaseModel:
    """Price one case from the compiled rows (bf16, sm_90, pinned) and its glue traffic."""
    import torch

    from benchmarks.glue import capture_launches, glue_bytes, run_meta
    from benchmarks.kernels import roofline
    from mmt_fast.kernels import tuning

    case = _cases()[name]
    marks: list[tuple[str, int]] = []
    with tuning.target(90), capture_launches() as seen:
        op = run_meta(case, torch.bfloat16, lambda p: marks.append((p, len(seen))))
    bwd_from = dict(marks)["bwd"]
    pinned = {(r.kernel, r.spec): r for r in rows if r.shape == name and r.dtype == "bfloat16"
              and r.arch == 90 and r.pinned and not r.error}  # fmt: skip
    executed = [0.0, 0.0]  # fwd, bwd
    in_waves = 0.0
    kernels: dict[str, float] = {}
    launches = []
    notes = []
    for i, (obj, a, kw) in enumerate(seen):
        launch = _to_launch(op, obj, a, dict(kw))
        cfg = next(c for c in launch.configs if _is_pinned(launch, c))
        row = pinned.get((launch.kernel, _spec(launch)))
        if row is None:
            raise ValueError(f"{name}: no compiled pinned row for {launch.kernel}")
        # this launch's own trips (exact mean over its programs): the row's were counted
        # for the first launch of its specialisation, whose arguments and grid may differ
        dots = row.dots
        if row.ttgir:
            dots = dots_from_ttgir(row.ttgir, launch.args, _grid(launch, cfg))
        if any(d["trips"] < 0 for d in dots):
            notes.append(f"{launch.kernel}: a loop bound could not be evaluated (counted once)")
        per_program = _dot_flops([dict(d, trips=max(d["trips"], 1)) for d in dots])
        programs = _programs(launch, cfg)
        per_sm = programs_per_sm(row.registers, row.shared_bytes, cfg["num_warps"])
        flops = programs * per_program
        executed[i >= bwd_from] += flops
        in_waves += wave_flops(programs, per_sm, per_program)
        kernels[launch.kernel] = kernels.get(launch.kernel, 0.0) + flops / 1e12
        waves = programs / (max(per_sm, 1) * SM_COUNT)
        launches.append(dict(
            kernel=launch.kernel, phase="bwd" if i >= bwd_from else "fwd", config=row.config,
            programs=programs, programs_per_sm=per_sm,
            occupancy=round(per_sm * cfg["num_warps"] / (SM_THREADS // 32), 4),
            waves=round(waves, 3), last_wave_full=round(waves - math.ceil(waves) + 1, 3),
            executed_tflop=round(flops / 1e12, 6),
            pid_trips=[[d["trips"], *d["trips_range"]] for d in dots if "trips_range" in d],
        ))  # fmt: skip
    glue = glue_bytes(case, torch.bfloat16)
    g = glue.as_dict()
    extra = extra_fwd = 0.0
    if case.op == "pooled":
        # the projection F.linear (cuBLAS) before the op: in the roofline's useful count
        n = int(case.has_cls) + math.prod(case.in_grid)
        extra_fwd = 2.0 * case.batch * n * case.dim_in * 3 * case.heads * case.head_dim
        extra = 3 * extra_fwd
        notes.append("executed includes the qkv projection (cuBLAS, fwd + bwd); the depthwise "
                     "pooling taps run on CUDA cores and are not modelled")  # fmt: skip
    cc_fwd, cc_bwd = cuda_core_flops(case)
    ex_fwd = executed[0] + g["glue_matmul_flops_fwd"] + extra_fwd + cc_fwd
    ex = sum(executed) + g["glue_matmul_flops"] + extra + cc_fwd + cc_bwd
    ex_waves = in_waves + g["glue_matmul_flops"] + extra
    return CaseModel(
        case=name,
        useful_tflop=roofline.flops(case, "fwd_bwd") / 1e12,
        executed_tflop=ex / 1e12,
        glue_bytes=g["glue_bytes"],
        model_ms=model_ms(ex_waves, g["glue_bytes"], cc_fwd + cc_bwd),
        floor_ms=roofline.floor_s(case, "fwd_bwd")["floor_ms"],
        useful_tflop_fwd=roofline.flops(case, "fwd") / 1e12,
        executed_tflop_fwd=ex_fwd / 1e12,
        glue_bytes_fwd=g["glue_bytes_fwd"],
        glue_tflop=g["glue_matmul_flops"] / 1e12,
        extra_tflop=extra / 1e12,
        kernels={k: round(v, 5) for k, v in kernels.items()},
        executed_tflop_waves=(ex_waves + cc_fwd + cc_bwd) / 1e12,
        cuda_core_tflop=(cc_fwd + cc_bwd) / 1e12,
        launches=launches,
        glue_by_op=g["glue_by_op"],
        note="; ".join(notes),
    )


def model_cases(subset: str) -> tuple[str, ...]:
    spec = SUBSETS[subset]
    return tuple(spec["cases"]) if spec["cases"] else MODEL_CASES


def run(subset: str, archs: Sequence[int] | None, workers: int) -> list[Row]:
    jobs = plan(subset, archs)
    print(f"compile gate: {len(jobs)} variants ({subset}), {workers} worker(s)", flush=True)
    rows: list[Row] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_job, *args): row for row, args in jobs}
        for n, fut in enumerate(as_completed(futures), 1):
            row = futures[fut]
            for k, v in fut.result().items():
                setattr(row, k, v)
            if row.selectable and not row.pinned and row.shared_bytes > row.shared_limit_bytes:
                # Triton's autotuner skips a config that does not fit (OutOfResources), and
                # tuning.early_prune drops it before compiling: no run can pick it here.
                row.selectable = False
                row.note = "over this arch's shared memory: pruned by autotune"
            rows.append(row)
            bad = "; ".join(row.problems())
            tag = "FAIL" if row.failures() else "not gated"
            print(f"[{n}/{len(jobs)} {time.perf_counter() - t0:5.0f}s] {_line(row)}"
                  + (f"  {tag}: {bad}" if bad else ""), flush=True)  # fmt: skip
    rows.sort(key=lambda r: (r.op, r.shape, r.kernel, r.dtype, r.arch, r.config))
    return rows


def _line(r: Row) -> str:
    if r.error:
        return (
            f"{r.kernel:22s} {r.shape:20s} {r.dtype:8s} sm_{r.arch} {r.config:24s} ERROR {r.error}"
        )
    return (f"{r.kernel:22s} {r.shape:20s} {r.dtype:8s} sm_{r.arch} {r.config:24s} "
            f"regs {r.registers:3d} spill {r.spill_bytes:5d} B smem {r.shared_bytes / 1024:6.1f} KiB "
            f"tc {r.tc_instructions:4d} {r.compile_s:6.1f}s{'' if r.selectable else ' (not selectable)'}")  # fmt: skip


def environment() -> dict[str, Any]:
    import torch
    import triton

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.machine()} ({os.cpu_count()} cores, no GPU needed)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "method": "triton.compile(ASTSource, GPUTarget('cuda', arch, 32)) + cuobjdump -res-usage/-sass",
    }


def dumps(data: dict) -> str:
    """``data`` as JSON with one line per row and per case (a full run has 500+ rows with
    their dots: about half the bytes of an indented dump, and line-sized diffs)."""
    parts = []
    for k, v in data.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            items = ",\n  ".join(json.dumps(x) for x in v)
            parts.append(f"{json.dumps(k)}: [\n  {items}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_gate",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--subset", choices=tuple(SUBSETS), default="ci")
    ap.add_argument("--arch", type=int, nargs="*", choices=(90, 80), help="only these archs")
    ap.add_argument("--json", type=Path, help=f"write the rows (e.g. {DEFAULT_JSON})")
    ap.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile gate: unset TRITON_INTERPRET (it replaces kernels by interpreted ones)",
              file=sys.stderr)  # fmt: skip
        return 2
    if shutil.which(_tool("cuobjdump")) is None:
        print(f"compile gate: {_tool('cuobjdump')} not found (the triton wheel ships it)",
              file=sys.stderr)  # fmt: skip
        return 2
    # A fresh Triton cache: compile_s must be what a cold GPU machine spends, not a cache hit.
    with tempfile.TemporaryDirectory(prefix="compile_gate_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = run(args.subset, args.arch, args.workers)
    failures = [(r, f) for r in rows for f in r.failures()]
    cases: list[CaseModel] = []
    if not args.arch or 90 in args.arch:
        print("\nperformance model (bf16, sm_90, pinned configs; forward + backward):")
        print(f"{'case':22s} {'useful TFLOP':>12s} {'executed':>9s} {'ratio':>6s} "
              f"{'glue GB':>8s} {'model ms':>9s} {'floor ms':>9s}")  # fmt: skip
        for name in model_cases(args.subset):
            c = case_model(name, rows)
            cases.append(c)
            print(f"{c.case:22s} {c.useful_tflop:12.4f} {c.executed_tflop:9.4f} "
                  f"{c.executed_over_useful:6.2f} {c.glue_bytes / 1e9:8.3f} {c.model_ms:9.3f} "
                  f"{c.floor_ms:9.3f}", flush=True)  # fmt: skip
    small = [(c.case, x) for c in cases for x in c.launches if x["waves"] < 1]
    if small:
        print("\nlaunches shorter than one wave (programs < 132 x programs per SM):")
        for case, x in small:
            print(f"  {case:22s} {x['phase']} {x['kernel']:20s} {x['programs']:6d} programs, "
                  f"{x['programs_per_sm']} per SM: {x['waves']:.2f} of a wave")  # fmt: skip
    case_failures = [f for c in cases for f in c.failures()]
    print(f"\n{len(rows)} variants, {sum(r.selectable for r in rows)} selectable, "
          f"{len(failures)} failure(s); compile time {sum(r.compile_s for r in rows):.0f} s "
          f"(pinned, selectable: {sum(r.compile_s for r in rows if r.selectable):.0f} s)")  # fmt: skip
    for r, f in failures:
        print(f"FAIL {r.kernel} {r.shape} {r.dtype} sm_{r.arch} [{r.config}]: {f}")
    for f in case_failures:
        print(f"FAIL target {f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"environment": environment(), "subset": args.subset, "model": MODEL,
                "targets": {k: dict(v) for k, v in TARGETS.items()},
                "cases": [c.as_dict() for c in cases], "case_failures": case_failures,
                "rows": [r.as_json() for r in rows]}  # fmt: skip
        args.json.write_text(dumps(data))
        print(f"wrote {args.json}")
    return 1 if failures or case_failures else 0


if __name__ == "__main__":
    sys.exit(main())
