"""Helpers for tests that build training configs."""

from __future__ import annotations

import yaml


def as_overrides(values: dict) -> list[str]:
    """``{"train.epochs": 2, ...}`` -> ``["train.epochs=2", ...]``, each value written as the
    YAML that :func:`mmt_fast.run.load_config` reads back (lists, bools, null)."""
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]
