"""MMT: MAT + MViTv2-B + AVBottleneck + losses (and every ablation).

``MMT(cfg)(audio=(B, 1, 128, 1024), video=(B, 3, 16, 224, 224))`` returns an
:class:`MMTOutput`; ``model.loss(output, targets)`` gives Eq. 8 (or the
ablation's loss, by config). Inference uses ``output.logits`` only (p_AV).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmt_fast import losses
from mmt_fast.config import ASTConfig, MMTConfig, MultiscaleConfig
from mmt_fast.models.ast import AST
from mmt_fast.models.bottleneck import AVBottleneck
from mmt_fast.models.mvit import MultiscaleEncoder


@dataclass
class MMTOutput:
    """logits: head name -> (B, classes) (``"label"``, or ``"verb"``/``"noun"``);
    for fusion="avg" these are log of the averaged audio/video probabilities and
    ``branch_logits`` holds each branch's logits. ``*_embed``: (B, 256)
    L2-normalised projections g_A / g_V of the encoders' CLS tokens (None when
    no contrastive loss is configured); ``*_fused_embed``: the same after the
    AVBottleneck (IMAL only)."""

    logits: dict[str, torch.Tensor]
    audio_embed: torch.Tensor | None = None
    video_embed: torch.Tensor | None = None
    audio_fused_embed: torch.Tensor | None = None
    video_fused_embed: torch.Tensor | None = None
    branch_logits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _encoder(cfg: MultiscaleConfig | ASTConfig) -> nn.Module:
    return AST(cfg=cfg, num_classes=0) if isinstance(cfg, ASTConfig) else MultiscaleEncoder(cfg)


class _Heads(nn.Module):
    def __init__(self, dim: int, heads: dict[str, int]) -> None:
        super().__init__()
        self.fc = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in heads.items()})
        for m in self.fc.values():
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: fc(x) for k, fc in self.fc.items()}


class MMT(nn.Module):
    def __init__(self, cfg: MMTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = _encoder(cfg.audio) if cfg.audio is not None else None
        self.video_encoder = _encoder(cfg.video) if cfg.video is not None else None
        heads = cfg.heads
        lc = cfg.loss
        if cfg.fusion == "bottleneck":
            da, dv = self.audio_encoder.num_features, self.video_encoder.num_features
            if not (da == dv == cfg.bottleneck.dim):
                raise ValueError(
                    f"AVBottleneck width {cfg.bottleneck.dim} must equal the audio ({da}) and video ({dv}) widths"
                )
            self.bottleneck = AVBottleneck(cfg.bottleneck)
            self.norm_video = nn.LayerNorm(dv, eps=cfg.bottleneck.norm_eps)
            self.norm_audio = nn.LayerNorm(da, eps=cfg.bottleneck.norm_eps)
            self.head = _Heads(da + dv, heads)
        elif cfg.fusion == "avg":
            self.head_audio = _Heads(self.audio_encoder.num_features, heads)
            self.head_video = _Heads(self.video_encoder.num_features, heads)
        else:
            enc = self.audio_encoder or self.video_encoder
            self.head = _Heads(enc.num_features, heads)
        self.proj_audio = self.proj_video = None
        if lc.align is not None or lc.intra is not None:
            if self.audio_encoder is not None:
                self.proj_audio = nn.Linear(self.audio_encoder.num_features, lc.proj_dim)
            if self.video_encoder is not None:
                self.proj_video = nn.Linear(self.video_encoder.num_features, lc.proj_dim)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(
            m
            for m, e in (("audio", self.audio_encoder), ("video", self.video_encoder))
            if e is not None
        )

    def forward(
        self, audio: torch.Tensor | None = None, video: torch.Tensor | None = None
    ) -> MMTOutput:
        for name in self.modalities:
            if {"audio": audio, "video": video}[name] is None:
                raise ValueError(f"this model ({self.cfg.fusion} fusion) needs the {name} input")
        fa = self.audio_encoder.forward_features(audio) if self.audio_encoder is not None else None
        fv = self.video_encoder.forward_features(video) if self.video_encoder is not None else None
        out = MMTOutput(logits={})
        if self.proj_audio is not None:
            out.audio_embed = losses.normalize(self.proj_audio(fa.cls))
        if self.proj_video is not None:
            out.video_embed = losses.normalize(self.proj_video(fv.cls))
        if self.cfg.fusion == "bottleneck":
            ev, ea, _ = self.bottleneck(fv.tokens, fa.tokens)
            cls_v, cls_a = self.norm_video(ev[:, 0]), self.norm_audio(ea[:, 0])
            out.logits = self.head(torch.cat([cls_v, cls_a], dim=-1))
            if self.cfg.loss.intra == "instance":
                out.audio_fused_embed = losses.normalize(self.proj_audio(cls_a))
                out.video_fused_embed = losses.normalize(self.proj_video(cls_v))
        elif self.cfg.fusion == "avg":
            la, lv = self.head_audio(fa.cls), self.head_video(fv.cls)
            out.branch_logits = {"audio": la, "video": lv}
            out.logits = {
                k: torch.log((la[k].float().softmax(-1) + lv[k].float().softmax(-1)) / 2)
                for k in la
            }
        else:
            out.logits = self.head((fa or fv).cls)
        return out

    def loss(
        self, out: MMTOutput, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 8 (or the ablation's loss). targets: head name -> (B,) int64.
        Returns the total and its parts as floats (for logging)."""
        lc = self.cfg.loss
        if self.cfg.fusion == "avg":
            cls = losses.classification_loss(
                out.branch_logits["audio"], targets
            ) + losses.classification_loss(out.branch_logits["video"], targets)
        else:
            cls = losses.classification_loss(out.logits, targets)
        total = cls
        parts = {"cls": float(cls.detach())}
        labels = torch.stack([targets[k] for k in self.cfg.heads], dim=-1)
        if lc.align is not None and out.audio_embed is not None and out.video_embed is not None:
            if lc.align == "supervised":
                la = losses.avc_loss(out.audio_embed, out.video_embed, labels, lc.temperature)
            else:
                la = losses.al_loss(out.audio_embed, out.video_embed, lc.temperature)
            total = total + lc.lambda_align * la
            parts["avc" if lc.align == "supervised" else "al"] = float(la.detach())
        if lc.intra is not None:
            terms = []
            for m in self.modalities:
                emb = getattr(out, f"{m}_embed")
                if lc.intra == "supervised":
                    terms.append(losses.imc_loss(emb, labels, lc.temperature))
                else:
                    terms.append(
                        losses.imal_loss(emb, getattr(out, f"{m}_fused_embed"), lc.temperature)
                    )
            li = sum(terms) / len(terms)
            total = total + lc.lambda_intra * li
            parts["imc" if lc.intra == "supervised" else "imal"] = float(li.detach())
        parts["total"] = float(total.detach())
        return total, parts

    def no_weight_decay(self) -> set[str]:
        return {
            n
            for n, _ in self.named_parameters()
            if any(
                s in n
                for s in ("rel_pos", "cls_token", "dist_token", "pos_embed", "bottleneck.tokens")
            )
        }
