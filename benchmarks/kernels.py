"""Speed and memory of the fused ops against the PyTorch alternatives.

``python -m benchmarks.kernels`` times forward and forward+backward and records
peak memory of each fused op (``kernels/``) at the real shapes of MAT-B stages
1-4 (batch 64), MViTv2-B-16 stages 1-4 (batch 8) and the MMT AVBottleneck
(batch 64), bf16 on CUDA, against:

* ``reference``: the op's PyTorch reference (``*_ref``) in eager mode;
* ``sdpa``: ``F.scaled_dot_product_attention``; for rel-pos attention with the
  (B, H, Nq, Nk) bias materialised as a tensor mask, for bottleneck attention
  over the concatenated segments;
* ``flex``: ``torch.compile(flex_attention)``; for rel-pos attention a
  ``score_mod`` adds ``relq_a[b, h, q_idx, coord_a(kv_idx)]`` from the same small
  per-axis tensors the fused kernel reads (no bias on the CLS row and column);
* ``xformers``: ``memory_efficient_attention`` with a tensor bias, when xformers
  imports.

The residual ``+ q`` of rel-pos attention is added outside the op for every
alternative. Failures are recorded per case and path, not raised: ``OOM`` with
the size of the N x M tensor the path needed, or the error text. Results go to
``<out>/kernels.json`` (written after every case) and ``<out>/kernels.png``.

Other modes::

    python -m benchmarks.kernels --check              # every path vs a float64 reference
    python -m benchmarks.kernels --train-memory       # MAT training step: reference vs triton
    python -m benchmarks.kernels --device cpu --small # tiny shapes on the CPU (interpreter)
    python -m benchmarks.kernels --replot kernels.json

FLOP convention (in the JSON as ``flop_convention``): attention forward
= 4 B H Nq Nk D (2 FLOPs per multiply-add, Q K^T and P V); backward = 2.5x
forward (5 matmuls against 2), so forward+backward = 3.5x forward, as in
flash-attention's benchmarks; the rel-pos bias terms are not counted.
Pooled Q/K/V: the linear projection 2 B N C_in 3 C_out plus the depthwise conv
taps; forward+backward = 3x forward.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ATTN_FWD_BWD_FACTOR = 3.5  # forward + backward (2.5x forward) of attention
LINEAR_FWD_BWD_FACTOR = 3.0
FLOP_CONVENTION = (
    "2 FLOPs per multiply-add. Attention forward = 4*B*H*Nq*Nk*D (QK^T and PV); backward = "
    "2.5x forward, so fwd_bwd = 3.5x forward (flash-attention's convention); rel-pos bias "
    "terms not counted. Pooled QKV: linear 2*B*N*C_in*3*C_out + depthwise conv taps; "
    "fwd_bwd = 3x forward."
)
PATHS = {
    "relpos": ("fused", "reference", "sdpa", "flex", "xformers"),
    "bottleneck": ("fused", "reference", "sdpa", "flex", "xformers"),
    "pooled": ("fused", "reference"),
}
# The case the targets are stated for.
TARGET_CASE = "relpos/mat_s1"
DEFAULT_OUT = Path("benchmarks/results")


# ----------------------------------------------------------------------------- cases


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
        B, H, D = self.batch, self.heads, self.head_dim
        nq, nk = self.nq_nk
        if self.op in ("relpos", "bottleneck"):
            return 4.0 * B * H * nq * nk * D
        n = int(self.has_cls) + math.prod(self.in_grid)
        dim_out = H * D
        linear = 2.0 * B * n * self.dim_in * 3 * dim_out
        conv = 2.0 * math.prod(self.kernel) * B * dim_out * (nq + 2 * nk)
        return linear + conv

    def flops_fwd_bwd(self) -> float:
        factor = LINEAR_FWD_BWD_FACTOR if self.op == "pooled" else ATTN_FWD_BWD_FACTOR
        return factor * self.flops_fwd()

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
    from kernels.pooled_qkv import pooled_grid

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


def check_cases(device: torch.device) -> dict[str, Case]:
    """Correctness shapes: tiny on the CPU (interpreter), a few hundred tokens, real D on CUDA."""
    if device.type == "cpu":
        cases = small_cases(tokens=24, head_dim=24)
    else:
        cases = small_cases(tokens=256, head_dim=96, batch=2, pooled_dims=(96, 96))
    return {n: cases[n] for n in SMALL_SUBSET}


# ----------------------------------------------------------------------------- inputs


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


# ----------------------------------------------------------------------------- paths


def kernel_mode(mode: str):
    """Set ``MMT_FAST_KERNELS`` (``triton`` / ``reference``) for the duration."""
    from kernels import dispatch

    return dispatch.use(mode)


def relq_axes(
    q_sp: torch.Tensor, tables: Sequence[torch.Tensor], q_grid: Sequence[int], k_grid: Sequence[int]
) -> list[torch.Tensor]:
    """relq_a[b, h, i, y] = q_i . R_a[dist_a(i_a, y)]: one (B, H, prod(q_grid), k_grid[a]) per axis.

    The decomposition the fused kernel reads (``bias[i, j] = sum_a relq_a[i, j_a]``).
    """
    from kernels.relpos_attention import rel_pos_index

    B, H, _, D = q_sp.shape
    axes = "xyz"[: len(q_grid)]
    r_q = q_sp.reshape(B, H, *q_grid, D)
    out = []
    for a, table in enumerate(tables):
        r = table[rel_pos_index(q_grid[a], k_grid[a], q_sp.device)]  # (qa, ka, D)
        rel = torch.einsum(f"bh{axes}d,{axes[a]}kd->bh{axes}k", r_q, r)
        out.append(rel.reshape(B, H, -1, k_grid[a]))
    return out


def materialised_bias(q: torch.Tensor, tables, q_grid, k_grid, has_cls: bool) -> torch.Tensor:
    """The full (B, H, Nq, Nk) rel-pos bias, zero on the CLS row and column."""
    B, H = q.shape[:2]
    cls = int(has_cls)
    nd = len(q_grid)
    bias = None
    for a, rel in enumerate(relq_axes(q[:, :, cls:], tables, q_grid, k_grid)):
        shape = [B, H, math.prod(q_grid)] + [k_grid[b] if b == a else 1 for b in range(nd)]
        term = rel.reshape(shape)
        bias = term if bias is None else bias + term
    bias = bias.expand(B, H, math.prod(q_grid), *k_grid).reshape(
        B, H, math.prod(q_grid), math.prod(k_grid)
    )
    return F.pad(bias, (cls, 0, cls, 0))


_FLEX: dict[bool, Callable] = {}


def flex_fn(compiled: bool) -> Callable:
    """flex_attention, compiled once per process (eager on the CPU: compiling is slow there)."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if compiled:
            import torch._dynamo

            # One compiled variant per case shape and score_mod closure.
            for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            _FLEX[compiled] = torch.compile(flex_attention, dynamic=False)
        else:
            _FLEX[compiled] = flex_attention
    return _FLEX[compiled]


def relpos_score_mod(rels: Sequence[torch.Tensor], k_grid: Sequence[int], has_cls: bool):
    """score + sum_a relq_a[b, h, q_idx - cls, coord_a(kv_idx - cls)], 0 on the CLS row/column."""
    cls = int(has_cls)
    strides = [math.prod(k_grid[a + 1 :]) for a in range(len(k_grid))]
    sizes = list(k_grid)

    def score_mod(score, b, h, q_idx, kv_idx):
        qi = torch.clamp(q_idx - cls, min=0)
        j = torch.clamp(kv_idx - cls, min=0)
        bias = None
        for rel, st, ka in zip(rels, strides, sizes):
            term = rel[b, h, qi, (j // st) % ka]
            bias = term if bias is None else bias + term
        if cls:
            bias = torch.where((q_idx >= cls) & (kv_idx >= cls), bias, torch.zeros_like(bias))
        return score + bias

    return score_mod


def _xformers_attention(q, k, v, bias, scale):
    """xformers memory_efficient_attention on (B, H, N, D) tensors with a tensor bias."""
    import xformers.ops as xops

    nk = k.shape[2]
    if bias is not None:
        # xformers wants the bias' last dim 8-aligned in memory: pad, then slice the view.
        pad = -nk % 8
        bias = F.pad(bias, (0, pad))[..., :nk]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


def forward_only(path: str, inp: Inputs) -> str | None:
    """Why ``path`` can run only the forward on these inputs (None if it has a backward)."""
    device = next(iter(inp.leaves.values())).device
    if path == "flex" and device.type == "cpu":
        return "FlexAttention has no backward on the CPU: forward only, on detached inputs"
    return None


def build_path(path: str, inp: Inputs, compile_flex: bool) -> Callable[[], tuple]:
    """A closure running ``path`` on ``inp``: returns the op's outputs as a tuple."""
    c, t = inp.case, inp.leaves
    if forward_only(path, inp):
        t = {k: v.detach() for k, v in t.items()}
    if c.op == "relpos":
        from kernels.relpos_attention import relpos_attention, relpos_attention_ref

        q, k, v = t["q"], t["k"], t["v"]
        tables = [t[f"rel{a}"] for a in range(len(c.q_grid))]
        scale = c.head_dim**-0.5
        args = (q, k, v, tables, c.q_grid, c.k_grid, c.has_cls, scale, True)
        if path == "fused":

            def run():
                with kernel_mode("triton"):
                    return (relpos_attention(*args),)

        elif path == "reference":

            def run():
                return (relpos_attention_ref(*args),)

        elif path == "sdpa":

            def run():
                bias = materialised_bias(q, tables, c.q_grid, c.k_grid, c.has_cls)
                return (F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale) + q,)

        elif path == "flex":
            flex = flex_fn(compile_flex)

            def run():
                rels = relq_axes(q[:, :, int(c.has_cls) :], tables, c.q_grid, c.k_grid)
                mod = relpos_score_mod(rels, c.k_grid, c.has_cls)
                return (flex(q, k, v, score_mod=mod, scale=scale) + q,)

        elif path == "xformers":

            def run():
                bias = materialised_bias(q, tables, c.q_grid, c.k_grid, c.has_cls)
                return (_xformers_attention(q, k, v, bias, scale) + q,)

        else:
            raise ValueError(path)
        return run

    if c.op == "bottleneck":
        from kernels.bottleneck_attention import bottleneck_attention, bottleneck_attention_ref

        segs = [t[n] for n in ("q_main", "k_main", "v_main", "q_extra", "k_extra", "v_extra")]
        scale = c.head_dim**-0.5
        m = c.n_main

        def concat_then(attn):
            def run():
                q = torch.cat([segs[0], segs[3]], dim=2)
                k = torch.cat([segs[1], segs[4]], dim=2)
                v = torch.cat([segs[2], segs[5]], dim=2)
                out = attn(q, k, v)
                return out[:, :, :m], out[:, :, m:]

            return run

        if path == "fused":

            def run():
                with kernel_mode("triton"):
                    return tuple(bottleneck_attention(*segs, scale))

            return run
        if path == "reference":
            return lambda: tuple(bottleneck_attention_ref(*segs, scale))
        if path == "sdpa":
            return concat_then(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale))
        if path == "flex":
            flex = flex_fn(compile_flex)
            return concat_then(lambda q, k, v: flex(q, k, v, scale=scale))
        if path == "xformers":
            return concat_then(lambda q, k, v: _xformers_attention(q, k, v, None, scale))
        raise ValueError(path)

    from kernels.pooled_qkv import pooled_qkv, pooled_qkv_ref

    args = (
        t["x"],
        t["qkv_weight"],
        t["qkv_bias"],
        c.in_grid,
        c.has_cls,
        c.heads,
        [t["pool_q"], t["pool_k"], t["pool_v"]],
        (c.stride_q, c.stride_kv),
        [(t[f"gamma_{n}"], t[f"beta_{n}"]) for n in "qkv"],
    )
    if path == "fused":

        def run():
            with kernel_mode("triton"):
                return tuple(pooled_qkv(*args)[:3])

        return run
    if path == "reference":
        return lambda: tuple(pooled_qkv_ref(*args)[:3])
    raise ValueError(path)


def path_unavailable(path: str, device: torch.device) -> str | None:
    """Why ``path`` cannot run here at all (None if it can)."""
    if path == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:
            return f"not installed ({type(e).__name__}: {e})"[:200]
        if device.type != "cuda":
            return "xformers has no CPU path"
    if path == "flex":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception as e:
            return f"flex_attention unavailable: {e}"[:200]
    return None


def fwd_bwd(run: Callable[[], tuple], inp: Inputs) -> Callable[[], None]:
    def step():
        outs = run()
        torch.autograd.backward(list(outs), list(inp.douts))

    return step


def zero_grads(inp: Inputs) -> None:
    for t in inp.leaves.values():
        t.grad = None


# ----------------------------------------------------------------------------- correctness


def rel_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """||x - ref|| / ||ref|| in float64 (inf when x is missing or not finite)."""
    if x is None or ref is None:
        return math.inf if (x is None) != (ref is None) else 0.0
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def _results(
    run: Callable[[], tuple], inp: Inputs, backward: bool = True
) -> dict[str, torch.Tensor | None]:
    zero_grads(inp)
    outs = run()
    res: dict[str, torch.Tensor | None] = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    if backward:
        torch.autograd.backward(list(outs), list(inp.douts))
        res.update({f"d{k}": v.grad for k, v in inp.leaves.items()})
    zero_grads(inp)
    return res


# Error floors per dtype for ||x - fp64|| / ||fp64||: the METHOD.md bands (bf16 operands
# 1e-3..1e-2, fp32 far below 1e-3). A path passes when its error is at most
# max(TOL_FACTOR x the eager reference's error in the same dtype, the floor).
ERR_FLOOR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TOL_FACTOR = 3.0


def run_checks(
    device: torch.device,
    dtype: torch.dtype,
    cases: dict[str, Case],
    compile_flex: bool,
    paths: Sequence[str] | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """Every available path of every case, output and all gradients, against fp64.

    ``verbose`` prints each row as it is made (a time limit then keeps what was checked).
    """
    rows: list[dict[str, Any]] = _Rows(verbose)
    for name, case in cases.items():
        base = make_inputs(case, device, torch.float64, seed=zlib.crc32(name.encode()) % 1000)
        ref64 = _results(build_path("reference", base, False), base)
        low = base.cast(dtype)
        ref_low = _results(build_path("reference", low, False), low)
        base_err = {k: rel_err(ref_low[k], ref64[k]) for k in ref64}
        for path in PATHS[case.op]:
            if paths and path not in paths:
                continue
            row: dict[str, Any] = {"case": name, "path": path, "dtype": str(dtype)}
            why = path_unavailable(path, device)
            if why:
                rows.append({**row, "status": "skipped", "why": why})
                continue
            fwd_only = forward_only(path, low)
            try:
                got = _results(build_path(path, low, compile_flex), low, backward=not fwd_only)
            except Exception as e:
                rows.append({**row, "status": "error", "error": _short(e)})
                continue
            keys = [k for k in ref64 if k in got] if fwd_only else list(ref64)
            errs = {k: rel_err(got.get(k), ref64[k]) for k in keys}
            tols = {k: max(TOL_FACTOR * base_err[k], ERR_FLOOR[dtype]) for k in keys}
            bad = [k for k in keys if not errs[k] <= tols[k]]
            if fwd_only:
                row["note"] = fwd_only
            worst = max(errs, key=lambda k: errs[k] / tols[k])
            rows.append(
                {
                    **row,
                    "status": "FAIL" if bad else "ok",
                    "worst": worst,
                    "err": errs[worst],
                    "tol": tols[worst],
                    "failed": bad,
                    "errors": errs,
                }
            )
    return rows


class _Rows(list):
    """A list of check rows that can print each row when it is appended."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        if verbose:
            print(CHECK_HEADER, flush=True)

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        if self.verbose:
            print(_check_line(row), flush=True)


CHECK_HEADER = f"{'case':24s} {'path':10s} {'status':8s} worst tensor: rel err (tol)"


def print_checks(rows: list[dict[str, Any]]) -> None:
    print(CHECK_HEADER)
    for r in rows:
        print(_check_line(r))


def _check_line(r: dict[str, Any]) -> str:
    if r["status"] in ("ok", "FAIL"):
        detail = f"{r['worst']}: {r['err']:.2e} ({r['tol']:.1e})"
        if r["failed"]:
            detail += f"  failed: {', '.join(r['failed'])}"
        if r.get("note"):
            detail += f"  [{r['note']}]"
    else:
        detail = r.get("why") or r.get("error", "")
    return f"{r['case']:24s} {r['path']:10s} {r['status']:8s} {detail}"


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], inp: Inputs, device: torch.device, reps: int = 3) -> float:
    """Median milliseconds of ``fn``: CUDA events via ``triton.testing.do_bench`` (L2 flushed
    between runs, grads reset) on CUDA; a host clock on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn,
                warmup=25,
                rep=100,
                grad_to_none=list(inp.leaves.values()),
                return_mode="median",
            )
        )
    times = []
    for _ in range(reps):
        zero_grads(inp)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    zero_grads(inp)
    return statistics.median(times)


def peak_gb(fn: Callable[[], Any], inp: Inputs, device: torch.device) -> dict[str, float]:
    """Peak allocated GB while ``fn`` runs and its result lives; ``extra_gb`` excludes what
    was allocated before (inputs, output gradients)."""
    if device.type != "cuda":
        return {}
    zero_grads(inp)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del res
    zero_grads(inp)
    return {"peak_gb": peak / 1e9, "extra_gb": (peak - base) / 1e9, "inputs_gb": base / 1e9}


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text[:400]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_path(
    path: str, inp: Inputs, device: torch.device, compile_flex: bool, reps: int
) -> dict[str, Any]:
    """Time and measure one path on one case; never raises."""
    case = inp.case
    itemsize = next(iter(inp.leaves.values())).element_size()
    res: dict[str, Any] = {}
    try:
        run = build_path(path, inp, compile_flex)
        fwd_only = forward_only(path, inp)
        step = None if fwd_only else fwd_bwd(run, inp)
        t0 = time.perf_counter()
        (step or run)()  # compiles, autotunes, allocates workspaces: outside the measurements
        _sync(device)
        res["first_call_s"] = time.perf_counter() - t0
        zero_grads(inp)
        res.update({f"fwd_{k}": v for k, v in peak_gb(run, inp, device).items()})
        if step:
            res.update({f"fwd_bwd_{k}": v for k, v in peak_gb(step, inp, device).items()})
        res["fwd_ms"] = time_ms(run, inp, device, reps)
        res["fwd_tflops"] = case.flops_fwd() / res["fwd_ms"] / 1e9
        if step:
            res["fwd_bwd_ms"] = time_ms(step, inp, device, reps)
            res["fwd_bwd_tflops"] = case.flops_fwd_bwd() / res["fwd_bwd_ms"] / 1e9
        else:
            res["note"] = fwd_only
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:
        res["status"] = "OOM"
        res["attempted"] = (
            f"one (B, H, Nq, Nk) tensor is {case.nm_bytes(itemsize) / 1e9:.2f} GB; " + _short(e)
        )[:400]
    except Exception as e:
        res["status"] = "error"
        res["error"] = _short(e)
    finally:
        zero_grads(inp)
        _free(device)
    return res


def baselines(device: torch.device) -> dict[str, Any]:
    """Measured ceilings: bf16 matmul TFLOP/s (8192^3, random data) and copy TB/s."""
    if device.type != "cuda":
        return {}
    import triton.testing

    def matmul_ms(n: int) -> float:
        x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        return triton.testing.do_bench(lambda: x @ y, warmup=50, rep=200, return_mode="median")

    def copy_ms(numel: int) -> float:
        src = torch.randn(numel, device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return triton.testing.do_bench(
            lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median"
        )

    out: dict[str, Any] = {}
    try:
        n = 8192
        ms = matmul_ms(n)
        out["matmul_bf16_8192_ms"] = ms
        out["matmul_bf16_tflops"] = 2 * n**3 / ms / 1e9
        numel = 1 << 29  # 1 GiB of bf16
        out["copy_tbps"] = 2 * numel * 2 / copy_ms(numel) / 1e9  # read + write
    except Exception as e:
        out["error"] = _short(e)
    _free(device)
    return out


def environment(device: torch.device) -> dict[str, Any]:
    import triton

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import xformers

        env["xformers"] = xformers.__version__
    except Exception:
        env["xformers"] = "not installed"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = p.total_memory / 1e9
        env["capability"] = f"{p.major}.{p.minor}"
    return env


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets at MAT stage 1, measured (never asserted)."""
    case = results["cases"].get(TARGET_CASE)
    if not case:
        return {"note": f"{TARGET_CASE} not measured"}
    p = case["paths"]
    fused = p.get("fused", {})
    out: dict[str, Any] = {"case": TARGET_CASE}

    def ratio(other: str, key: str = "fwd_bwd_ms") -> float | None:
        o = p.get(other, {})
        if key in fused and key in o:
            return o[key] / fused[key]
        return None

    out["fwd_bwd_speedup_vs_flex"] = ratio("flex")
    out["fwd_bwd_speedup_vs_flex_target"] = 1.5
    out["fwd_bwd_speedup_vs_sdpa_bias"] = ratio("sdpa")
    out["fwd_bwd_speedup_vs_sdpa_bias_target"] = 2.0
    out["fwd_bwd_speedup_vs_reference"] = ratio("reference")
    nm_gb = case["nm_bf16_gb"]
    out["nm_bf16_gb"] = nm_gb
    if "fwd_bwd_extra_gb" in fused:
        out["fused_fwd_bwd_extra_gb"] = fused["fwd_bwd_extra_gb"]
        out["fused_extra_over_nm"] = fused["fwd_bwd_extra_gb"] / nm_gb
    mm = results.get("baselines", {}).get("matmul_bf16_tflops")
    if mm and fused.get("status") == "ok":
        out["fused_fwd_tflops"] = fused["fwd_tflops"]
        out["fwd_fraction_of_matmul"] = fused["fwd_tflops"] / mm
        out["fwd_fraction_of_matmul_target"] = 0.5
    for key, tgt in (
        ("fwd_bwd_speedup_vs_flex", 1.5),
        ("fwd_bwd_speedup_vs_sdpa_bias", 2.0),
        ("fwd_fraction_of_matmul", 0.5),
    ):
        if out.get(key) is not None:
            out[f"{key}_met"] = out[key] >= tgt
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run_benchmarks(
    device: torch.device,
    dtype: torch.dtype,
    cases: dict[str, Case],
    out_json: Path | None,
    compile_flex: bool,
    budget_s: float,
    reps: int = 3,
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every case in order, writing the JSON after each one; skip what the budget leaves."""
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "benchmarks.kernels",
        "env": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "flop_convention": FLOP_CONVENTION,
        "timing": (
            "triton.testing.do_bench: CUDA events, median, warmup 25 ms, rep 100 ms, L2 "
            "flushed and grads reset between runs; memory: torch.cuda.max_memory_allocated "
            "around one call after a warm-up call (compile/autotune excluded); extra_gb = "
            "peak minus what was allocated before (inputs, output gradients)"
            if device.type == "cuda"
            else f"host clock, median of {reps}; no memory figures on the CPU"
        ),
        "baselines": baselines(device),
        "cases": {},
    }
    for name, case in cases.items():
        elapsed = time.perf_counter() - t_start
        entry: dict[str, Any] = {
            "op": case.op,
            "source": case.source,
            "shapes": case.shapes(),
            "flops_fwd": case.flops_fwd(),
            "flops_fwd_bwd": case.flops_fwd_bwd(),
            "nm_bf16_gb": case.nm_bytes(2) / 1e9,
            "paths": {},
        }
        results["cases"][name] = entry
        if elapsed > budget_s:
            entry["skipped"] = f"time budget {budget_s:.0f} s used up"
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        try:
            inp = make_inputs(case, device, dtype, seed=len(results["cases"]))
        except torch.OutOfMemoryError as e:
            entry["skipped"] = "OOM allocating inputs: " + _short(e)
            _free(device)
            continue
        for path in PATHS[case.op]:
            if paths and path not in paths:
                continue
            why = path_unavailable(path, device)
            remaining = budget_s - (time.perf_counter() - t_start)
            if why is None and path == "flex" and compile_flex and remaining < 45:
                why = f"skipped: {remaining:.0f} s of the time budget left (compiling takes ~30 s)"
            if why:
                entry["paths"][path] = {"status": "skipped", "why": why}
                continue
            r = bench_path(path, inp, device, compile_flex, reps)
            entry["paths"][path] = r
            print(f"{name:24s} {path:10s} {_fmt_row(r)}", flush=True)
            if out_json:
                _write_json(out_json, results)
        del inp
        _free(device)
        results["targets"] = targets(results)
        if out_json:
            _write_json(out_json, results)
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - t_start
    if out_json:
        _write_json(out_json, results)
    return results


def _fmt_row(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('why') or r.get('error') or r.get('attempted')}"[:160]
    mem = r.get("fwd_bwd_extra_gb")
    mem_s = f" extra {mem:7.3f} GB" if mem is not None else ""
    fb = (
        f"fwd+bwd {r['fwd_bwd_ms']:9.3f} ms ({r['fwd_bwd_tflops']:6.1f} TF/s)"
        if "fwd_bwd_ms" in r
        else "fwd+bwd n/a"
    )
    return f"fwd {r['fwd_ms']:9.3f} ms ({r['fwd_tflops']:6.1f} TF/s)  {fb}{mem_s}"


def print_summary(results: dict[str, Any]) -> None:
    b = results.get("baselines") or {}
    if b.get("matmul_bf16_tflops"):
        print(
            f"\nbf16 matmul 8192^3: {b['matmul_bf16_tflops']:.0f} TFLOP/s; "
            f"copy: {b.get('copy_tbps', float('nan')):.2f} TB/s"
        )
    print(
        f"\n{'case':22s} {'path':10s} {'fwd ms':>9s} {'f+b ms':>9s} {'f+b TF/s':>9s} {'extra GB':>9s}"
    )
    for name, c in results["cases"].items():
        if c.get("skipped"):
            print(f"{name:22s} skipped: {c['skipped']}")
            continue
        for path, r in c["paths"].items():
            if r.get("status") == "ok":
                mem = r.get("fwd_bwd_extra_gb")
                fb, tf = r.get("fwd_bwd_ms"), r.get("fwd_bwd_tflops")
                print(
                    f"{name:22s} {path:10s} {r['fwd_ms']:9.3f} "
                    f"{'n/a' if fb is None else f'{fb:.3f}':>9s} "
                    f"{'n/a' if tf is None else f'{tf:.1f}':>9s} "
                    f"{'' if mem is None else f'{mem:9.3f}'}"
                )
            else:
                print(f"{name:22s} {path:10s} {r.get('status')}")
    t = results.get("targets") or {}
    if t:
        print("\ntargets (" + TARGET_CASE + "):")
        for k, v in t.items():
            if k != "case":
                print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")


# ----------------------------------------------------------------------------- plot


COLORS = {
    "fused": "#1b9e77",
    "reference": "#7570b3",
    "sdpa": "#d95f02",
    "flex": "#e7298a",
    "xformers": "#66a61e",
}


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Per case: fwd (light) and fwd+bwd (dark) ms per path, log scale; below, peak extra GB
    of fwd+bwd with the size of one N x M bf16 tensor as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"plot skipped: matplotlib unavailable ({e})")
        return None
    cases = {n: c for n, c in results["cases"].items() if not c.get("skipped")}
    if not cases:
        return None
    cols = 4
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(
        2 * rows, cols, figsize=(4.2 * cols, 5.2 * rows), squeeze=False, layout="constrained"
    )
    env = results.get("env", {})
    fig.suptitle(
        f"mmt-fast kernels, {results.get('dtype')} on {env.get('device')} "
        f"(torch {env.get('torch')}, triton {env.get('triton')}, {env.get('date', '')[:10]})\n"
        "top: time, log scale (light = forward, dark = forward+backward); bottom: extra "
        "memory of forward+backward (dashed: one N x M bf16 tensor)",
        fontsize=10,
    )
    for idx, (name, c) in enumerate(cases.items()):
        r, col = divmod(idx, cols)
        ax_t, ax_m = axes[2 * r][col], axes[2 * r + 1][col]
        names = list(c["paths"])
        x = range(len(names))
        for i, p in enumerate(names):
            pr = c["paths"][p]
            color = COLORS.get(p, "gray")
            if pr.get("status") == "ok":
                ax_t.bar(i - 0.2, pr["fwd_ms"], 0.4, color=color, alpha=0.45)
                if "fwd_bwd_ms" in pr:
                    ax_t.bar(i + 0.2, pr["fwd_bwd_ms"], 0.4, color=color)
                    ax_t.text(i + 0.2, pr["fwd_bwd_ms"], f"{pr['fwd_bwd_ms']:.3g}",
                              ha="center", va="bottom", fontsize=7)  # fmt: skip
                if "fwd_bwd_extra_gb" in pr:
                    ax_m.bar(i, pr["fwd_bwd_extra_gb"], 0.6, color=color)
            else:
                label = str(pr.get("status", "?"))
                label = "n/a" if label == "skipped" else label
                ax_t.text(i, 0.5, label, ha="center", va="center", rotation=90, fontsize=8,
                          transform=ax_t.get_xaxis_transform(), color="gray")  # fmt: skip
        ax_t.set_yscale("log")
        ax_t.set_title(f"{name}\n{c['source']}", fontsize=9)
        ax_t.set_ylabel("ms")
        if c["op"] != "pooled" and any("fwd_bwd_extra_gb" in p for p in c["paths"].values()):
            ax_m.axhline(c["nm_bf16_gb"], color="k", ls="--", lw=0.8)
        ax_m.set_ylabel("GB")
        for ax in (ax_t, ax_m):
            ax.set_xticks(list(x), names, rotation=30, fontsize=8)
            ax.set_xlim(-0.6, len(names) - 0.4)
    for idx in range(len(cases), rows * cols):
        r, col = divmod(idx, cols)
        axes[2 * r][col].axis("off")
        axes[2 * r + 1][col].axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- training memory


def _kernel_ops_seen(model, x) -> list[str]:
    """The mmt_fast custom ops a forward pass dispatches (empty: the layers do not call the
    kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "mmt_fast" in name:
                seen.add(name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        model(x)
    return sorted(seen)


PRECISIONS = ("bf16-autocast", "bf16-weights", "fp32")


def _train_step_once(
    device: torch.device, batch: int, model_name: str, precision: str
) -> dict[str, Any]:
    """Build the model, run two AdamW steps, return the second step's peak memory and time."""
    from mmt_fast import create_model

    res: dict[str, Any] = {"precision": precision}
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=309).to(device)
    cfg = model.cfg
    in_dtype = torch.float32
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
        in_dtype = torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.endswith("autocast"))  # fmt: skip
    with autocast:
        res["kernel_ops_seen"] = _kernel_ops_seen(
            model, torch.randn(2, cfg.in_chans, *cfg.input_size, device=device, dtype=in_dtype)
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_chans, *cfg.input_size, device=device, dtype=in_dtype)
    y = torch.randint(0, 309, (batch,), device=device)

    def step():
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    _sync(device)
    res["first_step_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    step()
    _sync(device)
    res["step_ms"] = (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["params_and_state_gb"] = base / 1e9
    res["status"] = "ok"
    return res


def train_memory(device: torch.device, batch: int, model_name: str = "MAT") -> dict[str, Any]:
    """Peak memory and time of one AdamW training step of
    ``create_model(model_name, num_classes=309)`` with MMT_FAST_KERNELS=reference and
    =triton: bf16 autocast over fp32 weights (the trainer's ``amp``); if that fails with an
    error other than OOM, bf16 weights without autocast, then fp32 (errors are recorded)."""
    out: dict[str, Any] = {
        "benchmark": "benchmarks.kernels --train-memory",
        "env": environment(device),
        "model": model_name,
        "batch": batch,
        "step": "AdamW, cross-entropy over 309 classes; peak of the second step (the first "
        "allocates optimizer state and compiles)",
        "modes": {},
    }
    for mode in ("reference", "triton"):
        res: dict[str, Any] = {}
        errors = {}
        for precision in PRECISIONS:
            try:
                with kernel_mode(mode):
                    res = _train_step_once(device, batch, model_name, precision)
                break
            except torch.OutOfMemoryError as e:
                res = {"precision": precision, "status": "OOM", "error": _short(e)}
                break
            except Exception as e:
                errors[precision] = _short(e)
                res = {"precision": precision, "status": "error", "error": _short(e)}
            finally:
                _free(device)
        if errors and res.get("status") == "ok":
            res["failed_precisions"] = errors
        out["modes"][mode] = res
        print(f"train step {model_name} batch {batch} {mode}: {res}", flush=True)
    ref, tri = out["modes"]["reference"], out["modes"]["triton"]
    if tri.get("status") == "ok" and not tri.get("kernel_ops_seen"):
        out["note"] = (
            "the model's layers did not dispatch to any mmt_fast kernel op: the 'triton' run "
            "is the reference path"
        )
    if ref.get("peak_gb") and tri.get("peak_gb"):
        out["triton_over_reference_peak"] = tri["peak_gb"] / ref["peak_gb"]
        out["target"] = "at most 0.5"
        out["target_met"] = out["triton_over_reference_peak"] <= 0.5
        if ref.get("precision") != tri.get("precision"):
            out["note"] = "reference and triton ran at different precisions: not comparable"
    return out


# ----------------------------------------------------------------------------- CLI


def _select(cases: dict[str, Case], wanted: Sequence[str] | None) -> dict[str, Case]:
    if not wanted:
        return cases
    unknown = [w for w in wanted if not any(n == w or n.startswith(w) for n in cases)]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(cases)}")
    return {n: c for n, c in cases.items() if any(n == w or n.startswith(w) for w in wanted)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the only mode on the CPU)")
    ap.add_argument("--check", action="store_true", help="correctness of every path vs fp64 only")
    ap.add_argument("--train-memory", action="store_true", help="MAT training-step memory only")
    ap.add_argument("--replot", type=Path, help="redraw the plot of an existing JSON")
    ap.add_argument("--summary", type=Path, help="print the summary of an existing JSON")
    ap.add_argument(
        "--out", type=Path, help=f"output folder (default {DEFAULT_OUT}; --small: none)"
    )
    ap.add_argument("--cases", nargs="*", help="case names or prefixes (default: all)")
    ap.add_argument("--paths", nargs="*", help="paths to time (default: all)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="stop starting cases after this")
    ap.add_argument("--mat-batch", type=int, default=64, help="MAT, MMT (and training) batch")
    ap.add_argument("--model", default="MAT", help="--train-memory: the model preset")
    ap.add_argument("--video-batch", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="run FlexAttention eagerly")
    args = ap.parse_args(argv)

    if args.summary:
        data = json.loads(args.summary.read_text())
        if "modes" in data:  # --train-memory
            for mode, r in data["modes"].items():
                keys = ("status", "peak_gb", "step_ms", "kernel_ops_seen", "error")
                print(f"train step {data['model']} batch {data['batch']} {mode}: "
                      + ", ".join(f"{k}={r[k]}" for k in keys if k in r))  # fmt: skip
            for k in ("triton_over_reference_peak", "target", "target_met", "note"):
                if k in data:
                    print(f"  {k}: {data[k]}")
        else:
            print_summary(data)
        return 0
    if args.replot:
        data = json.loads(args.replot.read_text())
        print(plot(data, args.replot.with_suffix(".png")))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: nothing to time (`--device cpu --small` checks the script on the CPU)")
        return 0
    device = torch.device(args.device)
    if device.type == "cpu":
        if not (args.small or args.check or args.train_memory):
            print("--device cpu runs only the tiny shapes: add --small")
            return 2
        # The kernels run through Triton's interpreter; set before any kernel is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if "kernels.relpos_attention" in sys.modules and os.environ["TRITON_INTERPRET"] == "0":
            print("TRITON_INTERPRET=0 on the CPU: the kernels cannot run")
            return 2
    # bf16 arithmetic is broken in the interpreter: the CPU runs fp32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_flex = device.type == "cuda" and not args.no_compile

    if args.train_memory:
        res = train_memory(device, args.mat_batch, args.model)
        _write_json((args.out or DEFAULT_OUT) / "kernels_train_memory.json", res)
        print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1, default=str))
        return 0

    if args.check or args.small:
        cases = _select(check_cases(device), args.cases)
        print(f"correctness: every path vs a float64 reference, {dtype}, {device}")
        rows = run_checks(device, dtype, cases, compile_flex, args.paths, verbose=True)
        failed = [r for r in rows if r["status"] in ("FAIL", "error")]
        if args.check:
            return 1 if failed else 0
        if failed:
            print(f"{len(failed)} path(s) failed the check; timing anyway")

    if args.small:
        cases = _select({n: c for n, c in small_cases().items() if n in SMALL_SUBSET}, args.cases)
        out_json = args.out / "kernels_small.json" if args.out else None
    else:
        cases = _select(real_cases(args.mat_batch, args.video_batch), args.cases)
        out_json = (args.out or DEFAULT_OUT) / "kernels.json"
    results = run_benchmarks(
        device,
        dtype,
        cases,
        out_json,
        compile_flex,
        args.budget_s,
        reps=1 if device.type == "cpu" else 3,
        paths=args.paths,
    )
    print_summary(results)
    if out_json:
        png = plot(results, out_json.with_suffix(".png"))
        print(f"\nwrote {out_json}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
