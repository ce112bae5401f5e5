"""Triton for the kernel files, or a stand-in that says why it cannot be used.

Every kernel file takes ``triton`` and ``tl`` from here. When Triton imports, they are the
real ``triton`` and ``triton.language``. When it is missing or broken (no wheel for the
platform, a wheel whose shared library does not load), the stand-ins below let the kernel
files still be imported, so that the PyTorch reference path of every op, and every model
built on them, keeps working:

- ``triton.jit`` / ``autotune`` / ``heuristics`` (and ``constexpr_function``) keep the
  Python function and give it an
  object whose launch (``kernel[grid](...)``) raises :class:`TritonUnavailableError`;
- ``triton.Config``, ``cdiv`` and ``next_power_of_2`` behave as Triton's do (configs are
  built when the kernel files are imported);
- ``tl.constexpr(x)`` is ``x``; any other ``tl.<name>`` (annotations, dtypes) is a named
  placeholder.

:data:`IMPORT_ERROR` is the message of the failed import (``None`` when Triton works); the
dispatch (:func:`mmt_fast.kernels.dispatch.triton_reasons`) puts it in front of every
other reason, so the Triton path is refused by name, never attempted.
"""

from __future__ import annotations

from types import SimpleNamespace


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was launched while Triton cannot be imported."""


def _import_triton():
    try:
        import triton
        import triton.language as tl
    # a broken install raises other errors than ImportError from its native library
    except (ImportError, OSError, RuntimeError, AttributeError) as e:
        return None, None, f"{type(e).__name__}: {e}"
    return triton, tl, None


class _Placeholder:
    """What ``tl.<name>`` is without Triton: a name, never an operation."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"tl.{self.name} (Triton unavailable)"


def _constexpr(value):
    """``tl.constexpr(value)`` at module level: the value itself."""
    return value


class _Language:
    constexpr = staticmethod(_constexpr)

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name)


class _Kernel:
    """A ``@triton.jit`` function without Triton: keeps ``fn``; launching it raises."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = getattr(fn, "__doc__", None)

    def __getitem__(self, grid):
        raise TritonUnavailableError(
            f"cannot launch the Triton kernel {self.__name__}: Triton is not usable "
            f"({IMPORT_ERROR}); the PyTorch reference path is the only one available"
        )

    def __call__(self, *args, **kwargs):
        raise TritonUnavailableError(
            f"{self.__name__} is a Triton kernel; Triton is not usable ({IMPORT_ERROR})"
        )


def _jit(fn=None, **_options):
    if fn is None:
        return _Kernel
    return _Kernel(fn)


def _keep(*_args, **_kwargs):
    def wrap(kernel):
        return kernel if isinstance(kernel, _Kernel) else _Kernel(kernel)

    return wrap


class _Config:
    """Triton's ``Config``: the meta-parameters and launch options of one variant."""

    def __init__(self, kwargs, num_warps=4, num_stages=3, num_ctas=1, maxnreg=None, pre_hook=None):
        self.kwargs = dict(kwargs)
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.num_ctas = num_ctas
        self.maxnreg = maxnreg
        self.pre_hook = pre_hook

    def all_kwargs(self) -> dict:
        return {**self.kwargs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __repr__(self) -> str:
        return f"Config({self.kwargs}, num_warps={self.num_warps}, num_stages={self.num_stages})"


def _cdiv(x: int, y: int) -> int:
    return (x + y - 1) // y


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


triton, tl, IMPORT_ERROR = _import_triton()
AVAILABLE = IMPORT_ERROR is None
if not AVAILABLE:
    triton = SimpleNamespace(
        jit=_jit,
        autotune=_keep,
        heuristics=_keep,
        constexpr_function=lambda fn: fn,
        Config=_Config,
        cdiv=_cdiv,
        next_power_of_2=_next_power_of_2,
        language=_Language(),
    )
    tl = triton.language
