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
    if not isinstance(t, torch._C.TensorType) or t.sizes() is None:
        return []
    return list(t.sizes())


def _tensor_inputs(inputs: list[Any]) -> list[Any]:
    return [v for v in inputs if isinstance(v.type(), torch._C.TensorType)]


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Q K^T and P V of ``scaled_dot_product_attention``: 2 * B*H*Nq*Nk*D MACs."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    *batch, nq, d = q
    nk = k[-2]
    b = 1
    for x in batch:
        b *= x
    return 2 * b * nq * nk * d


def _const(v):
    """The value of a constant in a traced graph (ints, bools, and int lists
    built with ``prim::ListConstruct``)."""
    value = v.toIValue()
    if value is None and v.node().kind() == "prim::ListConstruct":
        value = [_const(x) for x in v.node().inputs()]
    return value


def relpos_attention_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``mmt_fast::relpos_attention_fwd``: Q K^T and P V (2 B H Nq Nk D) plus the
    decomposed bias q . R_a (B H (Nq - cls) sum_a k_a D), as the reference's
    matmuls and einsums count."""
    B, H, nq, d = _shape(inputs[0])
    nk = _shape(inputs[1])[2]
    k_grid = list(_const(inputs[5]))
    tables = inputs[3].node()
    n_tables = len(list(tables.inputs())) if tables.kind() == "prim::ListConstruct" else len(k_grid)
    cls = int(bool(_const(inputs[6])))
    bias = B * H * (nq - cls) * sum(k_grid) * d if n_tables else 0
    return 2 * B * H * nq * nk * d + bias


def pooled_qkv_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``mmt_fast::pooled_qkv_fwd``: the depthwise convolutions (one MAC per
    kernel tap per pooled spatial element) and the LayerNorms (5 per element,
    fvcore's count for an affine norm) of q, k and v. The projection is a
    separate linear."""
    tensors = _tensor_inputs(inputs)
    kernel = 1
    for s in _shape(tensors[1])[2:]:
        kernel *= s
    cls = int(bool(_const(inputs[11])))
    total = 0
    for out in outputs:
        B, H, n, d = _shape(out)
        total += B * H * (n - cls) * d * kernel + 5 * B * H * n * d
    return total


def bottleneck_attention_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``mmt_fast::bottleneck_attention_fwd``: both query segments over both key
    segments, 2 B H (Nm + L)^2 D."""
    tensors = _tensor_inputs(inputs)
    B, H, nm, d = _shape(tensors[0])
    n = nm + _shape(tensors[3])[2]
    return 2 * B * H * n * n * d


# op name -> fvcore handle, for every attention-like op fvcore does not count.
EXTRA_FLOP_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "mmt_fast::relpos_attention_fwd": relpos_attention_flop_jit,
    "mmt_fast::pooled_qkv_fwd": pooled_qkv_flop_jit,
    "mmt_fast::bottleneck_attention_fwd": bottleneck_attention_flop_jit,
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
    model: nn.Module,
    inputs: dict[str, torch.Tensor] | tuple[torch.Tensor, ...],
    path: str = "reference",
) -> dict[str, float]:
    """fvcore FLOPs of one forward pass: {"total": n, "<operator>": n, ...}.

    ``inputs``: positional tensors, or keyword tensors (MMT: audio=..., video=...).
    FLOPs are a property of the model, not of the kernels that compute it, so
    by default the fused ops run their PyTorch references, whose matmuls and
    einsums fvcore counts. ``path="auto"`` keeps the dispatch as it is: each
    fused op's custom op then has a handle here that counts what its reference
    counts (tested to agree).
    Raises if fvcore met an attention-like op it could not count.
    """
    from fvcore.nn import FlopCountAnalysis

    from kernels import dispatch

    if path != "auto":
        with dispatch.use(path):
            return count_flops(model, inputs, path="auto")

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
    missed = [
        op
        for op in unsupported
        if any(s in op.lower() for s in ("attention", "mmt_fast::", "qkv"))
        and op not in EXTRA_FLOP_HANDLES
    ]
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
    kernels: bool = False,
) -> MemoryResult:
    """Peak memory of one AdamW training step, estimated under FakeTensorMode.

    ``input_shapes`` maps the model's input names ("x" for a single encoder,
    "audio"/"video" for MMT) to per-sample shapes. One untracked step
    allocates the optimizer state; the next step is tracked. ``kernels``:
    trace the fused ops' custom ops (their fake implementations allocate what
    the Triton kernels allocate and save) instead of the PyTorch references.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from kernels import dispatch

    mode = dispatch.use("triton") if kernels else dispatch.use("reference")
    with mode, dispatch.shape_only(), FakeTensorMode():
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
    kernels: bool = False,
) -> MemoryResult:
    """Peak CUDA memory of an AdamW training step (after one warm-up step),
    with the fused kernels (``kernels=True``) or the PyTorch references."""
    from kernels import dispatch

    with dispatch.use("triton" if kernels else "reference"):
        return _measure(build, input_shapes, batch_size, num_classes, device, lr)


def _measure(build, input_shapes, batch_size, num_classes, device, lr) -> MemoryResult:
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
