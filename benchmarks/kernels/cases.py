"""Benchmark cases: the shapes the models run, tiny versions of them, and their inputs.

``real_cases()`` reads MAT-B stages 1-4 (batch 64), MViTv2-B-16 stages 1-4 (batch 8)
and the MMT AVBottleneck (batch 64) from the model configs; ``small_cases()`` keeps
each case's structure at a few tokens (the CPU runs those through Triton's
interpreter); ``check_cases()`` are the shapes of the correctness check that gates
the timings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from benchmarks.kernels import roofline


@dataclass(frozen=True)
class Case:
    """One benchmark shape.

    relpos: q (B, H, cls + prod(q_grid), D), k, v (B, H, cls + prod(k_grid), D).
    bottleneck: main segment (B, H, n_main, D), extra segment (B, H, n_extra, D).
    pooled: x (B, cls + prod(in_grid), dim_in) -> q, k, v pooled with ``kernel``,
    ``stride_q``, ``stride_kv``; heads of size D = dim_out // heads.
    """

    name: str
    op: str
    source: str
    batch: int
    heads: int
    head_dim: int
    has_cls: bool = True
    q_grid: tuple[int, ...] = ()
    k_grid: tuple[int, ...] = ()
    n_main: int = 0
    n_extra: int = 0
    in_grid: tuple[int, ...] = ()
    dim_in: int = 0
    kernel: tuple[int, ...] = ()
    stride_q: tuple[int, ...] = ()
    stride_kv: tuple[int, ...] = ()

    @property
    def nq_nk(self) -> tuple[int, int]:
        """(query tokens, key tokens) of the attention, or of the pooled q and k."""
        cls = int(self.has_cls)
        if self.op == "bottleneck":
            n = self.n_main + self.n_extra
            return n, n
        return cls + math.prod(self.q_grid), cls + math.prod(self.k_grid)

    def flops_fwd(self) -> float:
        """Forward FLOPs (2 per multiply-add; :mod:`benchmarks.kernels.roofline`)."""
        return roofline.flops(self, "fwd")

    def flops_fwd_bwd(self) -> float:
        """Forward + backward FLOPs (3x forward; :mod:`benchmarks.kernels.roofline`)."""
        return roofline.flops(self, "fwd_bwd")

    def nm_bytes(self, itemsize: int) -> int:
        """Bytes of one (B, H, Nq, Nk) tensor: what a materialised bias or score matrix costs."""
        nq, nk = self.nq_nk
        return self.batch * self.heads * nq * nk * itemsize

    def shapes(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v not in ((), 0) and k not in ("name",)}
        d["Nq"], d["Nk"] = self.nq_nk
        return d


CASE_NAMES = (
    *(f"relpos/mat_s{s}" for s in range(1, 5)),
    *(f"relpos/video_s{s}" for s in range(1, 5)),
    "bottleneck/mmt_audio",
    "bottleneck/mmt_video",
    *(f"pooled/mat_s{s}" for s in range(1, 5)),
    *(f"pooled/video_s{s}" for s in range(1, 5)),
)
# One case per op and grid rank: what --small times and --check verifies.
SMALL_SUBSET = ("relpos/mat_s1", "relpos/video_s3", "bottleneck/mmt_audio", "pooled/mat_s1")


def _stage_blocks(cfg) -> list[tuple[int, Any, tuple[int, ...]]]:
    """(stage, block, input grid) of the last block of each stage: the block repeated most."""
    from mmt_fast.registry import build

    with torch.device("meta"):
        model = build(cfg)
    last: dict[int, int] = {}
    for i, s in enumerate(model.stage_of_block):
        last[s] = i
    return [(s, model.blocks[i], tuple(model.grids[i])) for s, i in sorted(last.items())]


def real_cases(mat_batch: int = 64, video_batch: int = 8) -> dict[str, Case]:
    """The cases at the shapes the models run (read from MAT-B, MViTv2-B-16 and MMT)."""
    from mmt_fast.config import BottleneckConfig, mat_b, mvitv2_b_16

    cases: dict[str, Case] = {}
    final_tokens = {}
    for tag, cfg, source, batch in (
        ("mat", mat_b(), "MAT-B", mat_batch),
        ("video", mvitv2_b_16(), "MViTv2-B-16", video_batch),
    ):
        blocks = _stage_blocks(cfg)
        for s, block, grid in blocks:
            a = block.attn
            common = dict(
                source=f"{source} stage {s + 1}",
                batch=batch,
                heads=a.num_heads,
                head_dim=a.head_dim,
                has_cls=a.has_cls,
                q_grid=tuple(a.q_grid_init),
                k_grid=tuple(a.k_grid_init),
            )
            cases[f"relpos/{tag}_s{s + 1}"] = Case(f"relpos/{tag}_s{s + 1}", "relpos", **common)
            cases[f"pooled/{tag}_s{s + 1}"] = Case(
                f"pooled/{tag}_s{s + 1}",
                "pooled",
                **common,
                in_grid=grid,
                dim_in=a.qkv.in_features,
                kernel=tuple(a.kernel),
                stride_q=tuple(a.stride_q),
                stride_kv=tuple(a.stride_kv),
            )
        s, block, _ = blocks[-1]
        final_tokens[tag] = int(block.attn.has_cls) + math.prod(block.attn.q_grid_init)
    bn = BottleneckConfig()
    for tag, label in (("audio", "mat"), ("video", "video")):
        name = f"bottleneck/mmt_{tag}"
        cases[name] = Case(
            name,
            "bottleneck",
            source=f"MMT AVBottleneck, {tag} side",
            batch=mat_batch,
            heads=bn.num_heads,
            head_dim=bn.dim // bn.num_heads,
            n_main=final_tokens[label],
            n_extra=bn.num_tokens,
        )
    return {n: cases[n] for n in CASE_NAMES}


def _factors(grid: Sequence[int], cap: int) -> tuple[int, ...]:
    """Per axis, the smallest power of two that brings the axis to <= cap."""
    return tuple(2 ** max(0, math.ceil(math.log2(g / cap))) for g in grid)


def _div(grid: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-g // f) for g, f in zip(grid, factors))


def small_cases(
    tokens: int = 16, head_dim: int = 24, batch: int = 2, pooled_dims: tuple[int, int] = (8, 16)
) -> dict[str, Case]:
    """The same case names at tiny shapes, keeping the structure: grid rank, CLS, the
    query/key pooling ratio per axis, the pooling strides.

    Each query-grid axis is divided by a power of two down to about
    ``tokens ** (1 / rank)`` (the key grid by the same factors); D is not a power of
    two, so the kernels' masks are exercised. ``pooled_dims``: (D, C_in) of the
    pooled cases.
    """
    from mmt_fast.kernels.pooled_qkv import pooled_grid

    out = {}
    for name, c in real_cases().items():
        heads = min(c.heads, 2)
        small = dict(batch=batch, heads=heads, head_dim=head_dim)
        if c.op == "bottleneck":
            out[name] = replace(c, **small, n_main=tokens + 1)
            continue
        cap = max(2, round(tokens ** (1 / len(c.q_grid))))
        if c.op == "relpos":
            f = _factors(c.q_grid, cap)
            out[name] = replace(c, **small, q_grid=_div(c.q_grid, f), k_grid=_div(c.k_grid, f))
            continue
        # Keep at least two pooling windows per strided axis (kernel 3, padding 1).
        f = _factors(c.in_grid, cap)
        in_grid = tuple(
            max(n, min(g, s + 1)) for n, g, s in zip(_div(c.in_grid, f), c.in_grid, c.stride_kv)
        )
        out[name] = replace(
            c,
            **{**small, "head_dim": pooled_dims[0]},
            dim_in=pooled_dims[1],
            in_grid=in_grid,
            q_grid=pooled_grid(in_grid, c.kernel, c.stride_q),
            k_grid=pooled_grid(in_grid, c.kernel, c.stride_kv),
        )
    return out


# The check's rel-pos MAT stage-1 grid on CUDA: MAT's (freq, time) layout and 2x key
# pooling, with the fastest key axis 64 long (the kernels' key-axis decoding and the
# d_relq window sums change regime when that axis reaches a key block).
CHECK_MAT_S1_GRIDS = ((4, 128), (2, 64))


def check_cases(device: torch.device) -> dict[str, Case]:
    """Correctness shapes for every case name: tiny on the CPU (interpreter); on CUDA a few
    hundred tokens with D = 96, and rel-pos MAT stage 1 at q grid 4 x 128 over k grid
    2 x 64 (:data:`CHECK_MAT_S1_GRIDS`)."""
    if device.type == "cpu":
        return small_cases(tokens=24, head_dim=24)
    cases = small_cases(tokens=256, head_dim=96, batch=2, pooled_dims=(96, 96))
    q_grid, k_grid = CHECK_MAT_S1_GRIDS
    cases["relpos/mat_s1"] = replace(cases["relpos/mat_s1"], q_grid=q_grid, k_grid=k_grid)
    return cases


@dataclass
class Inputs:
    """Leaf tensors (all require grad), the output gradients, and the case."""

    case: Case
    leaves: dict[str, torch.Tensor]
    douts: list[torch.Tensor]

    def cast(self, dtype: torch.dtype) -> Inputs:
        leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in self.leaves.items()}
        return Inputs(self.case, leaves, [d.to(dtype) for d in self.douts])


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs for ``case`` (never zeros: they hide unwritten outputs)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
        return (t * std).to(dtype).requires_grad_()

    B, H, D = case.batch, case.heads, case.head_dim
    nq, nk = case.nq_nk
    if case.op == "relpos":
        leaves = {"q": randn(B, H, nq, D), "k": randn(B, H, nk, D), "v": randn(B, H, nk, D)}
        for a, (qa, ka) in enumerate(zip(case.q_grid, case.k_grid)):
            # std 0.1: the bias q . R is then O(1), comparable to the scores.
            leaves[f"rel{a}"] = randn(2 * max(qa, ka) - 1, D, std=0.1)
        douts = [randn(B, H, nq, D).detach()]
    elif case.op == "bottleneck":
        m, e = case.n_main, case.n_extra
        leaves = {
            "q_main": randn(B, H, m, D),
            "k_main": randn(B, H, m, D),
            "v_main": randn(B, H, m, D),
            "q_extra": randn(B, H, e, D),
            "k_extra": randn(B, H, e, D),
            "v_extra": randn(B, H, e, D),
        }
        douts = [randn(B, H, m, D).detach(), randn(B, H, e, D).detach()]
    else:
        n = int(case.has_cls) + math.prod(case.in_grid)
        c_out = H * D
        leaves = {
            "x": randn(B, n, case.dim_in),
            "qkv_weight": randn(3 * c_out, case.dim_in, std=case.dim_in**-0.5),
            "qkv_bias": randn(3 * c_out, std=0.1),
        }
        for t in "qkv":
            leaves[f"pool_{t}"] = randn(D, 1, *case.kernel, std=0.3)
            leaves[f"gamma_{t}"] = (1 + randn(D, std=0.1)).detach().requires_grad_()
            leaves[f"beta_{t}"] = randn(D, std=0.1)
        douts = [randn(B, H, nq, D).detach(), *(randn(B, H, nk, D).detach() for _ in "kv")]
    return Inputs(case, leaves, douts)
