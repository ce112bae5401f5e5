"""Test configuration.

Triton's interpreter must be switched on before any ``@triton.jit`` function is
imported, so that the kernels run on the CPU (``TRITON_INTERPRET=1``; see
docs/design.md). On a machine with CUDA the kernels run natively unless
``TRITON_INTERPRET`` is already set.

``pytest`` runs everything except the kernel benchmark cases (marked
``benchmark_case``); ``pytest --benchmark`` runs only those.
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
        help="run only the kernel benchmark cases (marked benchmark_case); timings need CUDA",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_bench = config.getoption("--benchmark")
    if run_bench:  # only the benchmark cases
        keep = [it for it in items if "benchmark_case" in it.keywords]
        dropped = [it for it in items if "benchmark_case" not in it.keywords]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    has_cuda = torch.cuda.is_available()
    skip_bench = pytest.mark.skip(reason="benchmark case: run with `pytest --benchmark`")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "benchmark_case" in item.keywords and not run_bench:
            item.add_marker(skip_bench)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
