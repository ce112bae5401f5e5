"""AVBottleneck (Eq. 5-6): K pairs of Transformer blocks that fuse video and
audio tokens through L shared bottleneck tokens.

For each block k:
    [Ê_V, Ê_F] = Block_V([E_V, E_F])         (video tokens incl. CLS, then bottleneck)
    [Ê_F', Ê_A] = Block_A([Ê_F, E_A])        (the just-updated bottleneck, then audio)
and the next block takes E_V = Ê_V, E_A = Ê_A and E_F = Ê_F' (``update="sequential"``)
or the mean of Ê_F' over the blocks so far (``update="average"``).
Cost O((N+L)^2 + (M+L)^2) rather than O((N+M)^2) for concatenation.
"""

from __future__ import annotations

import torch
from torch import nn

from mmt_fast.config import BottleneckConfig
from mmt_fast.layers import BottleneckBlock, init_weights
from mmt_fast.models.checkpointing import check_mode, run_block


class AVBottleneck(nn.Module):
    """video: (B, 1+N, C), audio: (B, 1+M, C) -> (video, audio, bottleneck (B, L, C))."""

    def __init__(self, cfg: BottleneckConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))

        def block() -> BottleneckBlock:
            return BottleneckBlock(
                cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, 0.0, cfg.norm_eps
            )

        self.video_blocks = nn.ModuleList(block() for _ in range(cfg.num_blocks))
        self.audio_blocks = nn.ModuleList(block() for _ in range(cfg.num_blocks))
        self.checkpoint_blocks: frozenset[int] = frozenset()
        self.checkpoint_selective = False
        init_weights(self)
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def _set_checkpointing(self, mode: str) -> None:
        """``blocks`` and ``selective`` checkpoint every fusion block; ``stage1`` none
        of them (they run on the encoders' final, small token sets)."""
        on = check_mode(mode) in ("blocks", "selective")
        self.checkpoint_blocks = frozenset(range(2 * self.cfg.num_blocks)) if on else frozenset()
        self.checkpoint_selective = mode == "selective"

    def forward(self, video: torch.Tensor, audio: torch.Tensor):
        for name, t in (("video", video), ("audio", audio)):
            if t.ndim != 3 or t.shape[-1] != self.cfg.dim:
                raise ValueError(
                    f"AVBottleneck expects {name} tokens (B, N, {self.cfg.dim}), got {tuple(t.shape)}"
                )
        if video.shape[0] != audio.shape[0]:
            raise ValueError(f"batch sizes differ: video {video.shape[0]}, audio {audio.shape[0]}")
        f = self.tokens.expand(video.shape[0], -1, -1)
        total = None
        for k, (block_v, block_a) in enumerate(zip(self.video_blocks, self.audio_blocks)):
            video, f = run_block(self, block_v, 2 * k, video, f)
            audio, f = run_block(self, block_a, 2 * k + 1, audio, f)
            if self.cfg.update == "average":
                total = f if total is None else total + f
                f = total / (k + 1)
        return video, audio, f
