"""mmt-fast: the Multiscale Multimodal Bottleneck Transformer (MMT) for
audio-video classification, with fused Triton kernels.

The names most users need::

    from mmt_fast import MAT, create_model
    mat = MAT(num_classes=309)              # drop-in audio encoder/classifier
    mmt = create_model("MMT", num_classes=309)
"""

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
