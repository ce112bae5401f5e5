"""Multiscale encoders: MAT (audio, 2-D frequency x time grid) and MViTv2
(video, 3-D time x height x width grid) share :class:`MultiscaleEncoder`.

Input (B, in_chans, *input_size): for MAT a log-mel spectrogram
(B, 1, 128, 1024) = (batch, channel, mel bins, frames); for video
(B, 3, 16, 224, 224). Blocks are numbered 0..sum(depths)-1 as in Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmt_fast.config import MultiscaleConfig, apply_overrides, mat_b, mvitv2_b_16
from mmt_fast.layers import MultiScaleBlock, drop_path_rates, init_weights, pooled_grid
from mmt_fast.models.checkpointing import apply_mode, run_block

Grid = tuple[int, ...]


@dataclass
class EncoderFeatures:
    """tokens: (B, has_cls + prod(grid), C) after the final LayerNorm; grid: the
    final token grid; cls: (B, C), the CLS token (or the mean token without one)."""

    tokens: torch.Tensor
    grid: Grid
    cls: torch.Tensor


class MultiscaleEncoder(nn.Module):
    """MViTv2-style encoder over a 2-D or 3-D input (see :class:`MultiscaleConfig`)."""

    def __init__(self, cfg: MultiscaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nd = len(cfg.input_size)
        if nd not in (2, 3):
            raise ValueError(f"input_size must be 2-D or 3-D, got {cfg.input_size}")
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.patch_embed = conv(
            cfg.in_chans,
            cfg.embed_dim[0],
            cfg.patch_kernel,
            stride=cfg.patch_stride,
            padding=cfg.patch_padding,
        )
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, cfg.embed_dim[0])) if cfg.use_cls_token else None
        )

        total = sum(cfg.depths)
        dpr = drop_path_rates(cfg.drop_path_rate, total)
        self.blocks = nn.ModuleList()
        self.stage_of_block: list[int] = []
        grid = cfg.patch_grid
        self.grids: list[Grid] = [grid]  # token grid after the patch embedding and after each block
        dim = cfg.embed_dim[0]
        for s, depth in enumerate(cfg.depths):
            for i in range(depth):
                stride_q = cfg.stride_q[s] if i == 0 else (1,) * nd
                block = MultiScaleBlock(
                    dim,
                    cfg.embed_dim[s],
                    cfg.num_heads[s],
                    grid,
                    cfg.kernel_qkv,
                    stride_q,
                    cfg.stride_kv[s],
                    mlp_ratio=cfg.mlp_ratio,
                    has_cls=cfg.use_cls_token,
                    rel_pos=cfg.rel_pos,
                    residual_pooling=cfg.residual_pooling,
                    residual_cls=cfg.residual_cls,
                    qkv_bias=cfg.qkv_bias,
                    drop_path=dpr[len(self.blocks)],
                    eps=cfg.norm_eps,
                )
                self.blocks.append(block)
                self.stage_of_block.append(s)
                grid = pooled_grid(grid, cfg.kernel_qkv, stride_q)
                self.grids.append(grid)
                dim = cfg.embed_dim[s]
        self.num_features = dim
        self.checkpoint_blocks: frozenset[int] = frozenset()
        self.checkpoint_selective = False
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        init_weights(self)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        want = 2 + len(cfg.input_size)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.ndim != want or x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {cfg.in_chans}, "
                f"{', '.join(map(str, cfg.input_size))}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        small = [n for n, k in zip(x.shape[2:], cfg.patch_kernel) if n < k // 2 + 1]
        if small:
            raise ValueError(
                f"input {tuple(x.shape)} is too small for patch kernel {cfg.patch_kernel}"
            )

    def forward_features(self, x: torch.Tensor) -> EncoderFeatures:
        """x: (B, in_chans, *input) -> normalised tokens, final grid and CLS."""
        self._check_input(x)
        x = self.patch_embed(x)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for i, block in enumerate(self.blocks):
            x, grid = run_block(self, block, i, x, grid)
        x = self.norm(x)
        cls = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return EncoderFeatures(x, grid, cls)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS embedding (B, C) (mean of the tokens if there is no CLS)."""
        return self.forward_features(x).cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes), or the embedding (B, C) when num_classes == 0."""
        return self.head(self.head_drop(self.embed(x)))

    def _set_checkpointing(self, mode: str) -> None:
        """See :mod:`mmt_fast.models.checkpointing` (``none``, ``blocks``, ``stage1``,
        ``selective``)."""
        apply_mode(self, self.stage_of_block, mode)

    def token_grids(self) -> list[Grid]:
        """The token grid after the patch embedding and after each block."""
        return list(self.grids)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "rel_pos" in n or "cls_token" in n}


class MAT(MultiscaleEncoder):
    """Multiscale Audio Transformer (Table 1), a drop-in audio encoder.

    ``MAT(num_classes=309)`` maps a (B, 1, 128, 1024) log-mel spectrogram
    (mel bins x frames) to logits; ``.embed(x)`` gives the CLS embedding (B, 768)
    and ``.forward_features(x).tokens`` the token sequence (B, 1 + 8*32, 768).
    Any other field of :class:`MultiscaleConfig` can be overridden by keyword,
    or a whole config passed as ``cfg``.
    """

    def __init__(
        self, num_classes: int = 0, cfg: MultiscaleConfig | None = None, **overrides
    ) -> None:
        cfg = cfg if cfg is not None else mat_b()
        cfg = apply_overrides(cfg, {"num_classes": num_classes, **overrides})
        if len(cfg.input_size) != 2:
            raise ValueError(
                f"MAT takes a 2-D (frequency, time) input, got input_size={cfg.input_size}"
            )
        super().__init__(cfg)


class MViTv2(MultiscaleEncoder):
    """The video encoder: MViTv2-B over (B, 3, 16, 224, 224) clips by default."""

    def __init__(
        self, num_classes: int = 0, cfg: MultiscaleConfig | None = None, **overrides
    ) -> None:
        cfg = cfg if cfg is not None else mvitv2_b_16()
        cfg = apply_overrides(cfg, {"num_classes": num_classes, **overrides})
        if len(cfg.input_size) != 3:
            raise ValueError(
                f"MViTv2 takes a 3-D (time, height, width) input, got {cfg.input_size}"
            )
        super().__init__(cfg)
