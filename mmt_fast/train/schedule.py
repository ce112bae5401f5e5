"""Learning-rate schedule: linear warmup, then cosine decay.

For peak rate ``lr``, total steps ``N``, warmup steps ``W`` (steps are optimizer
updates, counted from 0)::

    s < W:   lr * (r0 + (1 - r0) * s / W)
    s >= W:  lr * (m + (1 - m) * (1 + cos(pi * (s - W) / max(N - W, 1))) / 2)

with ``r0 = warmup_start_ratio`` and ``m = min_lr_ratio``; steps past ``N`` stay
at ``m * lr``. The scheduler's state is one integer, so it is saved and loaded
without pickling any function.
"""

from __future__ import annotations

import math

import torch


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    warmup_start_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (see module docstring)."""
    if step < warmup_steps:
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0), span) / span
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    """Sets ``group["lr"] = base_lr * lr_factor(step)`` on every param group.

    Call :meth:`step` after each ``optimizer.step()``. ``state_dict()`` holds
    only numbers.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_ratio = warmup_start_ratio
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.last_step = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        s = self.last_step if step is None else step
        return lr_factor(
            s, self.total_steps, self.warmup_steps, self.min_lr_ratio, self.warmup_start_ratio
        )

    def _apply(self) -> None:
        f = self.factor()
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "warmup_start_ratio": self.warmup_start_ratio,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("last_step", "total_steps", "warmup_steps", "min_lr_ratio", "warmup_start_ratio"):
            setattr(self, k, state[k])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
