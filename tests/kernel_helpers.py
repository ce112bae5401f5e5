"""What the kernel tests share."""

import pytest
import torch

from mmt_fast.kernels import dispatch

# Kernel tests run on CUDA when there is one, else on the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_interpreter = pytest.mark.skipif(
    not dispatch.interpreting(),
    reason="float64 / fake CPU tensors reach Triton only when interpreting",
)

# atol added to the flash-attention rule |kernel - fp64| <= 2 |torch(dtype) - fp64| + atol.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
