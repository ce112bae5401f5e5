"""Small helpers shared by the fused ops (torch and triton only)."""

import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton type, for kernels' constexpr arguments."""
    return tl.float64 if dtype == torch.float64 else tl.float32
