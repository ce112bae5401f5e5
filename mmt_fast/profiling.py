"""Parameter, FLOP and training-memory accounting for the benchmarks.

FLOPs follow fvcore's convention (one multiply-add = one FLOP). fvcore counts
matmul/einsum/linear/conv/norm ops by itself; attention ops it does not know
(``F.scaled_dot_product_attention`` and the fused kernels' custom ops) get
handles here, so no attention is silently dropped.

Training memory: on CUDA it is measured (``torch.cuda.max_memory_allocated``
over an AdamW training step after a warm-up step). Without CUDA it is
estimated without computing: the model, optimizer and batch are built under
``FakeTensorMode`` and one step (forward, backward, AdamW update, with the
optimizer state already allocated) runs under
``torch.distributed._tools.mem_tracker.MemTracker``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- FLOPs


def _shape(v) -> list[int]:
    t = v.type()
    return list(t.sizes()) if hasattr(t, "sizes") and t.sizes() is not None else []


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Q K^T and P V of ``scaled_dot_product_attention``: 2 * B*H*Nq*Nk*D MACs."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    *batch, nq, d = q
    nk = k[-2]
    b = 1
    for x in batch:
        b *= x
    return 2 * b * nq * nk * d


# op name -> fvcore handle. The kernel integration adds its custom ops here.
EXTRA_FLOP_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
}


class _TupleOut(nn.Module):
    """fvcore traces with torch.jit: give it a module with tensor inputs and a tuple output."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *xs):
        out = self.model(**dict(zip(self.keys, xs))) if self.keys else self.model(*xs)
        if isinstance(out, torch.Tensor):
            return (out,)
        if hasattr(out, "logits"):
            return tuple(out.logits.values())
        raise TypeError(f"cannot count FLOPs of an output of type {type(out).__name__}")


def count_flops(
    model: nn.Module, inputs: dict[str, torch.Tensor] | tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """fvcore FLOPs of one forward pass: {"total": n, "<operator>": n, ...}.

    ``inputs``: positional tensors, or keyword tensors (MMT: audio=..., video=...).
    Raises if fvcore met an attention-like op it could not count.
    """
    from fvcore.nn import FlopCountAnalysis

    keys: tuple[str, ...] = tuple(inputs) if isinstance(inputs, dict) else ()
    args = tuple(inputs.values()) if isinstance(inputs, dict) else tuple(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(_TupleOut(model, keys), args)
            analysis.set_op_handle(**EXTRA_FLOP_HANDLES)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            total = analysis.total()
            unsupported = analysis.unsupported_ops()
    finally:
        model.train(was_training)
    missed = [op for op in unsupported if "attention" in op or op.startswith("mmt_fast::")]
    if missed:
        raise RuntimeError(f"fvcore could not count these attention ops: {missed}")
    out = {"total": float(total)}
    out.update({k: float(v) for k, v in analysis.by_operator().items()})
    return out


# ----------------------------------------------------------------------------- memory


@dataclass
class MemoryResult:
    peak_bytes: int
    method: str  # "estimated" | "measured"
    breakdown: dict[str, int]


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]):
    inputs = {k: v for k, v in batch.items() if k != "label"}
    out = model(inputs["x"]) if set(inputs) == {"x"} else model(**inputs)
    if isinstance(out, torch.Tensor):
        loss = nn.functional.cross_entropy(out.float(), batch["label"])
    else:
        loss, _ = model.loss(out, {"label": batch["label"]})
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _make_batch(
    input_shapes: dict[str, tuple[int, ...]], batch_size: int, num_classes: int, device, dtype
) -> dict[str, torch.Tensor]:
    batch = {
        k: torch.randn(batch_size, *s, device=device, dtype=dtype) for k, s in input_shapes.items()
    }
    batch["label"] = torch.randint(0, num_classes, (batch_size,), device=device)
    return batch


def estimate_train_memory(
    build: Callable[[], nn.Module],
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
    num_classes: int,
    lr: float = 1e-4,
) -> MemoryResult:
    """Peak memory of one AdamW training step, estimated under FakeTensorMode.

    ``input_shapes`` maps the model's input names ("x" for a single encoder,
    "audio"/"video" for MMT) to per-sample shapes. One untracked step
    allocates the optimizer state; the next step is tracked.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        batch = _make_batch(input_shapes, batch_size, num_classes, "cpu", torch.float32)
        _train_step(model, opt, batch)
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            _train_step(model, opt, batch)
        snap = tracker.get_tracker_snapshot("peak")
    stats = next(iter(snap.values()))
    breakdown = {getattr(k, "value", str(k)): int(v) for k, v in stats.items()}
    return MemoryResult(int(stats["Total"]), "estimated", breakdown)


def measure_train_memory(
    build: Callable[[], nn.Module],
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
    num_classes: int,
    device: str = "cuda",
    lr: float = 1e-4,
) -> MemoryResult:
    """Peak CUDA memory of an AdamW training step (after one warm-up step)."""
    torch.cuda.empty_cache()
    model = build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = _make_batch(input_shapes, batch_size, num_classes, device, torch.float32)
    _train_step(model, opt, batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _train_step(model, opt, batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, batch
    torch.cuda.empty_cache()
    return MemoryResult(int(peak), "measured", {})
