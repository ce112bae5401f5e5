"""Audio Spectrogram Transformer (Gong, Chung, Glass, Interspeech 2021), the
baseline of Table 2: a ViT-B over overlapping 16x16 patches of the log-mel
spectrogram (stride 10 in frequency and time: 12 x 101 = 1212 patches at
128 x 1024), with CLS and distillation tokens (DeiT). The head averages the
two tokens, then LayerNorm + linear, as AST's code does.
"""

from __future__ import annotations

import torch
from torch import nn

from mmt_fast.config import ASTConfig, apply_overrides, ast_b
from mmt_fast.layers import Block, drop_path_rates, init_weights
from mmt_fast.models.checkpointing import apply_mode, run_block
from mmt_fast.models.mvit import EncoderFeatures


class AST(nn.Module):
    """x: (B, 1, F, T) log-mel -> logits (B, num_classes), or the embedding."""

    def __init__(self, num_classes: int = 0, cfg: ASTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ast_b()
        cfg = apply_overrides(cfg, {"num_classes": num_classes, **overrides})
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = nn.Conv2d(1, d, cfg.patch_size, stride=(cfg.fstride, cfg.tstride))
        self.num_patches = cfg.patch_grid[0] * cfg.patch_grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 2, d))
        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(
                d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], cfg.norm_eps, cfg.attn_impl
            )
            for i in range(cfg.depth)
        )
        self.checkpoint_blocks: frozenset[int] = frozenset()
        self.checkpoint_selective = False
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.num_features = d
        self.head = (
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.num_classes))
            if cfg.num_classes > 0
            else nn.Identity()
        )
        init_weights(self)
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def forward_features(self, x: torch.Tensor) -> EncoderFeatures:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(
                f"AST expects input (B, 1, {self.cfg.input_size[0]}, {self.cfg.input_size[1]}), got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        grid = tuple(x.shape[2:])
        if grid[0] * grid[1] != self.num_patches:
            raise ValueError(
                f"AST was built for input {self.cfg.input_size} ({self.num_patches} patches); "
                f"got {tuple(x.shape)} giving grid {grid}"
            )
        x = x.flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], 1)
        x = x + self.pos_embed
        for i, block in enumerate(self.blocks):
            x = run_block(self, block, i, x)
        x = self.norm(x)
        return EncoderFeatures(x, grid, (x[:, 0] + x[:, 1]) / 2)

    def _set_checkpointing(self, mode: str) -> None:
        """See :mod:`mmt_fast.models.checkpointing`; one resolution, so every
        block is in the first stage."""
        apply_mode(self, [0] * len(self.blocks), mode)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
