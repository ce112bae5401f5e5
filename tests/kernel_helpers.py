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

# The tests' device and dtype matrix follows the dispatch policy (kernels/dispatch.py):
# where kernels compile for a GPU, fp32 rel-pos and bottleneck attention take the PyTorch
# reference by design (dispatch.FP32_ON_CUDA), so forcing Triton on them raises there. Their
# fp32 kernel tests run where the kernels do take fp32: the interpreter.
fp32_attention = pytest.mark.skipif(
    dispatch.gpu_rules(),
    reason="fp32 attention takes the reference on CUDA by design: " + dispatch.FP32_ON_CUDA,
)
# A dtype the attention kernels run on this machine, for the tests of the op's registration
# (opcheck, fake tensors): fp32 under the interpreter, fp16 where kernels compile for a GPU.
KERNEL_DTYPE = torch.float16 if dispatch.gpu_rules() else torch.float32
# CPU tensors reach the Triton kernels only through the interpreter.
cpu_kernels = pytest.mark.skipif(
    not dispatch.interpreting(),
    reason="CPU tensors run the Triton kernels only under the interpreter (TRITON_INTERPRET=1)",
)
