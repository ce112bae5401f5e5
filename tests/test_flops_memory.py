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
    assert small.breakdown["Parameter"] == pytest.approx(4 * n, rel=0.01)
    assert small.breakdown["Optstate"] >= 2 * 4 * n
    assert big.peak_bytes > small.peak_bytes
    # activations grow with the batch
    assert big.breakdown["Activation"] > 3 * small.breakdown["Activation"]


def test_benchmark_cli_writes_json_and_plot(tmp_path, monkeypatch):
    """The main job end to end, on tiny stand-ins of AST and MAT so that it is
    quick (the full-size figures are checked above)."""
    from benchmarks import flops_memory as fm

    tiny = {"x": (1, 32, 64)}
    monkeypatch.setattr(
        fm,
        "MODELS",
        {
            "AST": ("AST-tiny", tiny, 87.0, 131.0, "t"),
            "MAT": ("MAT-tiny", tiny, 52.0, 46.2, "t"),
            "MAT (kernels)": ("MAT-tiny", tiny, 52.0, 46.2, "t"),
        },
    )
    monkeypatch.setattr(
        fm, "MEMORY", {"AST": (2, 1, 20.6), "MAT": (4, 2, 16.8), "MAT (kernels)": (4, 2, None)}
    )
    out, png = tmp_path / "r.json", tmp_path / "m.png"
    assert fm.main(["--json", str(out), "--plot", str(png), "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["rows"]] == ["AST", "MAT", "MAT (kernels)"]
    rows = {r["model"]: r for r in data["rows"]}
    row = rows["MAT"]
    assert set(row) == {
        "model", "params_m", "gflops", "paper_params_m", "paper_gflops",
        "batch_size", "peak_memory_gb", "memory_method",
    }  # fmt: skip
    assert row["memory_method"] == "estimated" and row["batch_size"] == 4
    assert rows["MAT (kernels)"]["gflops"] == row["gflops"]
    assert rows["MAT (kernels)"]["peak_memory_gb"] < row["peak_memory_gb"]
    assert data["per_sample_memory_ratio_ast_over_mat"] > 0
    assert data["memory_ratio_mat_kernels_over_mat"] < 1
    assert png.stat().st_size > 10_000
