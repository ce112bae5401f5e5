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
- ``compile_s``: what the JIT will spend on it on the GPU machine (CPU-bound: the same there).

``selectable`` marks the variants a run can pick: the pinned config (used when
``MMT_FAST_KERNEL_CONFIGS=pinned``) and every config autotune keeps after pruning.
The gate fails (exit 1; ``tests/test_compile_gate.py``) when a selectable variant spills,
exceeds shared memory or has no tensor-core instruction.

    python -m benchmarks.compile_gate [--subset ci|full] [--arch 90 80] [--json PATH] [-j N]

``--subset ci`` (the default, what CI runs) compiles the pinned config of every kernel
in bf16 at MAT stage 1, MViTv2-B stage 1 and the AVBottleneck audio side, for sm_90;
``--subset full`` compiles every config, both 16-bit dtypes, every stage and both archs.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)
# The architectures whose selectable variants must pass. sm_80 is compiled and reported but
# not gated: the configs are chosen for the H100/H200 (sm_90), and several spill on sm_80.
GATED_ARCHS = (90,)
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
    selectable: bool = False
    pinned: bool = False  # the config MMT_FAST_KERNEL_CONFIGS=pinned runs
    compile_s: float = 0.0
    error: str = ""
    note: str = ""

    def failures(self) -> list[str]:
        """Why this variant fails the gate ([] when it passes or is not gated)."""
        return self.problems() if self.arch in GATED_ARCHS else []

    def problems(self) -> list[str]:
        """What is wrong with a selectable variant, gated architecture or not."""
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


@contextmanager
def _capture() -> Iterator[list[tuple[Any, tuple, dict]]]:
    """Record kernel launches (JIT and autotuned) instead of running them."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    seen: list[tuple[Any, tuple, dict]] = []
    jit_run, tune_run = JITFunction.run, Autotuner.run

    def fake_jit(self, *args, grid=None, warmup=False, **kwargs):
        seen.append((self, args, kwargs))

    def fake_tune(self, *args, **kwargs):
        seen.append((self, args, kwargs))

    JITFunction.run, Autotuner.run = fake_jit, fake_tune
    try:
        yield seen
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run


def _to_launch(op: str, obj: Any, args: tuple, kwargs: dict) -> Launch:
    from triton.runtime.autotuner import Autotuner

    from mmt_fast.kernels import tuning

    if isinstance(obj, Autotuner):
        fn = obj.fn
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update(kwargs)
        # the pinned config is the first of the list, so it is always among these
        kept = {id(c) for c in tuning.selectable(obj.configs)}
        configs = [{"kwargs": dict(c.kwargs), "num_warps": c.num_warps,
                    "num_stages": c.num_stages} for c in obj.configs]  # fmt: skip
        selectable = [id(c) in kept for c in obj.configs]
        return Launch(op, fn.__name__, bound, configs, selectable, fn)
    fn = obj
    bound = dict(zip(fn.arg_names, args))
    warps = kwargs.pop("num_warps", 4)
    stages = kwargs.pop("num_stages", 3)
    bound.update(kwargs)
    meta = {k: bound.pop(k) for k in [k for k in bound if k.startswith("BLOCK_")]}
    cfg = {"kwargs": meta, "num_warps": warps, "num_stages": stages}
    return Launch(op, fn.__name__, bound, [cfg], [True], fn)


# ----------------------------------------------------------------------------- shapes


def _cases() -> dict[str, Any]:
    try:
        from benchmarks.kernels.cases import real_cases
    except ImportError:
        from benchmarks.kernels import real_cases
    return real_cases()


def launches_for(case: Any, dtype) -> list[Launch]:
    """Capture every kernel launch of one case's forward and backward, on meta tensors."""
    import torch

    from mmt_fast.kernels import bottleneck_attention as bn
    from mmt_fast.kernels import pooled_qkv as pq
    from mmt_fast.kernels import relpos_attention as rp

    meta = dict(device="meta", dtype=dtype)
    B, H, D = case.batch, case.heads, case.head_dim
    with _capture() as seen:
        if case.op == "relpos":
            nq, nk = case.nq_nk
            q = torch.empty(B, H, nq, D, **meta)
            k = torch.empty(B, H, nk, D, **meta)
            v = torch.empty(B, H, nk, D, **meta)
            tables = [
                torch.empty(2 * max(a, b) - 1, D, **meta) for a, b in zip(case.q_grid, case.k_grid)
            ]
            args = (tables, case.q_grid, case.k_grid, case.has_cls, D**-0.5, True, True)
            out, lse, o, rel = rp._launch_fwd(q, k, v, *args)
            rp._launch_bwd(torch.empty_like(out), q, k, v, tables, o, lse, rel, *args[1:])
            op = "relpos_attention"
        elif case.op == "bottleneck":
            m = [torch.empty(B, H, case.n_main, D, **meta) for _ in range(3)]
            e = [torch.empty(B, H, case.n_extra, D, **meta) for _ in range(3)]
            om, oe, lse = bn._launch_fwd(*m, *e, D**-0.5)
            bn._launch_bwd(*m, *e, om, oe, lse, torch.empty_like(om), torch.empty_like(oe),
                           D**-0.5)  # fmt: skip
            op = "bottleneck_attention"
        else:
            n = int(case.has_cls) + math.prod(case.in_grid)
            C = H * D
            qkv = torch.empty(B, n, 3 * C, **meta)
            w = [torch.empty(D, 1, *case.kernel, **meta) for _ in range(3)]
            norms = [(torch.empty(D, **meta), torch.empty(D, **meta)) for _ in range(3)]
            strides = (case.stride_q, case.stride_kv)
            outs = pq._launch_fwd(qkv, w, norms, case.in_grid, case.has_cls, H, strides, 1e-6)
            pq._launch_bwd(qkv, w, norms, [torch.empty_like(o) for o in outs], case.in_grid,
                           case.has_cls, H, strides, 1e-6)  # fmt: skip
            op = "pooled_qkv"
    out: dict[tuple, Launch] = {}
    for obj, a, kw in seen:
        launch = _to_launch(op, obj, a, dict(kw))
        # pooled QKV launches once per q/k/v; keep distinct specialisations only
        key = (launch.kernel, repr(_signature(launch)[0]), repr(_constexpr_repr(launch)))
        out.setdefault(key, launch)
    return list(out.values())


# ----------------------------------------------------------------------------- compile


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
    return dict(registers=regs, spill_bytes=max(stores, loads), stack_bytes=stack,
                shared_bytes=int(compiled.metadata.shared), tc_instructions=tc, tensor_core=tc > 0,
                wgmma_serialized="C7515" in log, needs_tensor_core="tt.dot" in compiled.asm["ttir"], compile_s=round(seconds, 2))  # fmt: skip


def _job(case_name: str, dtype_name: str, kernel: str, cfg_index: int, arch: int) -> dict:
    """Worker: rebuild the launch in this process (functions do not pickle) and compile."""
    import torch

    case = _cases()[case_name]
    launch = next(x for x in launches_for(case, getattr(torch, dtype_name)) if x.kernel == kernel)
    cfg = launch.configs[cfg_index]
    try:
        return _compile_one(launch, cfg, arch)
    except Exception as e:  # a variant that does not compile is a row with its error
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}


def _config_str(cfg: dict) -> str:
    kw = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in cfg["kwargs"].items())
    return f"{kw} w={cfg['num_warps']} s={cfg['num_stages']}".strip()


# (dtype, arch, every_config) per subset: "full" compiles every autotune config in bf16 for
# sm_90 (the H100/H200 path) and the pinned configs in fp16 on sm_90 and bf16 on sm_80 (A100),
# float32 only for pooled QKV (fp32 attention takes the reference on CUDA,
# mmt_fast.kernels.dispatch.FP32_ON_CUDA).
SUBSETS = {
    "ci": dict(cases=("relpos/mat_s1", "relpos/video_s1", "bottleneck/mmt_audio", "pooled/mat_s1",
                      "pooled/video_s1"), pairs=(("bfloat16", 90, False),)),
    "full": dict(cases=None, pairs=(("bfloat16", 90, True), ("float16", 90, False),
                                    ("bfloat16", 80, False), ("float32", 90, False))),
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
        for dt in sorted({p[0] for p in pairs}):
            if dt == "float32" and case.op != "pooled":
                continue
            for launch in launches_for(case, getattr(torch, dt)):
                for i, (cfg, sel) in enumerate(zip(launch.configs, launch.selectable)):
                    pinned = _is_pinned(launch, cfg)
                    for _, arch, every in [p for p in pairs if p[0] == dt]:
                        if not (every or pinned):
                            continue
                        row = Row(kernel=launch.kernel, op=launch.op, dtype=dt, config=_config_str(cfg),
                                  shape=name, arch=arch, selectable=sel, pinned=pinned,
                                  shared_limit_bytes=SHARED_LIMIT[arch])  # fmt: skip
                        jobs.append((row, (name, dt, launch.kernel, i, arch)))
    return jobs


def _is_pinned(launch: Launch, cfg: dict) -> bool:
    from mmt_fast.kernels import tuning

    pinned = tuning.pinned_config(launch.kernel, launch.op)
    if pinned is None:
        return True
    return (cfg["kwargs"], cfg["num_warps"], cfg["num_stages"]) == (
        pinned.kwargs, pinned.num_warps, pinned.num_stages)  # fmt: skip


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
    print(f"\n{len(rows)} variants, {sum(r.selectable for r in rows)} selectable, "
          f"{len(failures)} failure(s); compile time {sum(r.compile_s for r in rows):.0f} s "
          f"(pinned, selectable: {sum(r.compile_s for r in rows if r.selectable):.0f} s)")  # fmt: skip
    for r, f in failures:
        print(f"FAIL {r.kernel} {r.shape} {r.dtype} sm_{r.arch} [{r.config}]: {f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"environment": environment(), "subset": args.subset,
                "rows": [asdict(r) for r in rows]}  # fmt: skip
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
