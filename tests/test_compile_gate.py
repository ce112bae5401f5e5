"""The compile gate: every pinned kernel config compiled for sm_90 on this CPU, the gate itself
shown to catch spills, duplicated warps, mma.sync and C7515, its per-dot reading (tiles, MMA
layouts, loop trips) checked on kernels of its own, its performance model (useful and
executed tensor-core FLOPs, glue bytes around the kernels, model time) and issue 14's targets.

The CI subset (``--subset ci``: every selectable config of every kernel, bf16, at MAT
stage 1, MViTv2-B stage 1 and the AVBottleneck, sm_90) runs here, in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces kernels by Python). The whole matrix
(every autotune config, bf16/fp16, every stage, sm_90 and sm_80) is
``python -m benchmarks.compile_gate --subset full``; its last result is committed in
``benchmarks/results/compile_gate.json`` and must pass the gate as committed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def ci_gate(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_gate", "--subset", "ci", "--json", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc, data


def test_ci_subset_compiles(ci_gate) -> None:
    """Every pinned variant of the CI subset compiles without spills, within shared memory,
    with tensor-core matmuls (the speed criteria are test_ci_subset_meets_the_speed_targets)."""
    from benchmarks.compile_gate import Row

    proc, data = ci_gate
    assert proc.returncode in (0, 1) and data, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = data["rows"]
    fields = {"kernel", "dtype", "config", "shape", "arch", "registers", "spill_bytes",
              "shared_bytes", "shared_limit_bytes", "tensor_core", "selectable", "compile_s",
              "warp_duplication", "dots", "hmma_instructions", "wgmma_serialized_reason"}  # fmt: skip
    assert all(fields <= set(r) for r in rows)
    # Every kernel of the three ops, at every CI shape.
    kernels = {(r["op"], r["kernel"]) for r in rows}
    assert {("relpos_attention", k) for k in
            ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_delta_kernel")} <= kernels  # fmt: skip
    assert ("bottleneck_attention", "_bwd_kernel") in kernels
    assert ("pooled_qkv", "_pool_bwd_input_kernel") in kernels
    for r in rows:
        assert not r["error"], r
        assert r["spill_bytes"] == 0 and r["shared_bytes"] <= r["shared_limit_bytes"], r
        assert r["tensor_core"] or not r["needs_tensor_core"], r
        assert 0 < r["registers"] <= 255
        assert not Row(**r).compile_problems(), r
        # the gate's exit status counts exactly the failures the rows and cases show
    n_fail = sum(len(Row(**r).failures()) for r in rows) + len(data["case_failures"])
    assert proc.returncode == int(n_fail > 0), proc.stdout[-3000:]


def test_ci_subset_prices_every_case(ci_gate) -> None:
    """The JSON's ``cases``: useful FLOPs and the floor are the roofline's, an attention op
    executes at least its useful work on the tensor cores, its launches add up to its Triton
    kernels' work and each fits at least one program per SM, counting in whole waves never
    lowers the work, and every dot of an attention kernel has a known trip count."""
    import math

    from benchmarks.kernels import roofline
    from benchmarks.kernels.cases import real_cases

    _, data = ci_gate
    cases = {c["case"]: c for c in data["cases"]}
    assert set(cases) == {"relpos/mat_s1", "relpos/video_s1", "bottleneck/mmt_audio",
                          "pooled/mat_s1", "pooled/video_s1"}  # fmt: skip
    real = real_cases()
    for name, c in cases.items():
        case = real[name]
        assert math.isclose(c["useful_tflop"], roofline.flops(case, "fwd_bwd") / 1e12)
        assert math.isclose(c["floor_ms"], roofline.floor_s(case, "fwd_bwd")["floor_ms"])
        assert c["glue_bytes"] >= c["glue_bytes_fwd"] >= 0
        launched = sum(x["executed_tflop"] for x in c["launches"])
        assert math.isclose(launched, sum(c["kernels"].values()), rel_tol=1e-3, abs_tol=1e-5)
        assert all(x["programs"] >= 1 and x["programs_per_sm"] >= 1 for x in c["launches"]), c
        assert c["executed_tflop_waves"] >= c["executed_tflop"] * (1 - 1e-9), c
        assert c["model_ms"] >= c["floor_ms"] * 0.9, c
        if case.op != "pooled":
            assert c["executed_tflop"] >= c["useful_tflop"], c
            assert c["executed_tflop_fwd"] >= c["useful_tflop_fwd"], c
    for r in data["rows"]:
        if r["op"] != "pooled_qkv" and r["kernel"] != "_bwd_delta_kernel":
            assert r["dots"] and all(d["trips"] >= 1 and d["mma_version"] for d in r["dots"]), r


def test_model_counts_waves_by_hand() -> None:
    """The performance model on figures worked out by hand for an H100/H200 SM (64K
    registers, 228 KiB of shared memory, 2048 threads) and the measured H200 rates (790
    TFLOP/s, 4.3 TB/s): programs per SM, launches rounded to whole waves, the model time."""
    from benchmarks.compile_gate import model_ms, programs_per_sm, wave_flops

    # 4 warps at 255 registers: 256 x 128 = 32768 registers a program, 2 per SM (shared
    # memory would allow 233472 // (51328 + 1024) = 4, threads 16)
    assert programs_per_sm(255, 51328, 4) == 2
    # 8 warps at 194 registers: 200 x 256 = 51200, one per SM
    assert programs_per_sm(194, 55296, 8) == 1
    # 4 warps at 80 registers and 100 KiB of shared memory: registers allow 6, memory 2
    assert programs_per_sm(80, 102400, 4) == 2
    # tiny programs: the 32-program limit
    assert programs_per_sm(16, 0, 1) == 32
    # 56 programs at 2 per SM: one wave of 264 slots, priced as 264 programs
    assert wave_flops(56, 2, 1e9) == 264e9
    # 560 programs: 2.12 waves, priced as 3 x 264
    assert wave_flops(560, 2, 1e9) == 792e9
    assert wave_flops(528, 2, 1e9) == 528e9
    # 1.58 TFLOP at 790 TFLOP/s is 2 ms; 4.3 GB at 4.3 TB/s is 1 ms
    assert abs(model_ms(1.58e12, 4.3e9) - 3.0) < 1e-9


def test_ci_subset_meets_the_speed_targets(ci_gate) -> None:
    """No selectable sm_90 variant duplicates warps, uses mma.sync or draws C7515, and the
    CI JSON lists every selectable config (not only the pinned ones); rel-pos at MAT stage 1
    executes <= 1.55x the useful tensor-core work (<= 1.05x forward) with <= 0.5 GB of glue,
    <= 0.2 GB at video stage 1; the bottleneck op <= 1.6x; the gate exits 0."""
    from benchmarks.compile_gate import Row

    proc, data = ci_gate
    for r in data["rows"]:
        if r["selectable"] and r["arch"] == 90:
            assert r["warp_duplication"] == 1.0, (r["kernel"], r["shape"], r["dots"])
            assert not Row(**r).speed_problems(), r
    # autotuned kernels: a row per config of the short list at every CI shape
    tuned = {(r["op"], r["kernel"], r["shape"]) for r in data["rows"] if not r["pinned"]}
    assert ("relpos_attention", "_fwd_kernel", "relpos/mat_s1") in tuned
    assert ("bottleneck_attention", "_bwd_kernel", "bottleneck/mmt_audio") in tuned
    cases = {c["case"]: c for c in data["cases"]}
    mat, video = cases["relpos/mat_s1"], cases["relpos/video_s1"]
    assert mat["executed_tflop"] / mat["useful_tflop"] <= 1.55, mat
    assert mat["executed_tflop_fwd"] / mat["useful_tflop_fwd"] <= 1.05, mat
    assert mat["glue_bytes"] <= 0.5e9 and video["glue_bytes"] <= 0.2e9, (mat, video)
    bn = cases["bottleneck/mmt_audio"]
    assert bn["executed_tflop"] / bn["useful_tflop"] <= 1.6, bn
    assert not data["case_failures"] and proc.returncode == 0, proc.stdout[-3000:]


def test_attention_kernels_use_tensor_cores(ci_gate) -> None:
    _, data = ci_gate
    for r in data["rows"]:
        if r["op"] != "pooled_qkv" and r["kernel"] != "_bwd_delta_kernel":
            assert r["needs_tensor_core"] and r["tc_instructions"] > 0, r


def test_gate_sees_a_spill() -> None:
    """A config that does spill (rel-pos dK/dV, 128 x 128 tiles, 8 warps, at MAT stage 1: two
    128 x 128 fp32 accumulators) is reported with its spill bytes and fails the gate when
    selectable."""
    code = """
import torch
from benchmarks import compile_gate as g
case = g._cases()["relpos/mat_s1"]
launch = next(x for x in g.launches_for(case, torch.bfloat16) if x.kernel == "_bwd_dkdv_kernel")
cfg = {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 128}, "num_warps": 8, "num_stages": 2}
res = g._compile_one(launch, cfg, 90)
row = g.Row(kernel="_bwd_dkdv_kernel", op="relpos_attention", dtype="bfloat16", config="", shape="",
            arch=90, selectable=True, shared_limit_bytes=g.SHARED_LIMIT[90], **res)
print(res["spill_bytes"], res["registers"], "|".join(row.failures()))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spill, regs, failures = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(spill) > 0 and int(regs) == 255
    assert "spills" in failures


CHAINED_DOTS = """
import triton
import triton.language as tl


@triton.jit
def chained_dots(Q, K, V, O, N, REPS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + rows[:, None] * BLOCK_D + d[None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for _r in range(REPS):
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            kt = tl.load(K + cols[None, :] * BLOCK_D + d[:, None])
            s = tl.dot(q, kt)
            v = tl.load(V + cols[:, None] * BLOCK_D + d[None, :])
            acc += tl.dot(s.to(tl.bfloat16), v)
    tl.store(O + rows[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def split_dots(A, B, C, N_BLOCKS, PER_SPLIT, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    b = tl.load(B + r[:, None] * BLOCK + r[None, :])
    lo = tl.program_id(1) * PER_SPLIT
    hi = tl.minimum(lo + PER_SPLIT, N_BLOCKS)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for blk in range(lo, hi):
        a = tl.load(A + blk * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + tl.program_id(0) * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def persistent_dots(A, B, C, N_TILES, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    b = tl.load(B + r[:, None] * BLOCK + r[None, :])
    for tile in range(tl.program_id(0), N_TILES, tl.num_programs(0)):
        a = tl.load(A + tile * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :])
        tl.store(C + tile * BLOCK * BLOCK + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))
"""


def test_gate_reads_dots_trips_and_duplicated_warps(tmp_path) -> None:
    """A kernel written here (not the project's): S = Q K^T feeding S V, in a loop of
    ceil(1000 / 64) = 16 key tiles inside a loop of 3. Compiled for sm_90, the gate reads two
    64 x 64 x 64 wgmma dots run 3 x 16 = 48 times per program; with 8 warps on 64 rows Triton
    stacks the warps along M ([8, 1]): every row computed twice, warp_duplication 2, and the
    gate fails the variant; with 4 warps, or 8 warps on 128 rows, there is none. A persistent
    loop over 10 tiles on 4 programs (tile = pid, pid + 4, ...) runs 3, 3, 2, 2 times: the
    gate counts their mean, 2.5, range [2, 3]. A split loop (as the rel-pos dK/dV kernel's)
    of 785 blocks in runs of 57 on program-id axis 1 of a (3, 14) grid runs 57 times on 13
    splits and 44 on the last: the exact mean over the programs is 785 / 14 = 56.07 (the
    mean of the first and last program, 50.5, would under-count it by 10%)."""
    (tmp_path / "chained.py").write_text(CHAINED_DOTS)
    code = """
import json, torch
from benchmarks import compile_gate as g
from chained import chained_dots, persistent_dots, split_dots
m = dict(device="meta", dtype=torch.bfloat16)
args = {"Q": torch.empty(1, **m), "K": torch.empty(1, **m), "V": torch.empty(1, **m),
        "O": torch.empty(1, device="meta", dtype=torch.float32), "N": 1000, "REPS": 3}
launch = g.Launch("test", "chained_dots", args, [], [], chained_dots)
out = []
for warps, bm in ((8, 64), (4, 64), (8, 128)):
    cfg = {"kwargs": {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_D": 64}, "num_warps": warps,
           "num_stages": 2}
    res = g._compile_one(launch, cfg, 90)
    row = g.Row(kernel="chained_dots", op="test", dtype="bfloat16", config="", shape="",
                arch=90, selectable=True, shared_limit_bytes=g.SHARED_LIMIT[90], **res)
    out.append([res["dots"], res["warp_duplication"], row.failures()])
args = {"A": torch.empty(1, **m), "B": torch.empty(1, **m),
        "C": torch.empty(1, device="meta", dtype=torch.float32), "N_TILES": 10}
launch = g.Launch("test", "persistent_dots", args, [], [], persistent_dots, grid=(4,))
cfg = {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 2}
out.append(g._compile_one(launch, cfg, 90)["dots"])
args = {"A": torch.empty(1, **m), "B": torch.empty(1, **m),
        "C": torch.empty(1, device="meta", dtype=torch.float32), "N_BLOCKS": 785, "PER_SPLIT": 57}
launch = g.Launch("test", "split_dots", args, [], [], split_dots, grid=(3, 14))
out.append(g._compile_one(launch, cfg, 90)["dots"])
print(json.dumps(out))
"""
    env = dict(_env())
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (dup8, d8, f8), (dup4, d4, f4), (dup128, d128, f128), persistent, split = json.loads(
        proc.stdout.splitlines()[-1]
    )
    for dots, bm in ((dup8, 64), (dup4, 64), (dup128, 128)):
        assert [(d["m"], d["n"], d["k"], d["trips"], d["mma_version"]) for d in dots] == [
            (bm, 64, 64, 48, 3),
            (bm, 64, 64, 48, 3),
        ], dots
    assert dup8[0]["warps_per_cta"] == [8, 1] and dup8[0]["warp_duplication"] == 2.0
    assert dup8[1]["warp_duplication"] == 1.0  # the second dot splits N over the warpgroups
    assert d8 == 2.0 and any("warp_duplication 2" in f for f in f8), f8
    assert d4 == d128 == 1.0 and not f4 and not f128, (f4, f128)
    assert [(d["m"], d["n"], d["k"], d["trips"], d["trips_range"]) for d in persistent] == [
        (64, 64, 64, 2.5, [2, 3])
    ], persistent
    assert [(d["m"], d["n"], d["k"], d["trips_range"]) for d in split] == [(64, 64, 64, [44, 57])]
    assert split[0]["trips"] == pytest.approx(785 / 14), split


def test_trips_are_the_exact_mean_over_the_grid() -> None:
    """dots_from_ttgir on a TTGIR-like text: a loop whose bounds depend on program-id axis 1
    (a split of 785 blocks in runs of 57, 14 splits: 13 x 57 + 44) inside a loop over axis 0
    (pid_x + 1 trips on a grid of 3): trips is the mean over all 3 x 14 programs,
    (1 + 2 + 3) / 3 x 785 / 14, not the mean of the first and last program; a bound that
    does not depend on the program id keeps its plain count."""
    from benchmarks.compile_gate import dots_from_ttgir

    ttgir = """
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
tt.func public @k(%N_BLOCKS: i32, %PER: i32, %N: i32) {
  %c0_i32 = arith.constant 0 : i32
  %c1_i32 = arith.constant 1 : i32
  %c64_i32 = arith.constant 64 : i32
  %0 = tt.get_program_id y : i32
  %1 = arith.muli %0, %PER : i32
  %2 = arith.addi %1, %PER : i32
  %3 = arith.minsi %2, %N_BLOCKS : i32
  %4 = tt.get_program_id x : i32
  %5 = arith.addi %4, %c1_i32 : i32
  %6 = scf.for %i = %c0_i32 to %5 step %c1_i32 iter_args(%acc = %z) -> (tensor<64x64xf32, #mma>)  : i32 {
    %7 = scf.for %j = %1 to %3 step %c1_i32 iter_args(%a2 = %acc) -> (tensor<64x64xf32, #mma>)  : i32 {
      %8 = ttng.warp_group_dot %a, %b, %a2 : !ttg.memdesc<64x64xbf16, #shared, #smem> * !ttg.memdesc<64x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma>
      scf.yield %8 : tensor<64x64xf32, #mma>
    }
    scf.yield %7 : tensor<64x64xf32, #mma>
  }
  %9 = scf.for %k = %c0_i32 to %N step %c64_i32 iter_args(%a3 = %6) -> (tensor<64x64xf32, #mma>)  : i32 {
    %10 = ttng.warp_group_dot %a, %b, %a3 : !ttg.memdesc<64x64xbf16, #shared, #smem> * !ttg.memdesc<64x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma>
    scf.yield %10 : tensor<64x64xf32, #mma>
  }
  tt.return
}
"""
    args = {"N_BLOCKS": 785, "PER": 57, "N": 1000}
    nested, plain = dots_from_ttgir(ttgir, args, (3, 14))
    assert (nested["m"], nested["n"], nested["k"], nested["mma_version"]) == (64, 64, 64, 3)
    assert nested["trips"] == pytest.approx(2 * 785 / 14)
    assert nested["trips_range"] == [44, 3 * 57]
    assert plain["trips"] == 16 and "trips_range" not in plain
    # without a grid the pid-dependent bounds cannot be evaluated
    assert dots_from_ttgir(ttgir, args)[0]["trips"] == -1


def test_speed_rules_of_a_row() -> None:
    """What fails a selectable sm_90 variant for speed: a dot on mma.sync (HMMA) and ptxas
    C7515, pinned or not; sm_80 rows are reported, not gated."""
    from benchmarks.compile_gate import Row

    dot = dict(m=64, n=64, k=64, dtype="bf16", mma_version=2, warps_per_cta=[4, 1],
               instr_shape=[16, 8], warp_duplication=1.0, trips=4)  # fmt: skip
    common = dict(kernel="k", op="o", dtype="bfloat16", config="", shape="", registers=100,
                  spill_bytes=0, shared_bytes=0, shared_limit_bytes=1, tensor_core=True,
                  tc_instructions=8, selectable=True)  # fmt: skip
    hmma = Row(arch=90, dots=[dot], hmma_instructions=8, **common)
    assert any("HMMA" in p for p in hmma.failures()) and not hmma.compile_problems()
    assert not Row(arch=80, dots=[dot], hmma_instructions=8, **common).failures()
    why = "Potential Performance Loss: wgmma.mma_async instructions are serialized"
    wg = dict(dot, mma_version=3, instr_shape=[16, 64, 16])
    serial = dict(dots=[wg], wgmma_serialized=True, wgmma_serialized_reason=why, arch=90)
    assert Row(pinned=True, **serial, **common).failures() == [
        f"ptxas C7515 (wgmma serialised): {why}"
    ]
    assert Row(pinned=False, **serial, **common).failures() == [
        f"ptxas C7515 (wgmma serialised): {why}"
    ]
    assert not Row(pinned=False, selectable=False, **serial, **{
        k: v for k, v in common.items() if k != "selectable"}).failures()  # fmt: skip


def test_refuses_to_run_under_the_interpreter() -> None:
    env = dict(_env(), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_gate", "--subset", "ci"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


def test_pinned_mode_leaves_one_config_per_kernel() -> None:
    code = """
from triton.runtime.autotuner import Autotuner
import mmt_fast.kernels.relpos_attention as rp, mmt_fast.kernels.bottleneck_attention as bn, mmt_fast.kernels.pooled_qkv as pq
from mmt_fast.kernels import tuning
tuners = [v for m in (rp, bn, pq) for v in vars(m).values() if isinstance(v, Autotuner)]
# fallbacks (configs for a smaller shared memory, used only when nothing else fits) aside
print(len(tuners), sorted({len([c for c in t.configs if id(c) not in tuning._FALLBACK])
                           for t in tuners}))
for t in tuners:
    pin = tuning.pinned_config(t.fn.__name__, t.fn.__module__.split(".")[-1])
    assert (t.configs[0].kwargs, t.configs[0].num_warps) == (pin.kwargs, pin.num_warps)
"""
    env = dict(_env(), MMT_FAST_KERNEL_CONFIGS="pinned")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["5", "[1]"]
    proc = _python(
        code.replace("assert (t.configs[0]", "assert len(t.configs) > 1 or (t.configs[0]")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "5" and proc.stdout.split()[1] != "[1]"


def test_early_prune_drops_configs_over_the_shared_memory_limit(monkeypatch) -> None:
    import triton

    from mmt_fast.kernels import tuning

    configs = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    ]
    # 2 stages x 192 rows x 128 x 2 B x 2 = 196608 B for the second; 131072 B for the first
    monkeypatch.setattr(tuning, "_shared_limit", lambda: 166912)  # A100
    assert tuning.early_prune(configs, {"BLOCK_D": 128}) == configs[:1]
    monkeypatch.setattr(tuning, "_shared_limit", lambda: 232448)  # H100/H200
    assert tuning.early_prune(configs, {"BLOCK_D": 128}) == configs
    monkeypatch.setattr(tuning, "_shared_limit", lambda: 1000)  # nothing fits: the smallest
    assert tuning.early_prune(configs, {"BLOCK_D": 128}) == configs[:1]


def test_committed_full_gate_is_clean_and_current() -> None:
    """benchmarks/results/compile_gate.json (``--subset full``) has no selectable sm_90 variant
    that fails the gate (does not compile, spills, overflows shared memory, duplicates warps,
    uses mma.sync or draws C7515), no case missing its target, prices every model case, and
    its pinned rows are the configs the kernels pin today (not a stale run)."""
    code = """
import json
from pathlib import Path
import mmt_fast.kernels.relpos_attention, mmt_fast.kernels.bottleneck_attention, mmt_fast.kernels.pooled_qkv
from benchmarks import compile_gate as g
from mmt_fast.kernels import tuning
data = json.loads(Path("benchmarks/results/compile_gate.json").read_text())
assert data["subset"] == "full", data["subset"]
bad = [(r["kernel"], r["shape"], r["arch"], g.Row(**r).failures()) for r in data["rows"]
       if g.Row(**r).failures()]
assert not bad, bad[:3]
assert not data["case_failures"], data["case_failures"]
assert [c["case"] for c in data["cases"]] == list(g.MODEL_CASES), data["cases"]
import torch
# the pins of today's launchers, per (case, dtype, kernel, specialisation): a shape rule
# (tuning.pin_index) can pin another entry at another shape
# and arch (tuning.target_arch: sm_80 has lists of its own)
want = {}
for r in data["rows"]:
    key = (r["shape"], r["dtype"], r["arch"])
    if key not in want:
        launches = g.launches_for(g._cases()[r["shape"]], getattr(torch, r["dtype"]), r["arch"])
        want[key] = {(l.kernel, g._spec(l)): g._config_str(c)
                     for l in launches for c in l.configs if g._is_pinned(l, c, r["arch"])}
key = lambda r: (r["shape"], r["dtype"], r["arch"])
stale = [(r["kernel"], key(r), r["config"], want[key(r)].get((r["kernel"], r["spec"])))
         for r in data["rows"] if r["pinned"]
         and r["config"] != want[key(r)].get((r["kernel"], r["spec"]))]
assert not stale, stale[:3]
assert all(sum(r["pinned"] for r in data["rows"] if key(r) == k) >= len(want[k]) for k in want)
print(len(data["rows"]))
"""
    proc = _python(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 100


def test_fallback_configs_run_only_when_nothing_else_fits(monkeypatch) -> None:
    import triton

    from mmt_fast.kernels import tuning

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    monkeypatch.setattr(tuning, "_FALLBACK", {id(small)})
    monkeypatch.setattr(tuning, "_shared_limit", lambda: 232448)  # H100/H200: the primary
    assert tuning.early_prune([big, small], {"BLOCK_D": 128}) == [big]
    monkeypatch.setattr(tuning, "_shared_limit", lambda: 166912)  # A100: the fallback
    assert tuning.early_prune([big, small], {"BLOCK_D": 128}) == [small]
    # and the compile gate does not count a fallback as selectable on an H100/H200
    assert tuning.selectable([big, small]) == [big]


# ----------------------------------------------------------------------------- glue traffic


def test_glue_counter_prices_each_aten_op_by_hand() -> None:
    """benchmarks.glue.ByteCounter on meta tensors, every figure worked out by hand: a copy
    reads and writes its tensor, a view and an empty allocation move nothing, zeros only
    writes, an in-place add reads both operands and writes the target, an expanded operand
    is read once, and a bmm's FLOPs are 2 B M N K."""
    import torch

    from benchmarks.glue import ByteCounter

    m = dict(device="meta")
    a = torch.empty(4, 8, 16, dtype=torch.bfloat16, **m)  # 1 KiB
    b = torch.empty(4, 16, 32, dtype=torch.float32, **m)  # 8 KiB
    counter = ByteCounter()
    with counter:
        counter.phase = "fwd"
        v = a.view(32, 16)  # view: free
        torch.empty(1000, **m)  # nothing written
        t = a.transpose(1, 2).contiguous()  # clone: 1 KiB read + 1 KiB written
        torch.cat([a, t.transpose(1, 2)], dim=0)  # 2 KiB read, 2 KiB written
        counter.phase = "bwd"
        z = torch.zeros(4, 16, 32, **m)  # 8 KiB written
        z.add_(b)  # 16 KiB read, 8 KiB written
        z.copy_(b)  # 8 KiB read, 8 KiB written (the target is only overwritten)
        row = torch.empty(1, 1, 32, **m)
        z.mul_(row.expand(4, 16, 32))  # z 8 KiB + one row 128 B read, 8 KiB written
        torch.bmm(a.float(), b)  # _to_copy 1 KiB + 2 KiB; bmm reads 2 + 8 KiB, writes 4 KiB
    del v
    ops = {k: (o.read, o.written, o.flops) for k, o in counter.ops.items()}
    assert ops == {
        ("fwd", "clone"): (1024, 1024, 0),
        ("fwd", "cat"): (2048, 2048, 0),
        ("bwd", "zeros"): (0, 8192, 0),
        ("bwd", "add_.Tensor"): (16384, 8192, 0),
        ("bwd", "copy_"): (8192, 8192, 0),
        ("bwd", "mul_.Tensor"): (8192 + 128, 8192, 0),
        ("bwd", "_to_copy"): (1024, 2048, 0),
        ("bwd", "bmm"): (2048 + 8192, 4096, 2 * 4 * 8 * 16 * 32),
    }, ops
    # --by-line: attributed to the kernels' source lines; these ops come from this file
    assert {src for _, src in counter.lines} == {"(outside kernels/)"}
    assert sum(counter.lines.values()) == sum(r + w for r, w, _ in ops.values())


def test_each_arch_has_its_own_lists_and_pins() -> None:
    """tuning.target_arch picks the lists and pins: on sm_80 (A100) the configs that spill
    there are not selectable and the pins are the spill-free ones the gate checks; the
    bottleneck op is refused there (tuning.MIN_ARCH) and not compiled for it."""
    code = """
import torch
from benchmarks import compile_gate as g
from mmt_fast.kernels import relpos_attention as rp, tuning
fwd, dkdv = rp._fwd_kernel, rp._bwd_dkdv_kernel
assert len(tuning.selectable(fwd.configs, 90)) == 4
assert [c.kwargs["BLOCK_N"] for c in tuning.selectable(fwd.configs, 80)] == [32, 32]
assert [c.kwargs["BLOCK_M"] for c in tuning.selectable(dkdv.configs, 80)] == [16]
# 192 spatial queries (the CLS row peeled off) pad to 256 in blocks of 128: 64-row blocks
assert rp._dq_blocks(8193, True) == (128, 32, 8, 2) and rp._dq_blocks(193, True) == (64, 32, 4, 1)
assert rp._dq_blocks(193, False) == (128, 32, 8, 2)
with tuning.target(80):
    assert rp._dq_blocks(8193, True) == (128, 16, 8, 1)
    assert rp._dq_blocks(193, True) == (64, 16, 4, 1)
    assert [c.kwargs["BLOCK_M"] for c in tuning.early_prune(dkdv.configs, {})] == [16]
assert tuning.target_arch() == 90
assert g.launches_for(g._cases()["bottleneck/mmt_audio"], torch.bfloat16, 80) == []
assert g.launches_for(g._cases()["bottleneck/mmt_audio"], torch.bfloat16, 90)
print("ok")
"""
    proc = _python(code, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "ok", proc.stderr[-3000:]
