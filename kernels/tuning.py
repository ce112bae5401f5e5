"""Kernel configs: the autotune lists, the pinned choice, and pruning before compiling.

``MMT_FAST_KERNEL_CONFIGS`` chooses how a kernel's tile config is picked:

- ``autotune`` (default): Triton's autotune over the kernel's short list (each entry
  checked by the compile gate, ``python -m benchmarks.compile_gate``: no spills, within
  shared memory, tensor-core matmuls on sm_90), keyed on the shapes and batch x heads;
- ``pinned``: one config per kernel, the first of its list, chosen from the compile
  gate; nothing is benchmarked and each kernel compiles once per shape. The GPU script
  uses it so that a cold run spends its minutes measuring, not compiling.

Under Triton's interpreter every kernel has one small config (the interpreter breaks
with two or more).
"""

from __future__ import annotations

import os

import triton

from kernels import dispatch

ENV_VAR = "MMT_FAST_KERNEL_CONFIGS"
_MODES = ("autotune", "pinned")

# Per kernel: (kwargs, num_warps, num_stages), the pinned one first.
TABLE: dict[str, list[tuple[dict, int, int]]] = {}
INTERPRETER: dict[str, tuple[dict, int, int]] = {}


def mode() -> str:
    value = os.environ.get(ENV_VAR, "autotune").strip().lower() or "autotune"
    if value not in _MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(_MODES)}")
    return value


def _config(entry: tuple[dict, int, int]) -> triton.Config:
    kwargs, warps, stages = entry
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)


def configs(
    op: str, kernel: str, entries: list[tuple[dict, int, int]], interpreter: tuple[dict, int, int]
) -> list[triton.Config]:
    """Register ``op``'s ``kernel`` and return its autotune list under the current mode."""
    TABLE[f"{op}.{kernel}"] = entries
    INTERPRETER[f"{op}.{kernel}"] = interpreter
    if dispatch.interpreting():
        return [_config(interpreter)]
    return [_config(e) for e in (entries[:1] if mode() == "pinned" else entries)]


def pinned_config(kernel: str, op: str) -> triton.Config | None:
    """The config ``pinned`` mode uses for ``op``'s ``kernel`` (None: not autotuned)."""
    entries = TABLE.get(f"{op}.{kernel}")
    return _config(entries[0]) if entries else None


def prune(configs_, args: dict, kernel: str, op: str) -> list:
    """The configs autotune may pick for these arguments (all of the short list)."""
    return list(configs_)
