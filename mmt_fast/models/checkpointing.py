"""Activation checkpointing (per Transformer block), as a run-time switch.

``set_activation_checkpointing(model, mode)`` with mode
- ``"none"``: store every activation (the default);
- ``"blocks"``: recompute every block's activations in the backward pass
  (encoders and AVBottleneck blocks): each block keeps only its input;
- ``"stage1"``: only the blocks of each multiscale encoder's first stage,
  where MAT's (32x256 tokens) and MViTv2's (8x56x56 tokens) memory sits. A
  plain ViT (AST) runs at one resolution, so all its blocks form its first
  stage.

Checkpointing uses ``torch.utils.checkpoint`` (non-reentrant, RNG state
preserved), so gradients are those of the plain model; it applies in
training mode only and costs about one extra forward pass of the chosen
blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "blocks", "stage1")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r} is not one of {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def _entered(modes: list) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for m in modes:
            stack.enter_context(m)
        yield


def _recompute_modes() -> tuple[
    contextlib.AbstractContextManager, contextlib.AbstractContextManager
]:
    """Contexts for the forward pass and the recomputation: the recomputation
    re-enters the torch-function modes that ask for it (``reenter_on_recompute``,
    e.g. the memory estimate's autocast policy), as ``checkpoint`` itself
    re-enters ``torch.autocast``."""
    stack = torch.overrides._get_current_function_mode_stack()
    modes = [m for m in stack if getattr(m, "reenter_on_recompute", False)]
    return contextlib.nullcontext(), _entered(modes)


def run_block(module: nn.Module, block: nn.Module, index: int, *args: Any) -> Any:
    """``block(*args)``, through ``checkpoint`` when ``index`` is in
    ``module.checkpoint_blocks`` and the module is training."""
    if module.training and index in getattr(module, "checkpoint_blocks", ()):
        return checkpoint(block, *args, use_reentrant=False, context_fn=_recompute_modes)
    return block(*args)


def blocks_to_checkpoint(stage_of_block: list[int], mode: str) -> frozenset[int]:
    """Indices of the blocks that ``mode`` checkpoints, given each block's stage."""
    check_mode(mode)
    if mode == "none":
        return frozenset()
    if mode == "blocks":
        return frozenset(range(len(stage_of_block)))
    return frozenset(i for i, s in enumerate(stage_of_block) if s == 0)


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
