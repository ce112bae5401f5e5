"""Test configuration.

Triton's interpreter must be switched on before any ``@triton.jit`` function is
imported, so the kernels run on the CPU (DESIGN.md). On a machine with CUDA the
kernels run natively unless ``TRITON_INTERPRET`` is already set.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the kernel benchmark cases (marked benchmark_case); needs CUDA for timings",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_bench = config.getoption("--benchmark")
    has_cuda = torch.cuda.is_available()
    skip_bench = pytest.mark.skip(reason="benchmark case: run with `pytest --benchmark`")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "benchmark_case" in item.keywords and not run_bench:
            item.add_marker(skip_bench)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
