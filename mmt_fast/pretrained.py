"""Start from pretrained weights: converters from the public checkpoints.

The paper initialises MAT from ImageNet MViTv2-B (as AST starts from ImageNet
DeiT), the video encoder from Kinetics MViTv2-B, and the AST baseline from
AST's own checkpoints. Each converter maps a peer's state dict onto an
mmt-fast model and says what it adapted:

==================  ======================================================  =====================
``source``          checkpoints                                             target
==================  ======================================================  =====================
``timm-mvitv2``     timm's ``mvitv2_*`` (``stages.S.blocks.I.*``, ``.pth``   MAT, or an image
                    or ``.safetensors``) and the original MViT ``.pyth``     :class:`MultiscaleEncoder`
                    files (``{"model_state": {"blocks.N.*"}}``)              (``MViTv2-B-image``)
``slowfast``        SlowFast MViTv2 ``.pyth`` (``{"model_state": ...}``)     the video encoder
``torchvision``     torchvision ``mvit_v2_s`` state dicts                    the video encoder
``ast``             AST's released checkpoints (``nn.DataParallel``:         :class:`AST`
                    ``module.v.*``, ``module.mlp_head.*``) and DeiT
                    (``deit_base_distilled_patch16_384``) state dicts
``mmt-fast``        what ``mmt-fast convert`` writes (our own key names)     the same model
==================  ======================================================  =====================

Adaptations (each listed in the :class:`ConversionReport`):

- patch embedding with 3 input channels into a 1-channel model: the RGB
  kernels are summed, ``W' = sum_c W[:, c]`` (AST's ImageNet -> audio rule);
- rel-pos tables of another length: linear interpolation along the table,
  ``F.interpolate(R^T, size=L', mode="linear")`` (MViTv2's ``get_rel_pos``, the
  same resize :func:`mmt_fast.layers.resize_rel_table` applies at run time);
- AST position embeddings for another patch grid: AST's rule, per axis
  (time first, then frequency), a centre cut when the new axis is not
  longer, bilinear interpolation otherwise;
- a head of another class count (or none in the checkpoint), a CLS token
  the checkpoint lacks: the model's own initialisation is kept; a checkpoint
  head the model does not have (an encoder inside MMT) is dropped.

Loading is strict: every checkpoint tensor is used or its omission
explained, every model tensor filled or its initialisation explained, and any
other mismatch (depth, width, an unknown key) is an error that lists them
all. Files are read with ``safetensors`` or ``torch.load(weights_only=True)``;
nothing is downloaded.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmt_fast.errors import CheckpointError, ConfigError

SOURCES = ("timm-mvitv2", "slowfast", "torchvision", "ast")
FORMATS = ("mmt-fast", *SOURCES)
StateDict = dict[str, torch.Tensor]

#: source -> the preset ``mmt-fast convert`` builds when ``--model`` is not given
DEFAULT_TARGET = {
    "timm-mvitv2": "MAT",
    "slowfast": "MViTv2-B-16",
    "torchvision": "MViTv2-S-16",
    "ast": "AST",
}


@dataclass
class ConversionReport:
    """What a conversion did.

    ``copied``: model keys filled unchanged (up to a layout-only reshape);
    ``adapted``: (model key, rule, checkpoint shape, model shape);
    ``kept``: (model key, why) left at the model's own initialisation;
    ``dropped``: (checkpoint key, why) not used, named as mmt-fast names it
    (timm's ``head.fc.weight`` is ``head.weight``; AST's ``mlp_head.*`` keeps its name).
    """

    source: str
    path: str | None = None
    copied: list[str] = field(default_factory=list)
    adapted: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every model tensor came unchanged from the checkpoint."""
        return not (self.adapted or self.kept)

    def summary(self) -> str:
        """A few lines for a log: counts, then every adaptation, kept and dropped key."""
        where = f" from {self.path}" if self.path else ""
        lines = [
            f"{self.source}{where}: {len(self.copied)} tensors copied, {len(self.adapted)} adapted, "
            f"{len(self.kept)} kept from the model's initialisation, {len(self.dropped)} checkpoint "
            "tensors dropped"
        ]
        lines += [f"  adapted {k}: {how} {tuple(a)} -> {tuple(b)}" for k, how, a, b in self.adapted]
        lines += [f"  kept    {k}: {why}" for k, why in self.kept]
        lines += [f"  dropped {k}: {why}" for k, why in self.dropped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "path": self.path,
            "copied": len(self.copied),
            "adapted": [[k, how, list(a), list(b)] for k, how, a, b in self.adapted],
            "kept": [list(x) for x in self.kept],
            "dropped": [list(x) for x in self.dropped],
        }


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> StateDict:
    """The tensors of a checkpoint file, unwrapped from the usual containers.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(..., weights_only=True)`` (a pickle holding other objects is
    refused). ``{"model_state": sd}`` (SlowFast / MViT ``.pyth``),
    ``{"model": sd}`` (DeiT) and ``{"state_dict": sd}`` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to unpickle it with weights_only=True (it holds objects other "
                f"than tensors and plain containers): {str(e).splitlines()[0]}. Re-save its "
                "state_dict (or safetensors) in a trusted environment."
            ) from None
    for key in ("model_state", "model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: not a state dict (entries that are not tensors: {sorted(map(str, bad))[:8]})"
        )
    return dict(sd)


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """One of :data:`FORMATS`, from the key names (error when none fits)."""
    keys = set(sd)
    if "patch_embed.weight" in keys:
        return "mmt-fast"
    if any(k.startswith(("module.v.", "v.")) for k in keys) or (
        "dist_token" in keys and "pos_embed" in keys
    ):
        return "ast"
    if "conv_proj.weight" in keys and "pos_encoding.class_token" in keys:
        return "torchvision"
    if any(k.startswith("stages.") for k in keys):
        return "timm-mvitv2"
    if "patch_embed.proj.weight" in keys:
        return "slowfast" if sd["patch_embed.proj.weight"].ndim == 5 else "timm-mvitv2"
    raise CheckpointError(
        f"cannot tell the format of this checkpoint (keys like {sorted(keys)[:6]}); "
        f"name it: one of {', '.join(FORMATS)}"
    )


# ----------------------------------------------------------------------------- renaming


def _sub_all(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _canonical_mvit_original(sd: StateDict, nd: int) -> StateDict:
    """SlowFast / MViT ``.pyth`` names (``blocks.N.*``) -> mmt-fast names."""
    axes = {"t": 0, "h": 1, "w": 2} if nd == 3 else {"h": 0, "w": 1}
    rules = [
        (r"^patch_embed\.proj\.", "patch_embed."),
        (r"^(blocks\.\d+)\.proj\.", r"\1.shortcut_proj."),
        (r"^head\.projection\.", "head."),
        (r"\.attn\.rel_pos_([thw])$", lambda m: f".attn.rel_pos.{axes[m.group(1)]}"),
    ]
    out: StateDict = {}
    for k, v in sd.items():
        if re.search(r"\.rel_pos_t$", k) and nd != 3:
            raise CheckpointError(f"{k}: a temporal rel-pos table, but the model is {nd}-D")
        out[_sub_all(k, rules)] = v  # type: ignore[arg-type]
    # separate q/k/v projections (SEPARATE_QKV) -> one qkv
    for prefix in sorted({k[: -len(".q.weight")] for k in out if k.endswith(".attn.q.weight")}):
        for p in ("weight", "bias"):
            parts = [out.pop(f"{prefix}.{n}.{p}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                out[f"{prefix}.qkv.{p}"] = torch.cat(parts, 0)  # type: ignore[arg-type]
    return out


def _canonical_timm(sd: StateDict) -> StateDict:
    """timm ``MultiScaleVit`` names (``stages.S.blocks.I.*``) -> mmt-fast names."""
    if not any(k.startswith("stages.") for k in sd):
        return _canonical_mvit_original(sd, 2)
    if any(".shortcut_proj_mlp." in k for k in sd):
        raise CheckpointError(
            "this timm MViTv2 widens its blocks after the MLP (expand_attn=False, e.g. "
            "mvitv2_large); mmt-fast's blocks widen in attention (expand_attn=True) only"
        )
    pairs = sorted(
        {
            (int(m[1]), int(m[2]))
            for k in sd
            if (m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k))
        }
    )
    index = {p: i for i, p in enumerate(pairs)}
    rules = [
        (r"^patch_embed\.proj\.", "patch_embed."),
        (r"\.shortcut_proj_attn\.", ".shortcut_proj."),
        (r"^head\.fc\.", "head."),
        (r"\.attn\.rel_pos_h$", ".attn.rel_pos.0"),
        (r"\.attn\.rel_pos_w$", ".attn.rel_pos.1"),
    ]
    out: StateDict = {}
    for k, v in sd.items():
        k2 = re.sub(
            r"^stages\.(\d+)\.blocks\.(\d+)\.",
            lambda m: f"blocks.{index[(int(m[1]), int(m[2]))]}.",
            k,
        )
        out[_sub_all(k2, rules)] = v
    return out


def _canonical_torchvision(sd: StateDict) -> StateDict:
    """torchvision ``MViT`` names -> mmt-fast names."""
    axes = {"t": 0, "h": 1, "w": 2}
    rules = [
        (r"^conv_proj\.", "patch_embed."),
        (r"\.attn\.project\.0\.", ".attn.proj."),
        (r"\.attn\.pool_([qkv])\.pool\.", r".attn.pool_\1."),
        (r"\.attn\.pool_([qkv])\.norm_act\.0\.", r".attn.norm_\1."),
        (r"\.attn\.rel_pos_([thw])$", lambda m: f".attn.rel_pos.{axes[m.group(1)]}"),
        (r"\.mlp\.0\.", ".mlp.fc1."),
        (r"\.mlp\.3\.", ".mlp.fc2."),
        (r"^(blocks\.\d+)\.project\.", r"\1.shortcut_proj."),
        (r"^head\.1\.", "head."),
    ]
    out: StateDict = {}
    for k, v in sd.items():
        if k == "pos_encoding.class_token":
            out["cls_token"] = v.reshape(1, 1, -1)
            continue
        out[_sub_all(k, rules)] = v  # type: ignore[arg-type]
    return out


def _canonical_ast(sd: StateDict) -> StateDict:
    """AST checkpoint (``module.v.*``, ``module.mlp_head.*``) or DeiT names -> mmt-fast AST names."""
    out: StateDict = {}
    for k, v in sd.items():
        k2 = re.sub(r"^module\.", "", k)
        k2 = re.sub(r"^v\.", "", k2)
        k2 = re.sub(r"^patch_embed\.proj\.", "patch_embed.", k2)
        out[k2] = v
    return out


_CANONICAL: dict[str, Callable[[StateDict, int], StateDict]] = {
    "mmt-fast": lambda sd, nd: dict(sd),
    "timm-mvitv2": lambda sd, nd: _canonical_timm(sd),
    "slowfast": _canonical_mvit_original,
    "torchvision": lambda sd, nd: _canonical_torchvision(sd),
    "ast": lambda sd, nd: _canonical_ast(sd),
}


# ----------------------------------------------------------------------------- adaptations


def interpolate_rel_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """MViTv2's rel-pos resize: (L, D) -> (length, D), linear along L
    (``align_corners=False``), as timm's ``checkpoint_filter_fn`` and SlowFast's
    ``get_rel_pos``."""
    out = F.interpolate(table.t()[None], size=length, mode="linear", align_corners=False)
    return out[0].t().contiguous()


def adapt_ast_pos_embed(
    pos: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], prefix: int = 2
) -> torch.Tensor:
    """AST's position-embedding rule. pos: (1, prefix + Fs * Ts, D) -> (1, prefix + F * T, D).

    The patch embeddings, laid out as (D, Fs, Ts), are first fitted in time
    then in frequency: an axis that is not longer than the source is cut from
    the middle (``[Ns // 2 - N // 2, ... + N)``), a longer one is bilinearly
    interpolated (``align_corners=False``). The CLS/distillation rows are kept.
    """
    d = pos.shape[-1]
    fs, ts = src_grid
    f, t = dst_grid
    grid = pos[:, prefix:].transpose(1, 2).reshape(1, d, fs, ts)
    if t <= ts:
        grid = grid[:, :, :, ts // 2 - t // 2 : ts // 2 - t // 2 + t]
    else:
        grid = F.interpolate(grid, size=(fs, t), mode="bilinear", align_corners=False)
    if f <= fs:
        grid = grid[:, :, fs // 2 - f // 2 : fs // 2 - f // 2 + f, :]
    else:
        grid = F.interpolate(grid, size=(f, t), mode="bilinear", align_corners=False)
    grid = grid.reshape(1, d, f * t).transpose(1, 2)
    return torch.cat([pos[:, :prefix], grid], dim=1).contiguous()


def _ast_source_grid(
    n: int, dst: tuple[int, int], given: tuple[int, int] | None
) -> tuple[int, int]:
    if given is not None:
        if given[0] * given[1] != n:
            raise CheckpointError(
                f"source_grid={given} has {given[0] * given[1]} patches, pos_embed {n}"
            )
        return given
    if n == dst[0] * dst[1]:
        return dst
    if n == 12 * 101:  # AST's released checkpoints: 128 x 1024 input, stride 10
        return (12, 101)
    side = math.isqrt(n)
    if side * side == n:  # DeiT: a square image grid
        return (side, side)
    raise CheckpointError(
        f"pos_embed has {n} patches: cannot tell its (frequency, time) grid; pass source_grid"
    )


# ----------------------------------------------------------------------------- fitting


def _adapt(
    key: str,
    have: torch.Tensor,
    want: torch.Tensor,
    model: nn.Module,
    report: ConversionReport,
    source_grid: tuple[int, int] | None,
) -> torch.Tensor | None:
    """``have`` reshaped to ``want``'s shape by one of the rules above (recorded in
    ``report``), or None when no rule applies."""
    a, b = tuple(have.shape), tuple(want.shape)
    if key == "patch_embed.weight" and a[1] == 3 and b[1] == 1 and a[:1] + a[2:] == b[:1] + b[2:]:
        report.adapted.append((key, "RGB kernels summed into one channel", a, b))
        return have.sum(dim=1, keepdim=True)
    if ".attn.rel_pos." in key and len(a) == 2 and a[1] == b[1]:
        report.adapted.append((key, "rel-pos table interpolated linearly", a, b))
        return interpolate_rel_table(have, b[0])
    if hasattr(model, "dist_token") and key == "pos_embed" and a[0] == 1 and a[2] == b[2]:
        dst = tuple(model.cfg.patch_grid)
        grid = _ast_source_grid(a[1] - 2, dst, source_grid)
        report.adapted.append((key, f"AST position embeddings {grid} -> {dst}", a, b))
        return adapt_ast_pos_embed(have, grid, dst)
    return None


def _unused(
    src: StateDict, used: set[str], report: ConversionReport, strict: bool, from_ast: bool
) -> list[str]:
    """Record the checkpoint's tensors the model has no place for; the problems (strict)."""
    problems = []
    for key in sorted(set(src) - used):
        if from_ast and key.startswith(("head.", "head_dist.")):
            report.dropped.append((key, "DeiT's ImageNet classifiers (AST uses its mlp_head)"))
        elif key.startswith(("head.", "mlp_head.")):
            report.dropped.append((key, "the model has no classifier head"))
        elif key == "cls_token":
            report.dropped.append((key, "the model has no CLS token"))
        elif strict:
            problems.append(f"not in the model: {key} {tuple(src[key].shape)}")
        else:
            report.dropped.append((key, "not in the model (strict=False)"))
    return problems


def _fit(
    src: StateDict,
    model: nn.Module,
    report: ConversionReport,
    strict: bool,
    source_grid: tuple[int, int] | None = None,
) -> StateDict:
    """Match the canonical checkpoint ``src`` to ``model``'s state dict, adapting
    what the rules above allow; returns a complete state dict for the model."""
    target = model.state_dict()
    out: StateDict = {}
    problems: list[str] = []
    depth = [len({k.split(".")[1] for k in d if k.startswith("blocks.")}) for d in (src, target)]
    if depth[0] != depth[1]:
        problems.append(f"the checkpoint has {depth[0]} blocks, the model {depth[1]}")
    used: set[str] = set()
    from_ast = report.source == "ast"  # AST / DeiT names: mlp_head, DeiT's head and head_dist

    def use(key: str, value: torch.Tensor) -> None:
        out[key] = value.detach().to(target[key].dtype)

    for key, want in target.items():
        src_key = "mlp_" + key if from_ast and key.startswith("head.") else key
        have = src.get(src_key)
        if have is None:
            if key.startswith("head.") or key == "cls_token":
                what = "head" if key.startswith("head.") else "CLS token"
                report.kept.append((key, f"the checkpoint has no {what}"))
                out[key] = want
            elif strict:
                problems.append(f"missing in the checkpoint: {key} {tuple(want.shape)}")
            else:
                report.kept.append((key, "missing in the checkpoint (strict=False)"))
                out[key] = want
            continue
        used.add(src_key)
        if have.shape == want.shape:
            use(key, have)
            report.copied.append(key)
            continue
        adapted = _adapt(key, have, want, model, report, source_grid)
        if adapted is not None:
            use(key, adapted)
        elif key.startswith("head."):
            a, b = tuple(have.shape), tuple(want.shape)
            report.kept.append((key, f"the checkpoint's head has shape {a}, the model's {b}"))
            report.dropped.append((src_key, "a head of another class count"))
            out[key] = want
        elif strict:
            problems.append(
                f"shape of {key}: checkpoint {tuple(have.shape)}, model {tuple(want.shape)}"
            )
        else:
            report.kept.append(
                (
                    key,
                    f"shape {tuple(have.shape)} in the checkpoint, {tuple(want.shape)} in the model",
                )
            )
            out[key] = want

    problems += _unused(src, used, report, strict, from_ast)
    if problems:
        n = len(problems)
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {n - 20} more" if n > 20 else "")
        raise CheckpointError(
            f"the {report.source} checkpoint does not fit {type(model).__name__} "
            f"({n} problem(s); the architectures differ, or name another source/model):\n  {shown}"
        )
    return out


def convert_state_dict(
    sd: Mapping[str, torch.Tensor],
    model: nn.Module,
    source: str = "auto",
    strict: bool = True,
    source_grid: tuple[int, int] | None = None,
    path: str | None = None,
) -> tuple[StateDict, ConversionReport]:
    """Map a peer's state dict onto ``model`` (a MAT / MViTv2 / MultiscaleEncoder
    or an AST). Returns the model's complete state dict and the report.

    ``source``: one of :data:`FORMATS` or ``"auto"`` (:func:`detect_format`).
    ``source_grid``: the (frequency, time) patch grid of an AST checkpoint's
    position embeddings when it cannot be inferred.
    """
    from mmt_fast.models.ast import AST
    from mmt_fast.models.mvit import MultiscaleEncoder

    sd = dict(sd)
    if source == "auto":
        source = detect_format(sd)
    if source not in FORMATS:
        raise ConfigError(f"unknown checkpoint source {source!r}; expected one of {FORMATS}")
    if source == "ast" and not isinstance(model, AST):
        raise CheckpointError(f"an AST/DeiT checkpoint loads into AST, not {type(model).__name__}")
    if source in ("timm-mvitv2", "slowfast", "torchvision") and not isinstance(
        model, MultiscaleEncoder
    ):
        raise CheckpointError(
            f"a {source} checkpoint loads into MAT / MViTv2 / MultiscaleEncoder, "
            f"not {type(model).__name__}"
        )
    nd = len(model.cfg.input_size) if isinstance(model, MultiscaleEncoder) else 2
    if source in ("slowfast", "torchvision") and nd != 3:
        raise CheckpointError(f"a {source} video checkpoint needs a 3-D (video) model")
    if source == "timm-mvitv2" and nd != 2:
        raise CheckpointError("a timm MViTv2 image checkpoint needs a 2-D model (MAT or image)")
    if source == "slowfast" and any(k.startswith("pos_embed") for k in sd):
        raise CheckpointError(
            "this SlowFast checkpoint uses absolute position embeddings (MViTv1); "
            "mmt-fast's encoders use MViTv2's relative positions"
        )
    report = ConversionReport(source=source, path=path)
    canonical = _CANONICAL[source](sd, nd)
    return _fit(canonical, model, report, strict, source_grid), report


def load_pretrained(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    source: str = "auto",
    strict: bool = True,
    source_grid: tuple[int, int] | None = None,
) -> ConversionReport:
    """Convert a checkpoint (a file or a state dict) and load it into ``model``
    in place; returns the :class:`ConversionReport`."""
    path = None
    if isinstance(checkpoint, str | Path):
        path = str(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    state, report = convert_state_dict(checkpoint, model, source, strict, source_grid, path)
    model.load_state_dict(state, strict=True)
    return report


def init_mmt(
    model: nn.Module,
    audio: str | None = None,
    video: str | None = None,
    audio_from: str = "auto",
    video_from: str = "auto",
    strict: bool = True,
) -> dict[str, ConversionReport]:
    """Load pretrained encoders into an :class:`~mmt_fast.models.mmt.MMT`:
    ``audio`` into its audio encoder (MAT or AST), ``video`` into its video
    encoder. A whole MMT checkpoint (a trained run's ``model.safetensors``)
    gives its ``audio_encoder.*`` / ``video_encoder.*`` tensors. Returns
    {"audio": report, "video": report} for those given."""
    reports = {}
    for name, path, source in (("audio", audio, audio_from), ("video", video, video_from)):
        if path is None:
            continue
        encoder = getattr(model, f"{name}_encoder", None)
        if encoder is None:
            raise ConfigError(f"model.init.{name} is set but the model has no {name} encoder")
        sd = read_checkpoint(path)
        prefix = f"{name}_encoder."
        if source in ("auto", "mmt-fast") and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            source = "mmt-fast"
        state, report = convert_state_dict(sd, encoder, source, strict, path=str(path))
        encoder.load_state_dict(state, strict=True)
        reports[name] = report
    return reports


__all__ = [
    "FORMATS",
    "SOURCES",
    "CheckpointError",
    "ConversionReport",
    "adapt_ast_pos_embed",
    "convert_state_dict",
    "detect_format",
    "init_mmt",
    "interpolate_rel_table",
    "load_pretrained",
    "read_checkpoint",
]
