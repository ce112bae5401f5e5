"""benchmarks/kernels/ (``python -m benchmarks.kernels``) under pytest.

* ``test_kernel_benchmark`` (marked ``benchmark_case``; skipped unless ``pytest --benchmark``):
  every case x path x {fwd, fwd_bwd} through pytest-benchmark's ``benchmark`` fixture; the
  real shapes in bf16 on CUDA, the same case names at tiny shapes in fp32 on the CPU (the
  kernels through Triton's interpreter), where only the logic is exercised: those timings
  are interpreter timings (their benchmark group says so) and carry no TFLOP/s.
* The always-on tests check that every comparison path computes the op (output and every
  gradient, against float64) at tiny shapes, that the check catches a wrong path and keeps
  it from being timed, what the CPU run prints, and that the script exits cleanly without
  CUDA.
"""

import functools
import sys
import types
import warnings

import pytest
import torch

from benchmarks import kernels as kb
from benchmarks.kernels import baselines

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32  # bf16 is broken in the interpreter

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]


@functools.cache
def _cases() -> dict[str, kb.Case]:
    return kb.real_cases() if CUDA else kb.small_cases()


BENCH_PARAMS = [
    pytest.param(name, path, id=f"{name}-{path}")
    for name in kb.CASE_NAMES
    for path in kb.PATHS[name.split("/")[0]]
]


@pytest.mark.benchmark_case
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize(("case_name", "path"), BENCH_PARAMS)
def test_kernel_benchmark(benchmark, case_name: str, path: str, mode: str) -> None:
    case = _cases()[case_name]
    why = kb.path_unavailable(path, DEVICE)
    if why:
        pytest.skip(why)
    try:
        inp = kb.make_inputs(case, DEVICE, DTYPE)
    except torch.OutOfMemoryError:
        pytest.skip("OOM allocating the inputs")
    run = kb.build_path(path, inp, compile_flex=CUDA)
    if mode == "fwd_bwd":
        why = kb.forward_only(path, inp)
        if why:
            pytest.skip(why)
        fn = kb.fwd_bwd(run, inp)
    else:
        fn = run

    def timed() -> None:
        kb.zero_grads(inp)
        fn()
        if CUDA:
            torch.cuda.synchronize()

    try:
        timed()  # compile / autotune outside the timed rounds
    except torch.OutOfMemoryError:
        kb.zero_grads(inp)
        del inp, run, fn
        torch.cuda.empty_cache()
        pytest.skip(f"OOM: one (B, H, Nq, Nk) tensor is {case.nm_bytes(2) / 1e9:.2f} GB")
    flops = case.flops_fwd() if mode == "fwd" else case.flops_fwd_bwd()
    benchmark.extra_info.update(
        {k: str(v) for k, v in case.shapes().items()}, device=str(DEVICE), flops=flops
    )
    if not CUDA:
        benchmark.group = "CPU: Triton interpreter timings, not GPU speed"
        benchmark.extra_info["note"] = kb.INTERPRETER_NOTE
    benchmark.pedantic(timed, rounds=5 if CUDA else 1, iterations=1, warmup_rounds=int(CUDA))
    if CUDA and benchmark.stats is not None:
        benchmark.extra_info["tflops_at_median"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("case_name", kb.SMALL_SUBSET)
def test_comparison_paths_match_fp64(case_name: str) -> None:
    """Every path of the benchmark (fused, reference, SDPA with the bias, FlexAttention with
    its score_mod, xformers where importable) agrees with the float64 reference."""
    # Tiny shapes on either device: eager FlexAttention materialises the scores.
    cases = kb.small_cases(tokens=24)
    rows = kb.run_checks(DEVICE, DTYPE, {case_name: cases[case_name]}, compile_flex=False)
    ran = [r for r in rows if r["status"] != "skipped"]
    assert {"fused", "reference"} <= {r["path"] for r in ran}
    bad = [r for r in ran if r["status"] != "ok"]
    assert not bad, bad


def test_check_catches_a_wrong_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bias off by a factor must fail the check (the tolerances are not vacuous)."""
    right = baselines.materialised_bias
    monkeypatch.setattr(baselines, "materialised_bias", lambda *a: 1.5 * right(*a))
    case = kb.check_cases(DEVICE)["relpos/mat_s1"]
    rows = kb.run_checks(DEVICE, DTYPE, {"relpos/mat_s1": case}, False, paths=["sdpa"])
    assert [r["status"] for r in rows] == ["FAIL"]


def test_a_path_that_fails_the_check_is_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    right = baselines.materialised_bias
    monkeypatch.setattr(baselines, "materialised_bias", lambda *a: 1.5 * right(*a))
    name = "relpos/mat_s1"
    cases = {name: kb.small_cases(tokens=8)[name]}
    res = kb.run_benchmarks(
        DEVICE, DTYPE, cases, None, False, 60.0, reps=1, paths=["reference", "sdpa"],
        gate=kb.small_cases(tokens=8),
    )  # fmt: skip
    paths = res["cases"][name]["paths"]
    assert paths["reference"]["status"] == "ok" and "fwd_bwd_ms" in paths["reference"]
    assert paths["sdpa"]["status"] == "not timed"
    assert "failed the correctness check" in paths["sdpa"]["why"]
    assert "fwd_ms" not in paths["sdpa"]


def test_gpu_check_covers_a_fastest_key_axis_of_64() -> None:
    """The CUDA check of rel-pos MAT stage 1 has a key block's worth of keys on the fastest
    axis (the regime where the kernels' key decoding and d_relq sums change)."""
    case = kb.check_cases(torch.device("cuda"))["relpos/mat_s1"]
    assert case.k_grid[-1] >= 64 and case.q_grid[-1] == 2 * case.k_grid[-1]


@pytest.mark.skipif(CUDA, reason="checks the CPU (interpreter) output")
def test_cpu_run_says_its_timings_are_interpreter_timings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert kb.main(["--device", "cpu", "--small", "--cases", "relpos/mat_s1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("NOTE: CPU: the Triton kernels run in Triton's interpreter")
    assert "say nothing about GPU speed" in lines[0]
    assert sum("FlexAttention runs eagerly" in line for line in lines) == 1
    assert not [w for w in seen if "flex_attention" in str(w.message)]
    assert "TF/s" not in out and "_met" not in out and "of floor" not in out
    assert any(" flex " in line and "fwd " in line for line in lines)  # it was timed


def test_compile_report_runs_the_compile_gate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--compile-report ARGS`` hands ARGS to ``benchmarks.compile_gate.main`` and returns
    its exit status; without that module it says so and exits 2."""
    import benchmarks

    # import fails: no module, and no attribute on the package left by an earlier import
    # (tests/test_readme.py imports the real one through benchmarks.report)
    monkeypatch.setitem(sys.modules, "benchmarks.compile_gate", None)
    monkeypatch.delattr(benchmarks, "compile_gate", raising=False)
    assert kb.main(["--compile-report", "--json", "x.json"]) == 2
    assert "benchmarks/compile_gate.py" in capsys.readouterr().err
    got = []
    gate = types.ModuleType("benchmarks.compile_gate")
    gate.main = lambda argv: got.append(argv) or 3
    monkeypatch.setitem(sys.modules, "benchmarks.compile_gate", gate)
    monkeypatch.setattr(benchmarks, "compile_gate", gate, raising=False)
    assert kb.main(["--arch", "sm_90", "--compile-report", "--json", "x.json"]) == 3
    assert got == [["--arch", "sm_90", "--json", "x.json"]]


def test_small_cases_mirror_real_cases() -> None:
    real, small = kb.real_cases(), kb.small_cases()
    assert list(real) == list(small) == list(kb.CASE_NAMES)
    s1 = real["relpos/mat_s1"]
    assert (s1.batch, s1.heads, s1.head_dim) == (64, 1, 96)
    assert (s1.q_grid, s1.k_grid, s1.has_cls) == ((32, 256), (16, 128), True)
    assert s1.nq_nk == (8193, 2049)
    for name, c in small.items():
        assert (c.op, c.has_cls, len(c.q_grid)) == (real[name].op, real[name].has_cls, len(real[name].q_grid))  # fmt: skip


@pytest.mark.skipif(CUDA, reason="checks the no-CUDA exit")
def test_no_cuda_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert kb.main([]) == 0
    assert "no CUDA: nothing to time" in capsys.readouterr().out


def test_compile_estimate_sums_the_pinned_sm90_rows() -> None:
    row = dict(kernel="k", config="c", shape="s", selectable=True)
    gate = {
        "rows": [
            {**row, "dtype": "bfloat16", "arch": "sm_90", "pinned": True, "compile_s": 2.0},
            {**row, "dtype": "bfloat16", "arch": "sm_90", "pinned": True, "compile_s": 3.5},
            {**row, "dtype": "bfloat16", "arch": "sm_90", "pinned": False, "compile_s": 100.0},
            {**row, "dtype": "float16", "arch": "sm_80", "pinned": True, "compile_s": 50.0},
            {**row, "dtype": "float32", "arch": "sm_90", "pinned": True, "compile_s": 1.0},
        ]
    }
    lines = kb.compile_time_estimate(gate)
    assert "pinned" in lines[0]
    assert lines[1].split() == ["bfloat16", "2", "variants", "5.5", "s"]
    assert lines[2].split() == ["float32", "1", "variants", "1.0", "s"]
    assert lines[3].split() == ["total", "3", "variants", "6.5", "s"]
    for r in gate["rows"]:
        del r["pinned"]
    assert "no pins" in kb.compile_time_estimate(gate)[0]
    assert kb.compile_time_estimate(gate)[-1].split()[:2] == ["total", "4"]


def test_merge_adds_a_bounded_run_and_redoes_the_targets(tmp_path) -> None:
    """``--merge INTO FROM`` (the GPU script's FlexAttention stage): FROM's timed paths and
    check rows join INTO's case, and the speed-up against FlexAttention is evaluated."""
    import json

    case = {"nm_bf16_gb": 1.0, "check": {"rows": [{"path": "fused", "status": "ok"}]}}
    into = {"cases": {"relpos/mat_s1": {**case, "paths": {"fused": {"fwd_bwd_ms": 2.0}}}}}
    extra = {
        "cases": {
            "relpos/mat_s1": {
                "paths": {"flex": {"fwd_bwd_ms": 5.0}},
                "check": {"rows": [{"path": "flex", "status": "ok"}]},
            },
            "bottleneck/mmt_audio": {"paths": {"flex": {"fwd_bwd_ms": 1.0}}},
        }
    }
    a, b = tmp_path / "kernels.json", tmp_path / "flex.json"
    a.write_text(json.dumps(into))
    b.write_text(json.dumps(extra))
    assert kb.main(["--merge", str(a), str(b)]) == 0
    got = json.loads(a.read_text())
    entry = got["cases"]["relpos/mat_s1"]
    assert entry["paths"] == {"fused": {"fwd_bwd_ms": 2.0}, "flex": {"fwd_bwd_ms": 5.0}}
    assert [r["path"] for r in entry["check"]["rows"]] == ["fused", "flex"]
    assert "bottleneck/mmt_audio" not in got["cases"]  # not in the main run: left out
    assert got["targets"]["fwd_bwd_speedup_vs_flex"] == 2.5
    assert got["targets"]["fwd_bwd_speedup_vs_flex_met"] is True
    assert kb.main(["--merge", str(a), str(tmp_path / "missing.json")]) == 2
