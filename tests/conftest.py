"""Test configuration.

Triton's interpreter must be switched on before any ``@triton.jit`` function is
imported, so that the kernels run on the CPU (``TRITON_INTERPRET=1``; see
docs/design.md). On a machine with CUDA the kernels run natively unless
``TRITON_INTERPRET`` is already set.

``pytest`` runs everything except the kernel benchmark cases (marked
``benchmark_case``); ``pytest --benchmark`` runs only those.

Shared, built once per session: :func:`synthetic_320` (the 320-clip generated
set) and :func:`trained_synthetic` (runs trained on it as in the demo; the
MMT-tiny run serves tests/test_train_learning.py and tests/test_analysis.py).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

DEMO = Path(__file__).parents[1] / "configs" / "demo_synthetic.yaml"


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


@pytest.fixture(scope="session")
def synthetic_320(tmp_path_factory) -> Path:
    """The generated set of the learning tests: 320 clips of 2 s at 32 x 32 px (label =
    motion x pitch, 4 classes; 224 train, 48 val, 48 test rows in ``manifest.csv``)."""
    from mmt_fast.data.synthetic import make_synthetic

    d = tmp_path_factory.mktemp("syn320")
    make_synthetic(d, num_clips=320, seed=0, size=32, duration=2.0)
    return d


@dataclass
class TrainedRun:
    """A run trained by :func:`trained_synthetic`: its folder, its config and what
    :func:`mmt_fast.train.train` returned."""

    out_dir: Path
    cfg: object
    result: dict


@pytest.fixture(scope="session")
def trained_synthetic(synthetic_320, tmp_path_factory):
    """``trained_synthetic(preset)``: a run of ``preset`` trained on :func:`synthetic_320`
    as in the demo config (8 epochs of 14 steps of 16 clips, decoded clips cached, seed 0,
    one thread, no validation, the final weights kept; ``data.test_views=1``), trained
    once per session and preset. About 20-30 s per tiny model on 2 cores."""
    from mmt_fast.run import load_config
    from mmt_fast.train import train

    runs: dict[str, TrainedRun] = {}
    m = str(synthetic_320 / "manifest.csv")

    def get(preset: str) -> TrainedRun:
        if preset not in runs:
            out = tmp_path_factory.mktemp("runs") / preset
            cfg = load_config(
                DEMO,
                [
                    f"data.train={m}",
                    f"data.test={m}",
                    "data.val=null",
                    "data.cache=true",
                    "data.num_workers=0",
                    "data.test_views=1",
                    f"model.preset={preset}",
                    f"train.out_dir={out}",
                    "train.epochs=8",
                    "train.eval_every=0",
                    "train.ckpt_every=null",
                    "train.torch_threads=1",
                    "train.progress=false",
                    "train.tensorboard=false",
                    "train.seed=0",
                ],
            )
            runs[preset] = TrainedRun(out, cfg, train(cfg))
        return runs[preset]

    return get
