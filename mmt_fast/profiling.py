"""Parameter, FLOP and memory accounting for the benchmarks and ``mmt-fast plan``.

FLOPs follow fvcore's convention (one multiply-add = one FLOP). fvcore counts
matmul/einsum/linear/conv/norm ops by itself; attention ops it does not know
(``F.scaled_dot_product_attention`` and the fused kernels' custom ops) get
handles here, so no attention is silently dropped.

Training memory: on CUDA it is measured (``torch.cuda.max_memory_allocated``
over an AdamW training step after a warm-up step). Without CUDA it is
estimated without computing: the model, optimizer and batch are built under
``FakeTensorMode`` and one step (forward, backward, AdamW update, with the
optimizer state already allocated) runs under a memory tracker, either
:class:`PeakTracker` (fast: constant work per op) or torch's
``torch.distributed._tools.mem_tracker.MemTracker`` (its per-op work grows
with the number of live tensors; the tests check that both agree).

Precision (``precision=``): ``fp32``, or ``fp16`` / ``bf16`` autocast with
fp32 master weights, gradients and AdamW state, as ``torch.autocast`` +
``GradScaler`` train. A CUDA estimate needs CUDA's autocast policy, which
differs from the CPU's (CUDA runs softmax, layer_norm and the losses in fp32;
the CPU keeps them in 16 bits), and fake CUDA tensors cannot run a backward
pass without a GPU. So the estimate applies CUDA's cast policy itself
(:class:`CudaAutocastPolicy`, for the ops these models use); ``torch.autocast``
on the CPU does run under FakeTensorMode, but with the CPU's policy.

Inference memory (:func:`estimate_inference_memory`): one forward pass under
``torch.no_grad()``, tracked the same way. Both estimates run inside
:func:`fake_mode`, which selects the fused kernels' fake implementations
(:mod:`mmt_fast.kernels.dispatch`) where a GPU would run them.

Public, for ``mmt-fast plan`` and the benchmarks: :func:`count_params`,
:func:`count_flops`, :func:`fake_mode`, :func:`estimate_step_memory`,
:func:`estimate_inference_memory`, :func:`estimate_train_memory`,
:func:`measure_train_memory`, :func:`autocast_context`, :func:`make_batch`,
:func:`make_optimizer`, :class:`PeakTracker`, :class:`MemoryResult`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._python_dispatch
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
    modules: tuple[str, ...] = (),
) -> dict[str, float]:
    """fvcore FLOPs of one forward pass: {"total": n, "<operator>": n, ...},
    plus {"module:<name>": n} for each submodule named in ``modules``
    (``"audio_encoder"`` of an MMT, for instance).

    ``inputs``: positional tensors, or keyword tensors (MMT: audio=..., video=...).
    FLOPs are a property of the model, not of the kernels that compute it, so
    by default the fused ops run their PyTorch references, whose matmuls and
    einsums fvcore counts. ``path="auto"`` keeps the dispatch as it is: each
    fused op's custom op then has a handle here that counts what its reference
    counts (tested to agree).
    Raises if fvcore met an attention-like op it could not count.
    """
    from fvcore.nn import FlopCountAnalysis

    from mmt_fast.kernels import dispatch

    if path != "auto":
        with dispatch.use(path):
            return count_flops(model, inputs, path="auto", modules=modules)

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
            by_module = analysis.by_module()
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
    for name in modules:
        # fvcore names submodules from the wrapper (_TupleOut.model)
        key = f"model.{name}"
        if key not in by_module:
            raise KeyError(f"{type(model).__name__} has no submodule {name!r}")
        out[f"module:{name}"] = float(by_module[key])
    return out


# ----------------------------------------------------------------------------- memory

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MemoryResult:
    """peak_bytes: the step's peak. breakdown: bytes at that peak by kind
    (``parameters``, ``gradients``, ``optimizer_state``, ``inputs``,
    ``activations``: everything else, saved activations and temporaries), or
    MemTracker's own categories. method: "estimated" or "measured"."""

    peak_bytes: int
    method: str
    breakdown: dict[str, int]


# CUDA autocast's cast lists (torch/csrc/autocast_mode.cpp, CUDA), restricted
# to the Python-level functions these models call. Matched by function name, so
# F.linear, Tensor.matmul, Tensor.__matmul__ and torch.matmul are all caught.
_LOWER = frozenset(
    {
        "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm",
        "addbmm", "einsum", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention", "prelu",
    }
)  # fmt: skip
_FP32 = frozenset(
    {
        "softmax", "log_softmax", "layer_norm", "group_norm", "cross_entropy", "nll_loss",
        "normalize", "norm", "sum", "cumsum", "prod", "exp", "log", "pow", "__pow__",
        "rsqrt", "reciprocal", "mse_loss", "softplus", "logsumexp", "cosine_similarity",
        "binary_cross_entropy_with_logits", "kl_div",
    }
)  # fmt: skip
_PROMOTE = frozenset({"cat", "stack", "addcmul", "addcdiv", "index_put", "scatter_add"})


class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """CUDA's ``torch.autocast`` cast policy, applied on any device.

    Inside the mode, matmul-like functions (linear, matmul, conv, SDPA, einsum)
    cast floating inputs to ``dtype``; reductions, norms, softmax and the losses
    cast 16-bit inputs to fp32; cat/stack promote to the widest input dtype;
    everything else runs as it comes. Casts of leaf tensors that require grad
    (the fp32 weights) are cached for the life of the mode, as autocast caches
    them. Used under FakeTensorMode to estimate CUDA memory on a machine
    without CUDA; on CUDA the real ``torch.autocast`` is used instead.
    """

    reenter_on_recompute = True  # activation checkpointing recomputes under it

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __exit__(self, *exc):
        self._cache.clear()  # as autocast frees its weight casts on exit
        return super().__exit__(*exc)

    def _cast(self, x, dtype: torch.dtype, only: tuple[torch.dtype, ...]):
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() or x.dtype == dtype or x.dtype not in only:
                return x
            if x.is_leaf and x.requires_grad:
                hit = self._cache.get(id(x))
                if hit is None or hit[0] is not x:
                    hit = (x, x.to(dtype))
                    self._cache[id(x)] = hit
                return hit[1]
            return x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype, only) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _LOWER:
            only = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            args, kwargs = (
                self._cast(args, self.dtype, only),
                {k: self._cast(v, self.dtype, only) for k, v in kwargs.items()},
            )
        elif name in _FP32:
            low = (torch.float16, torch.bfloat16)
            args = self._cast(args, torch.float32, low)
            kwargs = {k: self._cast(v, torch.float32, low) for k, v in kwargs.items()}
        elif name in _PROMOTE:
            seq = args[0] if args and isinstance(args[0], (list, tuple)) else args
            dts = {t.dtype for t in seq if isinstance(t, torch.Tensor) and t.is_floating_point()}
            if len(dts) > 1:
                wide = torch.float64 if torch.float64 in dts else torch.float32
                low = tuple(d for d in dts if d != wide)
                args = self._cast(args, wide, low)
        return func(*args, **kwargs)


class PeakTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensor storage over the ops run inside it.

    Every storage an op returns is counted once, from its first appearance to
    its release (a weakref finalizer), so each op costs O(outputs). Storages
    alive when tracking starts are registered with :meth:`register`. Works on
    fake tensors (FakeTensorMode) as on real ones; no allocator rounding.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_at = 0
        self.t = 0  # event clock: one tick per allocation or release
        # per storage: [nbytes, allocated at, released at (or None), kind]
        self.records: list[list] = []
        self._seen: dict[int, list] = {}

    def _free(self, key: int, rec: list) -> None:
        self.t += 1
        self.live -= rec[0]
        rec[2] = self.t
        self._seen.pop(key, None)

    def register(self, t: torch.Tensor, kind: str = "activations") -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            rec = self._seen[key]
            if kind != "activations":
                rec[3] = kind
            return
        self.t += 1
        rec = [st.nbytes(), self.t, None, kind]
        self._seen[key] = rec
        self.records.append(rec)
        weakref.finalize(st, self._free, key, rec)
        self.live += rec[0]
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self.t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _flat_tensors(out):
            self.register(t)
        return out

    def breakdown(self) -> dict[str, int]:
        """Bytes alive at the peak, by kind (they sum to ``peak``)."""
        at = self.peak_at
        out: dict[str, int] = {}
        for nbytes, first, last, kind in self.records:
            if first <= at and (last is None or last > at):
                out[kind] = out.get(kind, 0) + nbytes
        return out


def _flat_tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat_tensors(v)]
    return []


class _NoScalarReads(torch.overrides.TorchFunctionMode):
    """Under FakeTensorMode there are no values: inside the loss, ``float()``
    and ``item()`` (logging) read 0.0 and ``bool()`` reads True (the losses'
    guards, e.g. "some positive pair exists", take their usual path)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__float__", "item", "__bool__"):
            from torch._subclasses.fake_tensor import FakeTensor

            if isinstance(args[0], FakeTensor):
                return True if name == "__bool__" else 0.0
        return func(*args, **(kwargs or {}))


def _forward_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "label"}
    out = model(inputs["x"]) if set(inputs) == {"x"} else model(**inputs)
    if isinstance(out, torch.Tensor):
        return nn.functional.cross_entropy(out.float(), batch["label"])
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    try:
        with _NoScalarReads():
            loss, _ = model.loss(out, {"label": batch["label"]})
    except DynamicOutputShapeException:
        # the contrastive losses select anchors with positives by boolean
        # masks, whose shapes fake tensors cannot know; their (B x B) tensors
        # are negligible, so the estimate keeps the classification loss and
        # lets the embeddings' graph be freed with it
        loss = sum(
            nn.functional.cross_entropy(v.float(), batch["label"] % v.shape[-1])
            for v in out.logits.values()
        )
        for e in (out.audio_embed, out.video_embed):
            if e is not None:
                loss = loss + 0.0 * e.float().sum()
    return loss


def autocast_context(precision: str, device: str = "cpu"):
    """The autocast a step in ``precision`` (fp32, fp16, bf16) runs under on ``device``:
    nothing for fp32, ``torch.autocast`` on CUDA, and elsewhere (the CPU, fake tensors)
    :class:`CudaAutocastPolicy`, which applies CUDA's cast lists so that an estimate
    made without a GPU sees the dtypes a GPU run would."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device == "cuda":
        return torch.autocast("cuda", dtype=_DTYPES[precision])
    return CudaAutocastPolicy(_DTYPES[precision])


def _train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    precision: str = "fp32",
    device: str = "cpu",
    on_backward_done: Callable[[], None] | None = None,
) -> None:
    """forward + loss under the precision's autocast, backward, AdamW step
    (fp32 master weights; GradScaler's few scalars are not modelled)."""
    with autocast_context(precision, device):
        loss = _forward_loss(model, batch)
    loss.backward()
    if on_backward_done is not None:
        on_backward_done()
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_batch(
    input_shapes: dict[str, tuple[int, ...]], batch_size: int, num_classes: int, device, dtype
) -> dict[str, torch.Tensor]:
    """A random batch: per input name (``input_shapes``: name -> per-sample shape) a
    (batch_size, *shape) normal tensor of ``dtype``, and ``label`` (batch_size,) class ids
    in [0, num_classes)."""
    batch = {
        k: torch.randn(batch_size, *s, device=device, dtype=dtype) for k, s in input_shapes.items()
    }
    batch["label"] = torch.randint(0, num_classes, (batch_size,), device=device)
    return batch


def make_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW as CUDA runs it by default (``foreach``: one multi-tensor op per
    update stage, whose temporaries span all parameters at once)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)


def _init_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Allocate AdamW's state (exp_avg, exp_avg_sq, step) with one update on
    zero gradients, without a forward or backward pass."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _kernel_mode(kernels: bool | str):
    from mmt_fast.kernels import dispatch

    if isinstance(kernels, str):
        return dispatch.use(kernels)
    # True: the fused ops wherever a GPU runs them ("auto" under shape_only: e.g. fp32
    # attention takes the reference on CUDA, mmt_fast.kernels.dispatch.FP32_ON_CUDA)
    return dispatch.use("auto") if kernels else dispatch.use("reference")


@contextlib.contextmanager
def fake_mode(kernels: bool | str = False):
    """Shape-only tracing: FakeTensorMode, with the fused ops' fake
    implementations where a GPU runs the kernels (``kernels=True``, i.e. ``"auto"``;
    ``"triton"`` forces them and raises where a GPU would refuse), the PyTorch references
    (``False``, ``"reference"``), or each op's own choice as on CUDA
    (``"auto"``: Triton where its checks pass)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmt_fast.kernels import dispatch

    with _kernel_mode(kernels), dispatch.shape_only(), FakeTensorMode():
        yield


def estimate_step_memory(
    model: nn.Module,
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
    num_classes: int,
    precision: str = "fp32",
    lr: float = 1e-4,
    tracker: str = "peak",
) -> MemoryResult:
    """Peak memory of one AdamW training step of a model built under
    :func:`fake_mode` (call this inside the same ``fake_mode`` block).

    ``input_shapes`` maps the model's input names ("x" for a single encoder,
    "audio"/"video" for MMT) to per-sample shapes. The optimizer state is
    allocated first; then one step (forward and loss under ``precision``,
    backward, AdamW update) is tracked. ``tracker``: ``"peak"``
    (:class:`PeakTracker`) or ``"memtracker"`` (torch's MemTracker, slower).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    model.train()
    opt = make_optimizer(model, lr)
    _init_optimizer_state(model, opt)
    batch = make_batch(input_shapes, batch_size, num_classes, "cpu", torch.float32)
    if tracker == "memtracker":
        from torch.distributed._tools.mem_tracker import MemTracker

        mt = MemTracker()
        mt.track_external(model, opt)
        with mt:
            _train_step(model, opt, batch, precision)
        stats = next(iter(mt.get_tracker_snapshot("peak").values()))
        breakdown = {getattr(k, "value", str(k)): int(v) for k, v in stats.items()}
        del opt, batch
        return MemoryResult(int(stats["Total"]), "estimated", breakdown)
    if tracker != "peak":
        raise ValueError(f"tracker {tracker!r}: expected 'peak' or 'memtracker'")
    pt = PeakTracker()
    for p in model.parameters():
        pt.register(p, "parameters")
    for b in model.buffers():
        pt.register(b, "parameters")
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                pt.register(v, "optimizer_state")
    for v in batch.values():
        pt.register(v, "inputs")

    def mark_grads() -> None:
        for p in model.parameters():
            if p.grad is not None:
                pt.register(p.grad, "gradients")

    with pt:
        _train_step(model, opt, batch, precision, on_backward_done=mark_grads)
    del opt, batch
    return MemoryResult(pt.peak, "estimated", pt.breakdown())


def estimate_inference_memory(
    model: nn.Module,
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
    precision: str = "fp32",
) -> MemoryResult:
    """Peak memory of one forward pass under ``torch.no_grad()`` (eval mode, ``precision``'s
    autocast) of a model built under :func:`fake_mode` (call this inside the same block);
    ``input_shapes`` as for :func:`estimate_step_memory`. The model is left in train mode."""
    model.eval()
    batch = make_batch(input_shapes, batch_size, 2, "cpu", torch.float32)
    batch.pop("label")
    pt = PeakTracker()
    for p in model.parameters():
        pt.register(p, "parameters")
    for b in model.buffers():
        pt.register(b, "parameters")
    for v in batch.values():
        pt.register(v, "inputs")
    with pt, torch.no_grad(), autocast_context(precision, "cpu"):
        out = model(batch["x"]) if set(batch) == {"x"} else model(**batch)
        del out
    model.train()
    return MemoryResult(pt.peak, "estimated", pt.breakdown())


def estimate_train_memory(
    build: Callable[[], nn.Module],
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
    num_classes: int,
    lr: float = 1e-4,
    kernels: bool = False,
    precision: str = "fp32",
    tracker: str = "peak",
) -> MemoryResult:
    """Peak memory of one AdamW training step, estimated under FakeTensorMode
    (see :func:`estimate_step_memory`). ``kernels``: trace the fused ops'
    custom ops (their fake implementations allocate what the Triton kernels
    allocate and save) instead of the PyTorch references."""
    with fake_mode(kernels):
        model = build()
        return estimate_step_memory(
            model, input_shapes, batch_size, num_classes, precision, lr, tracker
        )


def measure_train_memory(
    build: Callable[[], nn.Module],
    input_shapes: dict[str, tuple[int, ...]],
    batch_size: int,
    num_classes: int,
    device: str = "cuda",
    lr: float = 1e-4,
    kernels: bool = False,
    precision: str = "fp32",
) -> MemoryResult:
    """Peak CUDA memory of an AdamW training step (after one warm-up step),
    with the fused kernels (``kernels=True``) or the PyTorch references, under
    ``torch.autocast`` for fp16/bf16."""
    with _kernel_mode(kernels):
        return _measure(build, input_shapes, batch_size, num_classes, device, lr, precision)


def _measure(build, input_shapes, batch_size, num_classes, device, lr, precision) -> MemoryResult:
    torch.cuda.empty_cache()
    model = build().to(device)
    model.train()
    opt = make_optimizer(model, lr)
    batch = make_batch(input_shapes, batch_size, num_classes, device, torch.float32)
    _train_step(model, opt, batch, precision, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _train_step(model, opt, batch, precision, device)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, batch
    torch.cuda.empty_cache()
    return MemoryResult(int(peak), "measured", {})
