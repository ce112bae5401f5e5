"""benchmarks/kernels/roofline.py: the per-case FLOP and byte formulas against independent
counts (torch.utils.flop_counter on the PyTorch references, 2 FLOPs per multiply-add; the
tensors the benchmark really allocates), and the ``--roofline`` table on the CPU."""

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import kernels as kb
from benchmarks.kernels import roofline

CPU = torch.device("cpu")
# Tiny shapes with each op's structure: 2-D and 3-D grids, with and without key pooling.
NAMES = (
    "relpos/mat_s1",
    "relpos/mat_s4",
    "relpos/video_s1",
    "relpos/video_s3",
    "bottleneck/mmt_audio",
    "pooled/mat_s1",
    "pooled/video_s1",
)


@functools.cache
def _small() -> dict[str, kb.Case]:
    return kb.small_cases()


def _counted(case: kb.Case, backward: bool) -> dict[str, int]:
    """flop_counter's FLOPs per aten op of the reference path in float64."""
    inp = kb.make_inputs(case, CPU, torch.float64)
    run = kb.build_path("reference", inp, compile_flex=False)
    with FlopCounterMode(display=False) as counter:
        outs = run()
        if backward:
            torch.autograd.backward(list(outs), inp.douts)
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


def _depthwise_taps_counted(case: kb.Case) -> int:
    """Forward + backward FLOPs of the pooling convs, counted by flop_counter on the same
    convolutions run as single-channel convs over B * H * D images (its count of a grouped
    conv's backward ignores the groups)."""
    n = case.batch * case.heads * case.head_dim
    conv = (None, None, F.conv2d, F.conv3d)[len(case.in_grid)]
    total = 0
    for stride in (case.stride_q, case.stride_kv, case.stride_kv):
        x = torch.randn(n, 1, *case.in_grid, dtype=torch.float64, requires_grad=True)
        w = torch.randn(1, 1, *case.kernel, dtype=torch.float64, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            conv(x, w, stride=stride, padding=[k // 2 for k in case.kernel]).sum().backward()
        total += counter.get_total_flops()
    return total


@pytest.mark.parametrize("name", NAMES)
def test_forward_flops_match_flop_counter(name: str) -> None:
    case = _small()[name]
    assert roofline.flops(case, "fwd") == sum(_counted(case, backward=False).values())


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_flops_match_flop_counter(name: str) -> None:
    case = _small()[name]
    counted = _counted(case, backward=True)
    if case.op != "pooled":
        # Every counted op is a batched matmul: Q K^T, P V, q . R and their gradients.
        assert set(counted) == {"aten.bmm"}
        assert roofline.flops(case, "fwd_bwd") == counted["aten.bmm"]
        return
    # The linear projection (addmm forward, two mm backward) plus the conv taps.
    linear = counted["aten.addmm"] + counted["aten.mm"]
    assert roofline.flops(case, "fwd_bwd") == linear + _depthwise_taps_counted(case)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bytes_are_the_inputs_and_outputs_once(name: str, dtype: torch.dtype) -> None:
    """fwd: every leaf read and every output written once; fwd_bwd: also the output
    gradients and the leaf gradients, counted from the tensors the benchmark allocates."""
    case = _small()[name]
    inp = kb.make_inputs(case, CPU, dtype)
    outs = kb.build_path("reference", inp, compile_flex=False)()
    size = torch.empty((), dtype=dtype).element_size()
    fwd = size * (sum(t.numel() for t in inp.leaves.values()) + sum(o.numel() for o in outs))
    bwd = size * (sum(d.numel() for d in inp.douts) + sum(t.numel() for t in inp.leaves.values()))
    assert roofline.min_bytes(case, "fwd", size) == fwd
    assert roofline.min_bytes(case, "fwd_bwd", size) == fwd + bwd


def test_floor_is_the_slower_of_compute_and_memory() -> None:
    case = kb.real_cases()["relpos/mat_s1"]
    r = roofline.floor_s(case, "fwd_bwd")
    assert r["compute_floor_ms"] == pytest.approx(r["flops"] / 790e12 * 1e3)
    assert r["memory_floor_ms"] == pytest.approx(r["bytes"] / 4.3e12 * 1e3)
    assert r["floor_ms"] == max(r["compute_floor_ms"], r["memory_floor_ms"])
    assert r["bound"] == "compute"  # Nq x Nk x D matmuls over O((Nq + Nk) D) bytes
    # MAT stage 1, batch 64: Q K^T and P V dominate, 3x for forward + backward.
    nq, nk = 1 + 32 * 256, 1 + 16 * 128
    bias = 2 * 64 * (nq - 1) * (16 + 128) * 96  # q . R_a for each query and key coordinate
    assert r["flops"] == 3 * (4 * 64 * nq * nk * 96 + bias)
    assert roofline.fraction_of_floor(case, "fwd_bwd", 2 * r["floor_ms"]) == pytest.approx(0.5)


def test_roofline_cli_prints_every_case_without_a_gpu(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert kb.main(["--roofline", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in kb.CASE_NAMES:
        assert sum(line.startswith(name + " ") for line in out.splitlines()) == 2, name
    assert "790 TFLOP/s" in out and "2 FLOPs per multiply-add" in out
    data = json.loads((tmp_path / "roofline.json").read_text())
    case = kb.real_cases()["pooled/video_s1"]
    got = data["cases"]["pooled/video_s1"]["fwd"]
    assert got["flops"] == roofline.flops(case, "fwd")
    assert math.isclose(got["floor_ms"], roofline.floor_s(case, "fwd")["floor_ms"])


def test_readme_roofline_rows_are_the_code_s() -> None:
    """Every roofline row docs/kernels.md shows is a row of ``--roofline``'s table."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text()
    rows = [line for line in doc.splitlines() if re.match(r"(relpos|bottleneck|pooled)/", line)]
    assert len(rows) >= 8
    table = roofline.table(kb.real_cases()).splitlines()
    assert [r for r in rows if r not in table] == []
