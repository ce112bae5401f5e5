"""The step model (benchmarks/step_model.py): its FLOP counts against a count by module
hooks, the fused-chain byte model on a hand-checked chain, selective recomputation's
cost, the GPU timing script on the CPU, and the data benchmark's demand side reading it."""

from __future__ import annotations

import json

import torch
from torch import nn

from benchmarks import step_model as sm


def test_traced_matmul_flops_equal_a_count_by_hooks():
    """AST-tiny, eager attention, fp32: the forward's matmul FLOPs (2 per multiply-add)
    equal linear layers + patch convolution (counted by hooks) + Q K^T and P V; the
    backward does twice the forward's (input and weight gradients), the patch
    convolution's input gradient aside (the input needs none)."""
    from mmt_fast import create_model

    model = create_model("AST-tiny", num_classes=sm.NUM_CLASSES)  # as trace_step builds it
    B = 2
    expected = {"fwd": 0}

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.Linear):
            expected["fwd"] += 2 * x.numel() // mod.in_features * mod.in_features * out.shape[-1]
        elif isinstance(mod, nn.Conv2d):
            expected["fwd"] += 2 * out.numel() * mod.weight[0].numel()

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(B, 1, 32, 64))
    cfg = model.cfg
    n = model.num_patches + 2
    d = cfg.embed_dim // cfg.num_heads
    expected["fwd"] += cfg.depth * 2 * (2 * B * cfg.num_heads * n * n * d)
    step = sm.trace_step("AST-tiny", B, {"x": (1, 32, 64)}, precision="fp32", kernels=False)
    got = {
        ph: sum(o.flops for o in step.ops if o.cat == "matmul" and o.phase == ph)
        for ph in ("fwd", "bwd")
    }
    assert got["fwd"] == expected["fwd"]
    conv = model.patch_embed
    patch_conv = 2 * B * model.num_patches * cfg.embed_dim * conv.weight[0].numel()
    assert got["bwd"] == 2 * expected["fwd"] - patch_conv
    assert step.params == sum(p.numel() for p in model.parameters())


def test_fused_chain_reads_inputs_once_and_writes_what_is_read_later():
    """x -> *2 -> +1 -> relu -> matmul: eager moves 3 x (read + write) of x's size; the
    fused chain reads x once and writes only relu's output, which the matmul reads."""
    n = 64
    x, w = torch.randn(n, n), torch.randn(n, n)
    counter = sm.StepCounter()
    with counter:
        y = ((x * 2) + 1).relu()
        _ = y @ w
    step = sm.StepTrace(counter.trace, 0)
    size = n * n * 4
    eager = sm.price(step, "H200", {}, fused=False)
    fused = sm.price(step, "H200", {}, fused=True)
    assert eager["elementwise"]["bytes"] == 6 * size and eager["elementwise"]["ops"] == 3
    assert fused["elementwise"]["bytes"] == 2 * size and fused["elementwise"]["ops"] == 1
    assert fused["matmul"] == eager["matmul"]
    assert eager["matmul"]["flops"] == 2 * n**3


def test_selective_adds_bytes_not_matmul_flops():
    shapes = {"x": (1, 32, 64)}
    none = sm.trace_step("MAT-tiny", 4, shapes)
    sel = sm.trace_step("MAT-tiny", 4, shapes, "selective")
    t0, t1 = sm.totals(none), sm.totals(sel)
    assert t1["matmul_flops"] == t0["matmul_flops"] > 0
    assert t1["bytes"] > t0["bytes"]
    # the recomputed Q/K/V pooling appears once more per block, the rel-pos op does not
    count = {
        k: sum(o.name == f"{k}_fwd" for o in s.ops)
        for k, s in (("pooled_qkv", sel), ("relpos_attention", sel))
    }
    blocks = sum(o.name == "pooled_qkv_fwd" for o in none.ops)
    assert count == {"pooled_qkv": 2 * blocks, "relpos_attention": blocks}
    s = sm.summarise(none, 4, sm._gate_cases())
    assert s["H200"]["step_ms"] < s["A100"]["step_ms"]
    assert abs(s["H200"]["clips_per_s"] - 4e3 / s["H200"]["step_ms"]) < 1e-9


def test_gpu_timing_script_runs_on_the_cpu(tmp_path):
    from benchmarks import step_gpu

    argv = ["--device", "cpu", "--preset", "MAT-tiny", "--models", "MAT", "--variants",
            "eager", "--steps", "1", "--out", str(tmp_path)]  # fmt: skip
    assert step_gpu.main(argv) == 0
    (row,) = json.loads((tmp_path / "step_gpu.json").read_text())["rows"]
    assert row["variant"] == "eager" and row["step_ms"] > 0
    assert "matmul" in row["device_ms_by_category"]


def test_data_benchmark_demand_reads_the_step_model(tmp_path):
    from benchmarks import data as bench

    models = {
        "MMT": {"batch": 8, "variants": {"fused": {
            "H200": {"clips_per_s": 321.0, "step_ms": 8e3 / 321.0},
            "A100": {"clips_per_s": 123.0, "step_ms": 8e3 / 123.0},
        }}},
    }  # fmt: skip
    path = tmp_path / "step_model.json"
    path.write_text(json.dumps({"models": models}))
    rows = {(r["preset"], r["gpu"]): r for r in bench.demand_from_step_model(path)}
    assert rows[("MMT", "H200")]["clips_per_s"] == 321.0
    assert rows[("MMT", "A100")]["clips_per_s"] == 123.0
    assert "step model" in rows[("MMT", "H200")]["method"]
    # presets the model does not cover keep the MFU estimate
    assert "MFU" in rows[("AST", "H200")]["method"]
