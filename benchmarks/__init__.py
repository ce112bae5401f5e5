"""Benchmarks of mmt-fast: ``python -m benchmarks.flops_memory`` (the paper's
efficiency table) and ``python -m benchmarks.kernels`` (fused-kernel speed)."""
