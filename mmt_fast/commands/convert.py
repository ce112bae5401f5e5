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


def main(args: argparse.Namespace) -> int:
    """``mmt-fast convert`` (arguments from :func:`mmt_fast.cli.build_parser`)."""
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
