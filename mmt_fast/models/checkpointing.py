"""Activation checkpointing (per Transformer block), as a run-time switch.

``set_activation_checkpointing(model, mode)`` with mode
- ``"none"``: store every activation (the default);
- ``"blocks"``: recompute every block's activations in the backward pass
  (encoders and AVBottleneck blocks): each block keeps only its input;
- ``"stage1"``: only the blocks of each multiscale encoder's first stage,
  where MAT's (32x256 tokens) and MViTv2's (8x56x56 tokens) memory sits. A
  plain ViT (AST) runs at one resolution, so all its blocks form its first
  stage.
- ``"selective"``: every block (encoders and AVBottleneck), under PyTorch's
  selective-checkpoint policy :func:`selective_policy`: the outputs of the
  expensive ops are kept, the cheap ones recomputed (see below).

Checkpointing uses ``torch.utils.checkpoint`` (non-reentrant), so gradients
are those of the plain model: the RNG state (CPU and the inputs' devices) is
saved at the block's entry and restored for the recomputation, so drop path
and dropout draw the same masks twice. It applies in training mode only.
``blocks`` and ``stage1`` cost about one extra forward pass of the chosen
blocks; ``selective`` no extra matmul FLOPs.

The selective policy (:func:`selective_policy`):

- saved: the outputs of matrix products and dense convolutions (``aten.mm``,
  ``addmm``, ``bmm``, ``baddbmm``, ``convolution``), of PyTorch's fused
  attention (the SDPA kernels) and of the fused attention ops
  (``mmt_fast::relpos_attention_fwd``, ``bottleneck_attention_fwd``). These are
  where a block's FLOPs are: recomputing them would cost a second forward pass.
- recomputed: everything else: LayerNorm, GELU, dtype casts, residual adds
  (including the attention's residual pooling "+ Q", done outside the fused op
  for this reason), drop path, reshapes and copies, and the Q/K/V pooling
  (``mmt_fast::pooled_qkv_fwd``, or the depthwise convolutions and LayerNorms of
  the reference path): memory-bound ops, about one read and one write per
  element, while each of them saved would keep a tensor of the block's width
  (LayerNorm its input, GELU its input, a cast the 16-bit copy of a 32-bit
  tensor, the pooling three pooled heads).

Per block that keeps its input (``checkpoint`` holds it), the outputs of its
linear layers (qkv, proj, fc1, fc2) and the attention output; the backward
recomputes the rest from them, one block at a time. Measured with the memory
estimate (``python -m benchmarks.flops_memory``): MAT with the fused ops, batch
64, fp16 autocast, 19.96 GiB without checkpointing, 11.02 GiB selective, with
the same matmul FLOPs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

MODES = ("none", "blocks", "stage1", "selective")

_aten = torch.ops.aten
SAVED_OPS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.convolution.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)
SAVED_NAMESPACES = frozenset({"mmt_fast"})


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(MODES)}")
    return mode


# memory-bound ops among the above, recomputed: the fused pooling + LayerNorm of Q/K/V
RECOMPUTED_OPS = frozenset({"mmt_fast::pooled_qkv_fwd"})


def _depthwise(op: Any, args: tuple) -> bool:
    """A grouped convolution with one channel per group (the attention's pooling)."""
    if op is not _aten.convolution.default:
        return False
    groups = args[8]
    return groups > 1 and groups == args[0].shape[1]


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save the outputs of matmuls, convolutions and fused attention ops
    (``SAVED_OPS``, the ``mmt_fast::`` namespace) except the memory-bound pooling
    (``RECOMPUTED_OPS``, depthwise convolutions); recompute the rest."""
    if getattr(op, "name", lambda: "")() in RECOMPUTED_OPS or _depthwise(op, args):
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in SAVED_OPS or getattr(op, "namespace", None) in SAVED_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _entered(modes: list) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in modes:
            stack.enter_context(m)
        yield


def _reentered_modes() -> list:
    """The torch-function modes that ask to be re-entered for the recomputation
    (``reenter_on_recompute``, e.g. the memory estimate's autocast policy), as
    ``checkpoint`` itself re-enters ``torch.autocast``."""
    stack = torch.overrides._get_current_function_mode_stack()
    return [m for m in stack if getattr(m, "reenter_on_recompute", False)]


def _contexts(
    selective: bool,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``checkpoint``'s ``context_fn``: contexts for the forward pass and the
    recomputation; the selective policy's pair of dispatch modes as they are (which
    torch.compile requires) unless a function mode must be re-entered too."""
    reentered = _reentered_modes()
    if not selective:
        return contextlib.nullcontext(), _entered(reentered)
    forward, recompute = create_selective_checkpoint_contexts(selective_policy)
    return (forward, _entered([*reentered, recompute])) if reentered else (forward, recompute)


def run_block(module: nn.Module, block: nn.Module, index: int, *args: Any) -> Any:
    """``block(*args)``, through ``checkpoint`` when ``index`` is in
    ``module.checkpoint_blocks`` and the module is training (under the
    selective policy when ``module.checkpoint_selective``)."""
    if module.training and index in getattr(module, "checkpoint_blocks", ()):
        selective = getattr(module, "checkpoint_selective", False)
        if not selective and not _reentered_modes():
            return checkpoint(block, *args, use_reentrant=False)
        contexts = functools.partial(_contexts, selective)
        return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)
    return block(*args)


def blocks_to_checkpoint(stage_of_block: list[int], mode: str) -> frozenset[int]:
    """Indices of the blocks that ``mode`` checkpoints, given each block's stage."""
    check_mode(mode)
    if mode == "none":
        return frozenset()
    if mode in ("blocks", "selective"):
        return frozenset(range(len(stage_of_block)))
    return frozenset(i for i, s in enumerate(stage_of_block) if s == 0)


def apply_mode(module: nn.Module, stage_of_block: list[int], mode: str) -> None:
    """Set ``module.checkpoint_blocks`` and ``module.checkpoint_selective`` for ``mode``."""
    module.checkpoint_blocks = blocks_to_checkpoint(stage_of_block, mode)
    module.checkpoint_selective = mode == "selective"


def set_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Switch checkpointing on every encoder of ``model`` (MAT, MViTv2, AST,
    MMT and its AVBottleneck); returns the model."""
    check_mode(mode)
    found = False
    for m in model.modules():
        setter: Callable[[str], None] | None = getattr(m, "_set_checkpointing", None)
        if setter is not None:
            setter(mode)
            found = True
    if not found and mode != "none":
        raise ValueError(f"{type(model).__name__} has no blocks that can be checkpointed")
    return model


__all__ = [
    "MODES",
    "SAVED_OPS",
    "apply_mode",
    "check_mode",
    "selective_policy",
    "set_activation_checkpointing",
]
