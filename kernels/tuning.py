"""Kernel configs: the autotune lists, the pinned choice, and pruning before compiling.

``MMT_FAST_KERNEL_CONFIGS`` chooses how a kernel's tile config is picked:

- ``autotune`` (default): Triton's autotune over the kernel's short list (each entry
  checked by the compile gate, ``python -m benchmarks.compile_gate``: no spills, within
  shared memory, tensor-core matmuls on sm_90), keyed on the shapes and batch x heads;
- ``pinned``: one config per kernel, the first of its list, chosen from the compile
  gate; nothing is benchmarked and each kernel compiles once per shape. The GPU script
  uses it so that a cold run spends its minutes measuring, not compiling.

A list may end with fallback entries: configs that fit a smaller shared memory (an
A100's 163 KiB) and run only when nothing before them fits the GPU. An entry may also be
for one architecture only (``"sm90"``: H100/H200; ``"sm80"``: A100, e.g. a smaller tile
where the sm_90 one spills on sm_80): the lists, the pins and autotune's pruning follow
:func:`target_arch`, the GPU's (or the compile gate's, :func:`target`).

A kernel may also have a shape rule (:func:`pin_index`): the pinned entry then depends on
the launch's arguments, e.g. 64-row blocks where 128-row blocks would pad the queries by
more than 5% (MAT stages 3 and 4: 513 and 257 queries). The launchers (:func:`launch`) and
the compile gate (``benchmarks/compile_gate.py``) both ask :func:`pinned_config` with the
launch's arguments, so they pin the same entry.

Under Triton's interpreter every kernel has one small config (the interpreter breaks
with two or more).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from . import dispatch
from ._triton import triton

ENV_VAR = "MMT_FAST_KERNEL_CONFIGS"
_MODES = ("autotune", "pinned")

# Per kernel: (kwargs, num_warps, num_stages), the pinned one first.
TABLE: dict[str, list[tuple[dict, int, int]]] = {}
INTERPRETER: dict[str, tuple[dict, int, int]] = {}
# Per kernel: rule(named launch arguments, primary entries) -> index of the pinned entry.
RULES: dict[str, Callable[[dict, list], int]] = {}
# Per op: the oldest architecture its Triton path runs on (dispatch refuses older GPUs; the
# compile gate does not compile it for them).
MIN_ARCH: dict[str, int] = {}


_ARCH: list[int] = []  # the compile gate's override (target)


def target_arch() -> int:
    """The architecture the kernels are configured for: the compile gate's (:func:`target`),
    else the current CUDA device's (80: A100, 90: H100/H200), else 90."""
    if _ARCH:
        return _ARCH[-1]
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
        return 10 * major + minor
    return 90


@contextlib.contextmanager
def target(arch: int) -> Iterator[None]:
    """Configure the launchers for ``arch`` (the compile gate captures each arch's launches)."""
    _ARCH.append(arch)
    try:
        yield
    finally:
        _ARCH.pop()


def for_arch(entry: tuple, arch: int) -> bool:
    """Whether ``entry`` may run on ``arch`` (its ``"sm90"`` / ``"sm80"`` tag, if any)."""
    tags = entry[3:]
    return not (("sm90" in tags and arch < 90) or ("sm80" in tags and arch >= 90))


def mode() -> str:
    value = os.environ.get(ENV_VAR, "autotune").strip().lower() or "autotune"
    if value not in _MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(_MODES)}")
    return value


def _config(entry: tuple) -> triton.Config:
    kwargs, warps, stages = entry[:3]
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)


# ids of the configs created as fallbacks: used only when no other config fits the GPU's
# shared memory (e.g. an A100's 163 KiB), so they are never selectable on an H100/H200.
_FALLBACK: set[int] = set()
_TAGS: dict[int, tuple] = {}  # id of a config -> its entry's tags ("fallback", "sm90", "sm80")


def fewer_padded_rows(n_arg: str, key: str = "BLOCK_M", slack: float = 1.05,
                      minus: str | None = None) -> Callable:  # fmt: skip
    """A shape rule: the first entry, unless its blocks of ``key`` rows pad the ``n_arg`` rows
    (less the ``minus`` argument's, e.g. a peeled-off CLS row) to more than ``slack`` times
    what the entry padding least needs; then that entry (MViTv2-B stage 4: 392 spatial
    queries are 512 rows in blocks of 128, 448 in blocks of 64)."""

    def rule(args: dict, entries: list) -> int:
        n = int(args[n_arg]) - (int(args[minus]) if minus else 0)
        padded = [-(-n // e[0][key]) * e[0][key] for e in entries]
        best = min(range(len(entries)), key=lambda i: (padded[i], i))
        return best if padded[0] > slack * padded[best] else 0

    return rule


def register(op: str, kernel: str, entries: list[tuple], interpreter: tuple,
             rule: Callable[[dict, list], int] | None = None) -> None:  # fmt: skip
    """Record ``op``'s ``kernel``: its entries (the default pin first), its interpreter config
    and its shape rule (None: always the first entry)."""
    TABLE[f"{op}.{kernel}"] = entries
    INTERPRETER[f"{op}.{kernel}"] = interpreter
    if rule is not None:
        RULES[f"{op}.{kernel}"] = rule


def _primary(entries: list[tuple], arch: int | None = None) -> list[tuple]:
    """The entries that are not fallbacks, for ``arch`` (None: :func:`target_arch`)."""
    arch = target_arch() if arch is None else arch
    return [e for e in entries if "fallback" not in e[3:] and for_arch(e, arch)]


def pin_index(op: str, kernel: str, args: dict | None = None, arch: int | None = None) -> int:
    """Index, among the primary entries for ``arch`` (None: :func:`target_arch`), of the entry
    pinned for a launch of ``op``'s ``kernel`` with the named arguments ``args`` (None: the
    default, the first): the one source of the shape-dependent pins."""
    rule = RULES.get(f"{op}.{kernel}")
    if rule is None or args is None:
        return 0
    return rule(args, _primary(TABLE[f"{op}.{kernel}"], arch))


def pinned_entry(op: str, kernel: str, args: dict | None = None, arch: int | None = None) -> tuple:
    """(kwargs, num_warps, num_stages) pinned for this launch (see :func:`pin_index`)."""
    if dispatch.interpreting():
        return INTERPRETER[f"{op}.{kernel}"]
    entries = _primary(TABLE[f"{op}.{kernel}"], arch)
    return entries[pin_index(op, kernel, args, arch)][:3]


def launch(kernel, grid, op: str, *args, **kwargs) -> None:
    """Launch an autotuned ``kernel``: in ``pinned`` mode, the entry pinned for these
    arguments straight through its JIT function (nothing benchmarked); otherwise autotune."""
    if mode() == "pinned" and not dispatch.interpreting():
        named = dict(zip(kernel.fn.arg_names, args), **kwargs)
        kw, warps, stages = pinned_entry(op, kernel.fn.__name__, named)
        kernel.fn[grid](*args, **kwargs, **kw, num_warps=warps, num_stages=stages)
        return
    kernel[grid](*args, **kwargs)


def configs(op: str, kernel: str, entries: list[tuple], interpreter: tuple,
            rule: Callable[[dict, list], int] | None = None) -> list[triton.Config]:  # fmt: skip
    """Register ``op``'s ``kernel`` and return its autotune list under the current mode.

    ``entries``: (kwargs, num_warps, num_stages[, "fallback"]), the pinned one first;
    ``rule``: the shape rule (:func:`pin_index`; launch such a kernel with :func:`launch`).
    """
    register(op, kernel, entries, interpreter, rule)
    if dispatch.interpreting():
        return [_config(interpreter)]
    out = []
    for e in entries:
        c = _config(e)
        _TAGS[id(c)] = tuple(e[3:])
        if "fallback" in e[3:]:
            _FALLBACK.add(id(c))
        out.append(c)
    if mode() == "pinned":  # the launchers pin through tuning.launch; the default pin here
        # (an op refused on this arch, tuning.MIN_ARCH, keeps its first entry)
        first = (_primary(entries) or entries)[0]
        return [c for c, e in zip(out, entries) if e is first or "fallback" in e[3:]]
    return out


def pinned_config(kernel: str, op: str, args: dict | None = None,
                  arch: int | None = None) -> triton.Config | None:  # fmt: skip
    """The config ``pinned`` mode uses for ``op``'s ``kernel`` launched with the named
    arguments ``args`` on ``arch`` (None: the default pin; :func:`target_arch`; the result
    None: the kernel is not registered)."""
    entries = TABLE.get(f"{op}.{kernel}")
    return _config(pinned_entry(op, kernel, args, arch)) if entries else None


def shared_memory_estimate(config: triton.Config, block_d: int, itemsize: int) -> int:
    """A deliberate over-estimate of an attention kernel's shared memory: num_stages buffers
    of a (BLOCK_M + BLOCK_N) x BLOCK_D tile pair (measured on sm_90: fwd 64x64x128 bf16 with
    2 stages uses 96 KiB against 128 KiB here; dK/dV 128x64, 177 KiB against 192 KiB)."""
    kw = config.kwargs
    rows = kw.get("BLOCK_M", 0) + kw.get("BLOCK_N", 0)
    return max(config.num_stages, 1) * rows * block_d * itemsize * 2


def _shared_limit() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None)


def early_prune(configs_: list, named_args: dict, **kwargs) -> list:
    """Autotune's ``early_config_prune``: drop the configs whose shared-memory estimate exceeds
    this GPU's per-block limit before compiling them (A100: 163 KiB; H100/H200: 227 KiB).
    Keeps at least the smallest config."""
    arch = target_arch()
    ours = [c for c in configs_ if for_arch((None, 0, 0, *_TAGS.get(id(c), ())), arch)]
    configs_ = ours or list(configs_)
    limit = _shared_limit()
    if limit is None or len(configs_) <= 1:
        return list(configs_)
    block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    block_d += named_args.get("BLOCK_D2", kwargs.get("BLOCK_D2", 0))  # a second head-dim chunk
    first = next((v for v in named_args.values() if hasattr(v, "element_size")), None)
    itemsize = first.element_size() if first is not None else 2
    est = {id(c): shared_memory_estimate(c, block_d, itemsize) for c in configs_}
    fits = [c for c in configs_ if est[id(c)] <= limit]
    primary = [c for c in fits if id(c) not in _FALLBACK]
    if primary:
        return primary
    if fits:
        return fits[:1]
    return [min(configs_, key=lambda c: est[id(c)])]


def selectable(configs_: list, arch: int = 90) -> list:
    """The configs autotune may pick on ``arch`` (an H100/H200, 227 KiB, by default): the short
    list for that arch without its fallbacks (each fits; the compile gate checks the measured
    figure)."""
    return [c for c in configs_ if id(c) not in _FALLBACK
            and for_arch((None, 0, 0, *_TAGS.get(id(c), ())), arch)]  # fmt: skip
