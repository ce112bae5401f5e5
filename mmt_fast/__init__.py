"""mmt-fast: the Multiscale Multimodal Bottleneck Transformer (MMT) for
audio-video classification, with fused Triton kernels.

The names most users need::

    from mmt_fast import MAT, create_model
    mat = MAT(num_classes=309)              # drop-in audio encoder/classifier
    mmt = create_model("MMT", num_classes=309)

The names below are imported on first use (PEP 562), so that importing a
submodule such as :mod:`mmt_fast.cli` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AST": "mmt_fast.models.ast",
    "AVBottleneck": "mmt_fast.models.bottleneck",
    "MAT": "mmt_fast.models.mvit",
    "MMT": "mmt_fast.models.mmt",
    "MMTOutput": "mmt_fast.models.mmt",
    "MViTv2": "mmt_fast.models.mvit",
    "MultiscaleEncoder": "mmt_fast.models.mvit",
    "PRESETS": "mmt_fast.config",
    "create_model": "mmt_fast.registry",
    "preset_names": "mmt_fast.config",
}

if TYPE_CHECKING:
    from mmt_fast.config import PRESETS, preset_names
    from mmt_fast.models.ast import AST
    from mmt_fast.models.bottleneck import AVBottleneck
    from mmt_fast.models.mmt import MMT, MMTOutput
    from mmt_fast.models.mvit import MAT, MultiscaleEncoder, MViTv2
    from mmt_fast.registry import create_model

__all__ = [
    "AST",
    "MAT",
    "MMT",
    "PRESETS",
    "AVBottleneck",
    "MMTOutput",
    "MViTv2",
    "MultiscaleEncoder",
    "create_model",
    "preset_names",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmt_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
