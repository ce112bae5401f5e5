"""The paths each case is timed on: the fused op and the PyTorch alternatives.

* ``fused``: the op in ``kernels/`` with ``MMT_FAST_KERNELS=triton``;
* ``reference``: the op's PyTorch reference (``*_ref``) in eager mode;
* ``sdpa``: ``F.scaled_dot_product_attention``; for rel-pos attention with the
  (B, H, Nq, Nk) bias materialised as a tensor mask, for bottleneck attention over
  the concatenated segments;
* ``flex``: ``torch.compile(flex_attention)``; for rel-pos attention a ``score_mod``
  adds ``relq_a[b, h, q_idx, coord_a(kv_idx)]`` from the same small per-axis
  tensors the fused kernel reads (no bias on the CLS row and column);
* ``xformers``: ``memory_efficient_attention`` with a tensor bias, when xformers
  imports (xformers 0.0.35 beside torch 2.11: its own CUDA extension does not load, so
  this runs PyTorch's CUTLASS kernel through xformers' dispatcher, ``cutlassF-pt``);
* ``compiled`` (pooled Q/K/V): ``torch.compile`` of the reference.

The residual ``+ q`` of rel-pos attention is added outside the op for every
alternative. Every path returns the op's outputs as a tuple.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from benchmarks.kernels.cases import Inputs

PATHS = {
    "relpos": ("fused", "reference", "sdpa", "flex", "xformers"),
    "bottleneck": ("fused", "reference", "sdpa", "flex", "xformers"),
    "pooled": ("fused", "reference", "compiled"),
}
# Paths compiled by torch.compile on CUDA: the correctness check runs them eagerly (the
# same function; compiling at the check's shape as well would double the compile time).
COMPILED_PATHS = ("flex", "compiled")


def kernel_mode(mode: str):
    """Set ``MMT_FAST_KERNELS`` (``triton`` / ``reference``) for the duration."""
    from mmt_fast.kernels import dispatch

    return dispatch.use(mode)


def relq_axes(
    q_sp: torch.Tensor, tables: Sequence[torch.Tensor], q_grid: Sequence[int], k_grid: Sequence[int]
) -> list[torch.Tensor]:
    """relq_a[b, h, i, y] = q_i . R_a[dist_a(i_a, y)]: one (B, H, prod(q_grid), k_grid[a]) per axis.

    The decomposition the fused kernel reads (``bias[i, j] = sum_a relq_a[i, j_a]``).
    """
    from mmt_fast.kernels.relpos_attention import rel_pos_index

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
_COMPILED: dict[Callable, Callable] = {}


def _raise_recompile_limits() -> None:
    import torch._dynamo

    # One compiled variant per case shape and score_mod closure.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def compiled_fn(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, once per process."""
    if fn not in _COMPILED:
        _raise_recompile_limits()
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def flex_fn(compiled: bool) -> Callable:
    """flex_attention, compiled once per process (eager on the CPU: compiling is slow there)."""
    if compiled not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        if compiled:
            _raise_recompile_limits()
            _FLEX[compiled] = torch.compile(flex_attention, dynamic=False)
        else:
            _FLEX[compiled] = _quiet_eager(flex_attention)
    return _FLEX[compiled]


# Eager FlexAttention warns on every call that it materialises the scores; the CLI says
# it once instead (``EAGER_FLEX_NOTE``).
EAGER_FLEX_NOTE = "FlexAttention runs eagerly (unfused: it materialises the scores)"


def _quiet_eager(flex_attention: Callable) -> Callable:
    import warnings

    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    return run


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
    """A closure running ``path`` on ``inp``: returns the op's outputs as a tuple.

    ``compile_flex``: compile the ``flex`` and ``compiled`` paths (False: run them eagerly).
    """
    c, t = inp.case, inp.leaves
    if forward_only(path, inp):
        t = {k: v.detach() for k, v in t.items()}
    if c.op == "relpos":
        return _relpos_path(path, c, t, compile_flex)
    if c.op == "bottleneck":
        return _bottleneck_path(path, c, t, compile_flex)
    return _pooled_qkv_path(path, c, t, compile_flex)


def _relpos_path(path: str, c, t: dict, compile_flex: bool) -> Callable[[], tuple]:
    from mmt_fast.kernels.relpos_attention import relpos_attention, relpos_attention_ref

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


def _bottleneck_path(path: str, c, t: dict, compile_flex: bool) -> Callable[[], tuple]:
    from mmt_fast.kernels.bottleneck_attention import (
        bottleneck_attention,
        bottleneck_attention_ref,
    )

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


def _pooled_qkv_path(path: str, c, t: dict, compile_flex: bool) -> Callable[[], tuple]:
    from mmt_fast.kernels.pooled_qkv import pooled_qkv, pooled_qkv_ref

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
    if path == "compiled":
        ref = compiled_fn(pooled_qkv_ref) if compile_flex else pooled_qkv_ref
        return lambda: tuple(ref(*args)[:3])
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
    if path == "compiled" and device.type != "cuda":
        return "torch.compile is not run on the CPU (the eager reference is timed already)"
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
