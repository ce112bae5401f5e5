"""Small helpers shared by the fused ops (torch and triton only)."""

import torch

from ._triton import tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton type, for kernels' constexpr arguments."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def has_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` has real memory to inspect (not meta, fake or traced by torch.compile)."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned contiguous copy when its data pointer or a stride breaks the 16
    bytes the kernels are compiled for (for tensors an op cannot refuse, e.g. the gradient
    autograd hands to a backward)."""
    size = t.element_size()
    ok = not has_storage(t) or (
        t.data_ptr() % 16 == 0
        and all(n <= 1 or st == 1 or (st * size) % 16 == 0 for n, st in zip(t.shape, t.stride()))
    )
    if ok:
        return t
    return t.clone(memory_format=torch.contiguous_format) if t.is_contiguous() else t.contiguous()
