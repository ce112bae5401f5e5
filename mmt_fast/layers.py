"""Transformer layers shared by every encoder of mmt-fast.

All attention, pooling and relative-position code of the models lives here,
and reaches the three fused ops of :mod:`mmt_fast.kernels` (each dispatching to its
Triton kernel or its PyTorch reference, see :mod:`mmt_fast.kernels.dispatch`):

- :class:`MultiScaleAttention` / :class:`MultiScaleBlock`: MViTv2's pooling
  attention (MAT, Eq. 1-2, and the video MViTv2-B), with decomposed relative
  position over a 2-D (frequency x time) or 3-D (time x height x width) grid
  and residual pooling.
- :class:`Attention` / :class:`Block`: plain ViT attention (AST).
- :class:`BottleneckBlock`: a ViT block over [modality tokens, bottleneck
  tokens] (AVBottleneck, Eq. 5-6) that never concatenates the two.

The reference paths are written with explicit matmuls and einsums so that
fvcore counts them; the fused ops' custom ops have fvcore handles in
:mod:`mmt_fast.profiling`. The layer structure follows timm's ``mvitv2.py`` (read to
check facts; this is our own code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmt_fast.kernels.bottleneck_attention import bottleneck_attention
from mmt_fast.kernels.pooled_qkv import pooled_qkv
from mmt_fast.kernels.relpos_attention import relpos_attention

Grid = tuple[int, ...]


def prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over n blocks
    (plain Python so that model construction works under FakeTensorMode)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def pooled_grid(grid: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> Grid:
    """Grid after a convolution/pooling with padding ``kernel // 2``."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(grid, kernel, stride))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval time or when p == 0)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- relative position


def resize_rel_table(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """The table for (q_size, k_size), linearly interpolated when it was made
    for another grid (MViTv2's ``get_rel_pos``). table: (L, D) -> (2 max - 1, D)."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t()[None], size=length, mode="linear", align_corners=False)
    return resized[0].t()


# ----------------------------------------------------------------------------- multiscale attention


def _conv(nd: int):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]


def _maxpool(nd: int):
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[nd]


def pool_tokens(
    x: torch.Tensor, pool: nn.Module | None, grid: Grid, has_cls: bool
) -> tuple[torch.Tensor, Grid]:
    """Pool the spatial tokens of x: (B, H, N, D) over ``grid``; CLS stays."""
    if pool is None:
        return x, grid
    B, H, _N, D = x.shape
    sp = int(has_cls)
    cls_tok, spatial = x[:, :, :sp], x[:, :, sp:]
    spatial = spatial.reshape(B * H, *grid, D).movedim(-1, 1)
    spatial = pool(spatial)
    new_grid = tuple(spatial.shape[2:])
    spatial = spatial.reshape(B, H, D, -1).transpose(2, 3)
    return torch.cat([cls_tok, spatial], dim=2) if sp else spatial, new_grid


def residual_add(out: torch.Tensor, q: torch.Tensor, has_cls: bool, residual_cls: bool):
    """Residual pooling: out + q, (B, H, Nq, D); the CLS row gets no "+ q" when
    ``has_cls and not residual_cls``.

    Done here rather than inside the fused attention op (which can add it too) so
    that the op has one output the backward needs: under selective recomputation
    (:mod:`mmt_fast.models.checkpointing`) the op's output is kept and this add is
    recomputed, instead of keeping both the output and the output before the add.
    """
    if has_cls and not residual_cls:
        return torch.cat([out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]], dim=2)
    return out + q


class MultiScaleAttention(nn.Module):
    """Pooling attention of MViTv2 / MAT (Eq. 1-2).

    x: (B, N, dim) with N = has_cls + prod(grid) -> (B, Nq, dim_out), q_grid.
    Per head: Q = LN(P_Q(x W_Q)), K = LN(P_K(x W_K)), V = LN(P_V(x W_V)) with
    depthwise conv pooling shared across heads;
    out = softmax(Q K^T / sqrt(d) + E_rel) V + Q, then a linear projection.
    With ``residual_cls=False`` the CLS row gets no "+ Q" (SlowFast's video
    MViTv2); True adds it on every row (timm's image MViTv2).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_grid: Grid,
        kernel_qkv: Grid,
        stride_q: Grid,
        stride_kv: Grid,
        has_cls: bool = True,
        rel_pos: bool = True,
        residual_pooling: bool = True,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        residual_cls: bool = True,
    ) -> None:
        super().__init__()
        nd = len(input_grid)
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.head_dim = dim_out // num_heads
        self.scale = self.head_dim**-0.5
        self.has_cls = has_cls
        self.residual_pooling = residual_pooling
        self.residual_cls = residual_cls
        self.kernel = tuple(kernel_qkv)
        self.stride_q = tuple(stride_q)
        self.stride_kv = tuple(stride_kv)
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)

        def make_pool(stride: Grid) -> nn.Module | None:
            if prod(self.kernel) == 1 and prod(stride) == 1:
                return None
            return _conv(nd)(
                self.head_dim,
                self.head_dim,
                self.kernel,
                stride=stride,
                padding=tuple(k // 2 for k in self.kernel),
                groups=self.head_dim,
                bias=False,
            )

        self.pool_q = make_pool(self.stride_q)
        self.pool_k = make_pool(self.stride_kv)
        self.pool_v = make_pool(self.stride_kv)
        self.norm_q = nn.LayerNorm(self.head_dim, eps=eps) if self.pool_q else nn.Identity()
        self.norm_k = nn.LayerNorm(self.head_dim, eps=eps) if self.pool_k else nn.Identity()
        self.norm_v = nn.LayerNorm(self.head_dim, eps=eps) if self.pool_v else nn.Identity()

        self.q_grid_init = pooled_grid(input_grid, self.kernel, self.stride_q)
        self.k_grid_init = pooled_grid(input_grid, self.kernel, self.stride_kv)
        self.rel_pos = nn.ParameterList()
        if rel_pos:
            for qa, ka in zip(self.q_grid_init, self.k_grid_init):
                table = nn.Parameter(torch.zeros(2 * max(qa, ka) - 1, self.head_dim))
                nn.init.trunc_normal_(table, std=0.02)
                self.rel_pos.append(table)

    def project(self, x: torch.Tensor, grid: Grid):
        """Pooled, normalised heads: q (B, H, Nq, d), k, v (B, H, Nk, d), q_grid, k_grid."""
        if self.pool_q is not None and self.pool_k is not None:
            return pooled_qkv(
                x,
                self.qkv.weight,
                self.qkv.bias,
                grid,
                self.has_cls,
                self.num_heads,
                (self.pool_q.weight, self.pool_k.weight, self.pool_v.weight),
                (self.stride_q, self.stride_kv),
                (
                    (self.norm_q.weight, self.norm_q.bias),
                    (self.norm_k.weight, self.norm_k.bias),
                    (self.norm_v.weight, self.norm_v.bias),
                ),
                self.norm_q.eps,
            )
        # kernel-1, stride-1 pooling (no pooling at all): plain projection
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, q_grid = pool_tokens(q, self.pool_q, grid, self.has_cls)
        k, k_grid = pool_tokens(k, self.pool_k, grid, self.has_cls)
        v, _ = pool_tokens(v, self.pool_v, grid, self.has_cls)
        return self.norm_q(q), self.norm_k(k), self.norm_v(v), q_grid, k_grid

    def tables(self, q_grid: Grid, k_grid: Grid, dtype: torch.dtype) -> list[torch.Tensor]:
        """The rel-pos tables for these grids, in the dtype of q (under autocast
        q is 16-bit while the tables stay fp32 parameters)."""
        return [
            resize_rel_table(t, qa, ka).to(dtype) for t, qa, ka in zip(self.rel_pos, q_grid, k_grid)
        ]

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        B = x.shape[0]
        q, k, v, q_grid, k_grid = self.project(x, grid)
        out = relpos_attention(
            q,
            k,
            v,
            self.tables(q_grid, k_grid, q.dtype),
            q_grid,
            k_grid,
            self.has_cls,
            self.scale,
            residual=False,
        )
        if self.residual_pooling:
            out = residual_add(out, q, self.has_cls, self.residual_cls)
        out = out.transpose(1, 2).reshape(B, -1, self.dim_out)
        return self.proj(out), q_grid


class MultiScaleBlock(nn.Module):
    """One MAT/MViTv2 block (Eq. 1-2): A' = MMSA(LN(A)) + P(A); out = MLP(LN(A')) + A'.

    When the width changes, the residual path is projected from LN(A) (MViTv2
    with ``expand_attn``); when the queries are pooled, so is the residual
    (max pooling, kernel stride + 1).
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        input_grid: Grid,
        kernel_qkv: Grid,
        stride_q: Grid,
        stride_kv: Grid,
        mlp_ratio: float = 4.0,
        has_cls: bool = True,
        rel_pos: bool = True,
        residual_pooling: bool = True,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        residual_cls: bool = True,
    ) -> None:
        super().__init__()
        nd = len(input_grid)
        self.has_cls = has_cls
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.shortcut_proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        if prod(stride_q) > 1:
            k_skip = tuple(s + 1 if s > 1 else s for s in stride_q)
            self.shortcut_pool = _maxpool(nd)(k_skip, stride_q, tuple(k // 2 for k in k_skip))
        else:
            self.shortcut_pool = None
        self.attn = MultiScaleAttention(
            dim,
            dim_out,
            num_heads,
            input_grid,
            kernel_qkv,
            stride_q,
            stride_kv,
            has_cls=has_cls,
            rel_pos=rel_pos,
            residual_pooling=residual_pooling,
            qkv_bias=qkv_bias,
            eps=eps,
            residual_cls=residual_cls,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.output_grid = self.attn.q_grid_init

    def _shortcut(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        if self.shortcut_pool is None:
            return x
        B, _, C = x.shape
        sp = int(self.has_cls)
        cls_tok, spatial = x[:, :sp], x[:, sp:]
        spatial = spatial.reshape(B, *grid, C).movedim(-1, 1)
        spatial = self.shortcut_pool(spatial).reshape(B, C, -1).transpose(1, 2)
        return torch.cat([cls_tok, spatial], dim=1) if sp else spatial

    def forward(self, x: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, Grid]:
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj is None else self.shortcut_proj(x_norm)
        shortcut = self._shortcut(shortcut, grid)
        attn, new_grid = self.attn(x_norm, grid)
        x = shortcut + self.drop_path(attn)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, new_grid


# ----------------------------------------------------------------------------- plain attention


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """softmax(q k^T * scale) v for q: (B, H, Nq, D), k, v: (B, H, Nk, D), with
    explicit matmuls so that fvcore counts them (AST, the baseline)."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention (ViT). x: (B, N, dim) -> (B, N, dim).

    ``impl="eager"``: explicit matmuls and softmax (the (N x N) probabilities
    are stored for the backward pass, as published ViT/AST code does);
    ``"sdpa"``: ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels where available: no N x N tensor is stored).
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, impl: str = "eager"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"attention impl {impl!r}: expected 'eager' or 'sdpa'")
        self.impl = impl
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        B, H, N, D = x.shape
        return self.proj(x.transpose(1, 2).reshape(B, N, H * D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        if self.impl == "sdpa":
            return self.merge(F.scaled_dot_product_attention(q, k, v, scale=self.scale))
        return self.merge(attention_torch(q, k, v, self.scale))


class Block(nn.Module):
    """Pre-LN Transformer block: x + MSA(LN(x)), then + MLP(LN(.))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        attn_impl: str = "eager",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_impl)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BottleneckBlock(Block):
    """A :class:`Block` over the sequence [main tokens, bottleneck tokens]
    (Eq. 5-6) computed without concatenating them: the per-token LayerNorm,
    projections and MLP run on each segment; only attention mixes them.

    x: (B, N, dim), f: (B, L, dim) -> the updated (x, f).
    """

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_m, k_m, v_m = self.attn.heads(self.norm1(x))
        q_e, k_e, v_e = self.attn.heads(self.norm1(f))
        o_m, o_e = bottleneck_attention(q_m, k_m, v_m, q_e, k_e, v_e, self.attn.scale)
        x = x + self.drop_path(self.attn.merge(o_m))
        f = f + self.drop_path(self.attn.merge(o_e))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        f = f + self.drop_path(self.mlp(self.norm2(f)))
        return x, f


def init_weights(module: nn.Module) -> None:
    """timm's ViT/MViTv2 init: truncated normal (std 0.02) linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = [
    "Attention",
    "Block",
    "BottleneckBlock",
    "DropPath",
    "Mlp",
    "MultiScaleAttention",
    "MultiScaleBlock",
    "init_weights",
    "pooled_grid",
    "resize_rel_table",
]
