"""``mmt-fast convert``: one public checkpoint -> a safetensors file of an mmt-fast encoder.

The conversion itself is :func:`mmt_fast.pretrained.convert_state_dict` (see
:mod:`mmt_fast.pretrained` for the formats and the adaptations it reports).
Here the checkpoint is an argument the user gave, so a file that is missing,
unsafe to unpickle or does not fit the target model is reported as that
argument's problem: a :class:`~mmt_fast.errors.ConfigError` (exit code 2)
raised from the :class:`~mmt_fast.errors.CheckpointError`, turned into one
line by the CLI like every other command's errors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmt_fast.errors import CheckpointError, ConfigError

HELP = "convert a pretrained checkpoint (timm/SlowFast/torchvision MViTv2, AST, DeiT)"
DESCRIPTION = (
    "Map a public checkpoint onto an mmt-fast encoder and write it as safetensors (for "
    "model.init.audio / model.init.video). Nothing is downloaded."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("timm-mvitv2", "slowfast", "torchvision", "ast"),
        help="timm-mvitv2: timm mvitv2_* or MViT .pyth (ImageNet); slowfast: SlowFast MViTv2 "
        ".pyth; torchvision: mvit_v2_s state dict; ast: AST checkpoints or DeiT",
    )
    p.add_argument("--checkpoint", required=True, help=".pth / .pyth / .safetensors file")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--model",
        default=None,
        help="target encoder preset (default: MAT for timm-mvitv2, MViTv2-B-16 for slowfast, "
        "MViTv2-S-16 for torchvision, AST for ast)",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help="head of the target (default 0: encoder only, as inside MMT; a checkpoint head "
        "of the same size is copied)",
    )
    p.add_argument(
        "--source-grid",
        type=int,
        nargs=2,
        metavar=("F", "T"),
        help="(frequency, time) patch grid of an AST checkpoint's position embeddings, when "
        "neither 12 x 101 nor the model's own",
    )
    p.add_argument(
        "--non-strict",
        action="store_true",
        help="keep the model's initialisation (listed) for tensors that do not fit, instead of failing",
    )


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top, so that ``mmt-fast convert --help`` answers before torch
    from safetensors.torch import save_file

    from mmt_fast.config import ASTConfig, MultiscaleConfig, apply_overrides, get_config
    from mmt_fast.pretrained import DEFAULT_TARGET, convert_state_dict, read_checkpoint
    from mmt_fast.registry import build

    model_name = args.model or DEFAULT_TARGET[args.source]
    try:
        cfg = get_config(model_name)
    except KeyError as e:
        raise ConfigError(f"--model {e.args[0] if e.args else model_name}") from e
    if not isinstance(cfg, MultiscaleConfig | ASTConfig):
        raise ConfigError(
            f"--model {model_name}: name an encoder preset (MAT, AST, MViTv2-B-16, ...), not MMT"
        )
    cfg = apply_overrides(cfg, {"num_classes": args.num_classes})
    try:
        print(f"[1/3] reading {args.checkpoint}", flush=True)
        sd = read_checkpoint(args.checkpoint)
        print(f"[2/3] converting {len(sd)} tensors ({args.source}) into {model_name}", flush=True)
        model = build(cfg)
        grid = tuple(args.source_grid) if args.source_grid else None
        state, report = convert_state_dict(
            sd, model, args.source, not args.non_strict, grid, str(args.checkpoint)
        )
    except (FileNotFoundError, CheckpointError) as e:
        msg = str(e)
        if str(args.checkpoint) not in msg:
            msg = f"{args.checkpoint}: {msg}"
        raise ConfigError(msg) from e
    print(report.summary(), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[3/3] writing {out}", flush=True)
    meta = {
        "format": "mmt-fast",
        "model": model_name,
        "num_classes": str(args.num_classes),
        "report": json.dumps(report.to_dict()),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    return 0
