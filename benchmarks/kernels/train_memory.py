"""Peak memory and time of one MAT training step, with and without the fused kernels."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.kernels.baselines import kernel_mode
from benchmarks.kernels.check import _short
from benchmarks.kernels.timing import _free, _sync, environment


def _kernel_ops_seen(model, x) -> list[str]:
    """The mmt_fast custom ops a forward pass dispatches (empty: the layers do not call the
    kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "mmt_fast" in name:
                seen.add(name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        model(x)
    return sorted(seen)


PRECISIONS = ("bf16-autocast", "bf16-weights", "fp32")


def _train_step_once(
    device: torch.device, batch: int, model_name: str, precision: str
) -> dict[str, Any]:
    """Build the model, run two AdamW steps, return the second step's peak memory and time."""
    from mmt_fast import create_model

    res: dict[str, Any] = {"precision": precision}
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=309).to(device)
    cfg = model.cfg
    in_dtype = torch.float32
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
        in_dtype = torch.bfloat16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.endswith("autocast"))  # fmt: skip
    with autocast:
        res["kernel_ops_seen"] = _kernel_ops_seen(
            model, torch.randn(2, cfg.in_chans, *cfg.input_size, device=device, dtype=in_dtype)
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_chans, *cfg.input_size, device=device, dtype=in_dtype)
    y = torch.randint(0, 309, (batch,), device=device)

    def step():
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    _sync(device)
    res["first_step_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    step()
    _sync(device)
    res["step_ms"] = (time.perf_counter() - t0) * 1e3
    if device.type == "cuda":
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["params_and_state_gb"] = base / 1e9
    res["status"] = "ok"
    return res


def train_memory(device: torch.device, batch: int, model_name: str = "MAT") -> dict[str, Any]:
    """Peak memory and time of one AdamW training step of
    ``create_model(model_name, num_classes=309)`` with MMT_FAST_KERNELS=reference and
    =triton: bf16 autocast over fp32 weights (the trainer's ``amp``); if that fails with an
    error other than OOM, bf16 weights without autocast, then fp32 (errors are recorded)."""
    out: dict[str, Any] = {
        "benchmark": "benchmarks.kernels --train-memory",
        "env": environment(device),
        "model": model_name,
        "batch": batch,
        "step": "AdamW, cross-entropy over 309 classes; peak of the second step (the first "
        "allocates optimizer state and compiles)",
        "modes": {},
    }
    for mode in ("reference", "triton"):
        res: dict[str, Any] = {}
        errors = {}
        for precision in PRECISIONS:
            try:
                with kernel_mode(mode):
                    res = _train_step_once(device, batch, model_name, precision)
                break
            except torch.OutOfMemoryError as e:
                res = {"precision": precision, "status": "OOM", "error": _short(e)}
                break
            except Exception as e:
                errors[precision] = _short(e)
                res = {"precision": precision, "status": "error", "error": _short(e)}
            finally:
                _free(device)
        if errors and res.get("status") == "ok":
            res["failed_precisions"] = errors
        out["modes"][mode] = res
        print(f"train step {model_name} batch {batch} {mode}: {res}", flush=True)
    ref, tri = out["modes"]["reference"], out["modes"]["triton"]
    if tri.get("status") == "ok" and not tri.get("kernel_ops_seen"):
        out["note"] = (
            "the model's layers did not dispatch to any mmt_fast kernel op: the 'triton' run "
            "is the reference path"
        )
    if ref.get("peak_gb") and tri.get("peak_gb"):
        out["triton_over_reference_peak"] = tri["peak_gb"] / ref["peak_gb"]
        out["target"] = "at most 0.5"
        out["target_met"] = out["triton_over_reference_peak"] <= 0.5
        if ref.get("precision") != tri.get("precision"):
            out["note"] = "reference and triton ran at different precisions: not comparable"
    return out
