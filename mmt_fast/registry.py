"""``create_model(name, **overrides)``: build any preset of :mod:`mmt_fast.config`."""

from __future__ import annotations

from torch import nn

from mmt_fast.config import ASTConfig, MMTConfig, MultiscaleConfig, apply_overrides, get_config


def build(cfg: MultiscaleConfig | ASTConfig | MMTConfig) -> nn.Module:
    """The model for a config object."""
    from mmt_fast.models.ast import AST
    from mmt_fast.models.mmt import MMT
    from mmt_fast.models.mvit import MAT, MViTv2

    if isinstance(cfg, MMTConfig):
        return MMT(cfg)
    if isinstance(cfg, ASTConfig):
        return AST(cfg=cfg, num_classes=cfg.num_classes)
    if isinstance(cfg, MultiscaleConfig):
        if len(cfg.input_size) == 2:
            return MAT(cfg=cfg, num_classes=cfg.num_classes)
        return MViTv2(cfg=cfg, num_classes=cfg.num_classes)
    raise TypeError(f"no model for config type {type(cfg).__name__}")


def create_model(name: str, **overrides) -> nn.Module:
    """Build the named preset (``mmt_fast.preset_names()``), with config
    overrides; nested fields use ``__`` (``audio__drop_path_rate=0.1``)."""
    cfg = get_config(name)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return build(cfg)
