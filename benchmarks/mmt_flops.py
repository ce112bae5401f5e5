"""Readings of the paper's MMT FLOP count (206 GFLOPs, Table 2), each counted
with the same counter as the main job (fvcore, one multiply-add = one FLOP,
batch 1, attention included).

    python -m benchmarks.mmt_flops [--json out.json]

The MMT model is traced once; its per-module totals give the audio encoder,
the video encoder, the AVBottleneck and the rest (heads, norms,
projections). A reading replaces one part with its own count:
- which tokens enter the AVBottleneck (the encoders' final tokens, or the
  third stage's, 4x as many);
- what K = 4 counts (4 pairs of blocks, or 4 blocks in all);
- fusion by a bottleneck, or joint attention over the concatenated tokens;
- what "16 frames" covers (16 input frames, temporal patch stride 2, i.e.
  8 temporal tokens; or 16 temporal tokens from a 32-frame clip).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from mmt_fast import create_model
from mmt_fast.config import BottleneckConfig
from mmt_fast.layers import Block
from mmt_fast.models.bottleneck import AVBottleneck
from mmt_fast.models.mvit import MultiscaleEncoder
from mmt_fast.profiling import count_flops

PAPER_GFLOPS = 206.0
AUDIO = (1, 128, 1024)
VIDEO = (3, 16, 224, 224)


class _Fusion(nn.Module):
    """Bottleneck fusion over given token sets (returns a tensor for fvcore)."""

    def __init__(self, cfg: BottleneckConfig) -> None:
        super().__init__()
        self.avb = AVBottleneck(cfg)

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        v, a, _ = self.avb(video, audio)
        return v[:, 0] + a[:, 0]


class _Joint(nn.Module):
    """K Transformer blocks over the concatenated [video; audio] tokens."""

    def __init__(self, cfg: BottleneckConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias)
            for _ in range(cfg.num_blocks)
        )

    def forward(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        x = torch.cat([video, audio], dim=1)
        for b in self.blocks:
            x = b(x)
        return x[:, 0]


def fusion_gflops(module: nn.Module, n_video: int, n_audio: int, dim: int) -> float:
    inputs = {"video": torch.randn(1, n_video, dim), "audio": torch.randn(1, n_audio, dim)}
    return count_flops(module, inputs)["total"] / 1e9


def _tokens(enc: MultiscaleEncoder, stage: int) -> int:
    """Tokens of ``enc``'s ``stage`` (CLS included)."""
    first = next(i for i, s in enumerate(enc.stage_of_block) if s == stage)
    grid = enc.token_grids()[first + 1]
    n = 1
    for g in grid:
        n *= g
    return n + int(enc.cfg.use_cls_token)


def _video_32_frames(cfg, audio_tokens: int) -> dict:
    """The reading where "16 frames" means 16 temporal tokens: a 32-frame clip."""
    bc = cfg.bottleneck
    v32 = dataclasses.replace(cfg.video, input_size=(32, *cfg.video.input_size[1:]))
    enc32 = MultiscaleEncoder(v32)
    video32 = count_flops(enc32, (torch.randn(1, 3, *v32.input_size),))["total"] / 1e9
    nv32 = _tokens(enc32, 3)
    return {
        "reading": '"16 frames" = 16 temporal tokens (32-frame clip)',
        "avbottleneck_tokens": f"video {nv32}, audio {audio_tokens}",
        "video_encoder": video32,
        "fusion": fusion_gflops(_Fusion(bc), nv32, audio_tokens, bc.dim),
    }


def readings(progress=print) -> dict:
    t0 = time.time()
    mmt = create_model("MMT")
    cfg = mmt.cfg
    parts = ("audio_encoder", "video_encoder", "bottleneck")
    f = count_flops(
        mmt, {"audio": torch.randn(1, *AUDIO), "video": torch.randn(1, *VIDEO)}, modules=parts
    )
    total = f["total"] / 1e9
    audio, video, avb = (f[f"module:{p}"] / 1e9 for p in parts)
    rest = total - audio - video - avb
    progress(f"MMT traced: {total:.1f} GFLOPs [{time.time() - t0:.0f} s]")

    bc = cfg.bottleneck
    nv, na = _tokens(mmt.video_encoder, 3), _tokens(mmt.audio_encoder, 3)
    nv3, na3 = _tokens(mmt.video_encoder, 2), _tokens(mmt.audio_encoder, 2)
    rows = [
        {
            "reading": "literal (default): final tokens, K = 4 pairs, 16 input frames",
            "avbottleneck_tokens": f"video {nv}, audio {na} (+{bc.num_tokens} bottleneck)",
            "video_encoder": video,
            "fusion": avb,
        }
    ]
    half = dataclasses.replace(bc, num_blocks=bc.num_blocks // 2)
    rows.append(
        {
            "reading": "K = 4 blocks in all (2 video + 2 audio)",
            "avbottleneck_tokens": f"video {nv}, audio {na}",
            "video_encoder": video,
            "fusion": fusion_gflops(_Fusion(half), nv, na, bc.dim),
        }
    )
    rows.append(
        {
            "reading": "third-stage tokens enter the AVBottleneck (at width 768)",
            "avbottleneck_tokens": f"video {nv3}, audio {na3}",
            "video_encoder": video,
            "fusion": fusion_gflops(_Fusion(bc), nv3, na3, bc.dim),
        }
    )
    progress(f"bottleneck readings counted [{time.time() - t0:.0f} s]")
    rows.append(
        {
            "reading": "joint attention over [video; audio], K = 4 blocks (no bottleneck)",
            "avbottleneck_tokens": f"{nv + na} concatenated",
            "video_encoder": video,
            "fusion": fusion_gflops(_Joint(bc), nv, na, bc.dim),
        }
    )
    rows.append(_video_32_frames(cfg, na))
    progress(f"32-frame video encoder counted [{time.time() - t0:.0f} s]")
    for r in rows:
        r["audio_encoder"] = audio
        r["rest"] = rest
        r["total"] = audio + r["video_encoder"] + r["fusion"] + rest
        r["vs_paper"] = (r["total"] - PAPER_GFLOPS) / PAPER_GFLOPS
    return {
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "flops_convention": "fvcore: one multiply-add = one FLOP; batch 1; attention counted",
        "paper_gflops": PAPER_GFLOPS,
        "mmt_traced_gflops": total,
        "rows": rows,
    }


def format_table(data: dict) -> str:
    head = f"{'reading':<68}{'video':>8}{'fusion':>8}{'total':>8}{'vs 206':>8}"
    lines = [head, "-" * len(head)]
    for r in data["rows"]:
        lines.append(
            f"{r['reading']:<68}{r['video_encoder']:>8.1f}{r['fusion']:>8.1f}"
            f"{r['total']:>8.1f}{100 * r['vs_paper']:>+7.1f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.mmt_flops", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", type=Path, help="write the readings as JSON here")
    args = ap.parse_args(argv)
    data = readings()
    print(format_table(data))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
