"""FLOP counting (attention included), parameter counts against the paper,
and the training-memory estimate."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmt_fast import create_model
from mmt_fast.profiling import count_flops, count_params, estimate_train_memory


def vit_flops(n_tokens, dim, depth, mlp_ratio=4):
    """Linear layers + Q K^T + P V of a ViT, in multiply-adds."""
    linear = n_tokens * (3 * dim * dim + dim * dim + 2 * mlp_ratio * dim * dim)
    attn = 2 * n_tokens * n_tokens * dim
    return depth * (linear + attn)


def test_ast_tiny_flops_match_the_formula():
    model = create_model("AST-tiny", num_classes=0)
    cfg = model.cfg
    n = cfg.patch_grid[0] * cfg.patch_grid[1] + 2
    flops = count_flops(model, (torch.randn(1, 1, *cfg.input_size),))
    expected = vit_flops(n, cfg.embed_dim, cfg.depth)
    patch = cfg.patch_grid[0] * cfg.patch_grid[1] * cfg.embed_dim * cfg.patch_size**2
    norms = (2 * cfg.depth + 1) * n * cfg.embed_dim * 5  # fvcore: 5 FLOPs per element with affine
    assert flops["linear"] + flops["matmul"] == expected
    assert flops["conv"] == patch
    assert flops["total"] == pytest.approx(expected + patch + norms, rel=0.01)


class SDPAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        q = self.lin(x).view(1, 2, -1, 4)
        return F.scaled_dot_product_attention(q, q, q)


def test_sdpa_is_counted():
    flops = count_flops(SDPAModel(), (torch.randn(1, 10, 8),))
    # linear: 10 * 8 * 8; attention: 2 * heads(2) * 10 * 10 * 4
    assert flops["total"] == 10 * 64 + 2 * 2 * 10 * 10 * 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, paper_params, paper_gflops",
    [("MAT", 52.0, 46.2), ("AST", 87.0, 131.0)],
)
def test_params_and_gflops_match_the_paper(name, paper_params, paper_gflops):
    """Within 2% of the paper's GFLOPs and 3% of its parameter count."""
    model = create_model(name, num_classes=309)
    flops = count_flops(model, (torch.randn(1, 1, 128, 1024),))
    assert flops["total"] / 1e9 == pytest.approx(paper_gflops, rel=0.02)
    assert count_params(model) / 1e6 == pytest.approx(paper_params, rel=0.03)
    assert flops["matmul"] > 0.2 * flops["total"]  # attention is in the count


def test_memory_estimate_accounts_for_weights_and_activations():
    shapes = {"x": (1, 32, 64)}

    def build():
        return create_model("MAT-tiny", num_classes=10)

    n = count_params(build())
    small = estimate_train_memory(build, shapes, 2, 10)
    big = estimate_train_memory(build, shapes, 8, 10)
    assert small.method == "estimated"
    # parameters + AdamW's two moments, fp32
    assert small.breakdown["parameters"] == 4 * n
    assert small.breakdown["optimizer_state"] >= 2 * 4 * n
    assert big.peak_bytes > small.peak_bytes
    # activations grow with the batch
    assert big.breakdown["activations"] > 3 * small.breakdown["activations"]
    # mixed precision: the same fp32 master weights, 16-bit activations
    bf16 = estimate_train_memory(build, shapes, 8, 10, precision="bf16")
    assert bf16.breakdown["parameters"] == 4 * n
    assert bf16.breakdown["activations"] < 0.9 * big.breakdown["activations"]


def test_benchmark_cli_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    """The main job end to end, on tiny stand-ins of AST and MAT so that it is
    quick (the full-size figures are checked above)."""
    from benchmarks import flops_memory as fm

    tiny = {"x": (1, 32, 64)}
    monkeypatch.setattr(
        fm,
        "MODELS",
        {
            "AST": ("AST-tiny", {}, tiny, 87.0, 131.0, "t"),
            "AST (SDPA)": ("AST-tiny", {"attn_impl": "sdpa"}, tiny, 87.0, 131.0, "t"),
            "MAT": ("MAT-tiny", {}, tiny, 52.0, 46.2, "t"),
            "MAT (kernels)": ("MAT-tiny", {}, tiny, 52.0, 46.2, "t"),
            "MAT (kernels, selective)": ("MAT-tiny", {}, tiny, 52.0, 46.2, "t"),
        },
    )
    monkeypatch.setattr(
        fm,
        "MEMORY",
        {"AST": (8, 2, 20.6), "AST (SDPA)": (8, 2, None), "MAT": (8, 2, 16.8),
         "MAT (kernels)": (8, 2, None), "MAT (kernels, selective)": (8, 2, None)},
    )  # fmt: skip
    monkeypatch.setattr(fm, "MODE_ROWS", ("MAT (kernels)", "MAT (kernels, selective)"))
    # shapes only: the fused ops' fake implementations run, not the interpreter
    # (whose bf16 refusal would otherwise stop the forced Triton path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out, png = tmp_path / "r.json", tmp_path / "m.png"
    argv = ["--json", str(out), "--plot", str(png), "--device", "cpu", "--precision", "all"]
    assert fm.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ESTIMATED" in printed and "GiB" in printed and " GB " not in printed.split("paper")[0]
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == [
        "AST", "AST (SDPA)", "MAT", "MAT (kernels)", "MAT (kernels, selective)"
    ]  # fmt: skip
    assert data["precision"] == "fp16" and set(data["memory"]) == {"fp16", "fp32", "bf16"}
    rows = {r["model"]: r for r in data["rows"]}
    row = rows["MAT"]
    assert row["memory_method"] == "estimated, fp16 autocast" and row["batch_size"] == 8
    assert row["per_sample_gb"] == pytest.approx(row["peak_memory_gb"] / 8)
    assert rows["MAT (kernels)"]["gflops"] == row["gflops"]
    assert rows["AST (SDPA)"]["gflops"] == rows["AST"]["gflops"]
    assert rows["MAT (kernels)"]["peak_memory_gb"] < row["peak_memory_gb"]
    mem = data["memory"]
    for name in rows:  # 16-bit activations take less than fp32 ones
        assert mem["bf16"][name][-1]["peak_memory_gb"] < mem["fp32"][name][-1]["peak_memory_gb"]
    assert set(data["per_sample_memory_ratios"]["fp16"]) == {
        "AST / MAT", "AST / MAT (kernels)", "AST (SDPA) / MAT (kernels)",
        "AST / MAT (kernels, selective)",
    }  # fmt: skip
    # selective recomputation: less memory, no extra matmul FLOPs, more bytes moved
    none, sel = data["checkpointing_modes"]
    assert (none["checkpointing"], sel["checkpointing"]) == ("none", "selective")
    assert sel["peak_memory_gb"] < none["peak_memory_gb"]
    assert sel["extra_matmul_tflop"] == 0 and sel["extra_gb"] > 0 and none["extra_gb"] == 0
    assert png.stat().st_size > 10_000
    # the README table is generated from this JSON
    from benchmarks.report import flops_memory_table

    data["_file"] = "r.json"
    table = flops_memory_table(data)
    assert "| MAT (kernels) |" in table and "fp16 autocast" in table and "bf16 autocast" in table
    assert "| MAT (kernels, selective) | selective |" in table


def test_flops_read_off_the_mmt_trace_equal_their_own_count():
    """The main job counts MAT and MViTv2 once, inside MMT: the per-module total
    plus the head must equal a trace of the encoder on its own. The FLOP
    readings (benchmarks.mmt_flops) count the fusion on its own: for the
    literal reading it must equal the AVBottleneck's share of the trace."""
    import dataclasses

    from benchmarks.mmt_flops import _Fusion, fusion_gflops
    from mmt_fast.models.mvit import MAT, MViTv2

    mmt = create_model("MMT-tiny")
    a, v = (1, *mmt.cfg.audio.input_size), (3, *mmt.cfg.video.input_size)
    f = count_flops(
        mmt,
        {"audio": torch.randn(1, *a), "video": torch.randn(1, *v)},
        modules=("audio_encoder", "video_encoder", "bottleneck"),
    )
    nv = mmt.video_encoder.forward_features(torch.randn(1, *v)).tokens.shape[1]
    na = mmt.audio_encoder.forward_features(torch.randn(1, *a)).tokens.shape[1]
    bc = mmt.cfg.bottleneck
    alone = fusion_gflops(_Fusion(bc), nv, na, bc.dim)
    assert alone * 1e9 == pytest.approx(f["module:bottleneck"], rel=1e-9)
    for cls, cfg, shape, sub in (
        (MAT, mmt.cfg.audio, a, "audio_encoder"),
        (MViTv2, mmt.cfg.video, v, "video_encoder"),
    ):
        enc = cls(cfg=dataclasses.replace(cfg, num_classes=7), num_classes=7)
        own = count_flops(enc, (torch.randn(1, *shape),))["total"]
        head = count_flops(enc.head, (torch.randn(1, enc.num_features),))["total"]
        assert f[f"module:{sub}"] + head == own
