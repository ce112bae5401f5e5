"""The evaluation loop shared by the trainer's validation and every inference command: the
views of each clip folded into the batch, the model under autocast, and each clip's class
probabilities the mean over its views of the softmax of the multimodal logits,
``p = 1/V sum_v softmax(z_v)`` (:func:`mmt_fast.run.metrics.average_views`). With
``record``, a :class:`Recorder` keeps the embeddings named there, averaged over the views.

:func:`run_model` runs on one process; :func:`mmt_fast.run.evaluation.gather_predictions`
gathers its output across ranks.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mmt_fast.data import BadItem
from mmt_fast.run.metrics import average_views

#: what :class:`Recorder` can record (see there)
RECORDABLE = ("audio", "video", "head")


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CUDA for ``amp`` in (auto, bf16); nothing on the CPU (unless bf16)."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_inputs(batch: dict, modalities, device: torch.device) -> tuple[dict, int]:
    """Inputs for ``model(**inputs)`` with views folded into the batch.

    audio (B, 1, F, T) or (B, V, 1, F, T); video (B, 3, T, H, W) or (B, V, 3, T, H, W).
    Returns the inputs ((B * V, ...) tensors) and V.
    """
    inputs, views = {}, 1
    for m in modalities:
        x = batch[m]
        base = 4 if m == "audio" else 5
        if x.ndim == base + 1:
            views = x.shape[1]
            x = x.flatten(0, 1)
        inputs[m] = x.to(device, non_blocking=True)
    return inputs, views


class Recorder:
    """Records embeddings during the forward passes of an MMT model (a context manager).

    - ``audio``, ``video``: the encoder's CLS embedding after its final LayerNorm
      (AST: the mean of the CLS and distillation tokens), (B, C): the encoder's
      ``forward_features`` is wrapped on the instance (restored on exit);
    - ``head``: the input of the classification head(s), taken by forward
      pre-hooks; for MMT ``[LN(video CLS), LN(audio CLS)]`` after the
      AVBottleneck (B, 2C), for one encoder its CLS, for ``avg`` fusion the two
      branches' inputs concatenated in call order (audio, video).

    :meth:`take` returns name -> the tensors recorded since the last call
    (concatenated along the last axis), float32, detached.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] = RECORDABLE) -> None:
        core = model.module if hasattr(model, "module") else model
        names = tuple(names)
        unknown = [n for n in names if n not in RECORDABLE]
        if unknown:
            raise ValueError(f"cannot record {unknown}; expected some of {RECORDABLE}")
        self.parts: dict[str, list[torch.Tensor]] = {}
        self._wrapped: list[nn.Module] = []
        self._handles = []
        for name in core.modalities:
            if name not in names:
                continue
            enc = getattr(core, f"{name}_encoder")
            orig = enc.forward_features

            def wrapper(x, _orig=orig, _name=name):
                f = _orig(x)
                self._add(_name, f.cls)
                return f

            enc.forward_features = wrapper
            self._wrapped.append(enc)
        if "head" in names:
            for n in ("head", "head_video", "head_audio"):
                if hasattr(core, n):
                    hook = getattr(core, n).register_forward_pre_hook(self._head_hook)
                    self._handles.append(hook)

    def _add(self, name: str, x: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(x.detach().float())

    def _head_hook(self, module: nn.Module, args: tuple) -> None:
        self._add("head", args[0])

    def take(self) -> dict[str, torch.Tensor]:
        out = {k: torch.cat(v, dim=-1) for k, v in self.parts.items()}
        self.parts = {}
        return out

    def remove(self) -> None:
        for enc in self._wrapped:
            del enc.forward_features
        for h in self._handles:
            h.remove()
        self._wrapped, self._handles = [], []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class Outputs:
    """What :func:`run_model` returns, one row per clip in loader order.

    ``probs``: head -> (N, C) view-averaged probabilities; ``targets``: head ->
    (N,) the dataset's targets (placeholders for unlabelled clips); ``index``:
    (N,) dataset indices; ``embeddings``: name -> (N, D) view-averaged float32
    (the names recorded); ``skipped``: bad clips per kind; ``bad``: the bad
    clips the loader returned (:class:`~mmt_fast.data.BadItem`).
    """

    probs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    index: torch.Tensor
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    bad: list[BadItem] = field(default_factory=list)


@torch.no_grad()
def run_model(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    amp: str = "auto",
    record: Iterable[str] = (),
    transform: Callable[[dict, torch.device], dict] | None = None,
) -> Outputs:
    """The evaluation loop: ``model`` (on ``device``; a DDP wrapper is fine) in eval mode
    over ``batches`` (from :func:`mmt_fast.data.collate_clips`), views averaged, the
    ``record`` embeddings kept (see :class:`Recorder`); the model's mode is restored.
    ``transform(batch, device)`` finishes each batch first (see :func:`batch_transform`)."""
    core = model.module if hasattr(model, "module") else model
    heads = dict(core.cfg.heads)
    was_training = core.training
    model.eval()
    probs: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    targets: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    embeds: dict[str, list[torch.Tensor]] = {}
    index: list[torch.Tensor] = []
    skipped: collections.Counter = collections.Counter()
    bad: list[BadItem] = []
    record = tuple(record)
    rec = Recorder(core, record) if record else contextlib.nullcontext()
    try:
        with rec:
            for batch in batches:
                skipped.update(batch["skipped"])
                bad += batch.get("bad", [])
                b = batch["batch_size"]
                if not b:
                    continue
                if transform is not None:
                    batch = transform(batch, device)
                inputs, v = model_inputs(batch, core.modalities, device)
                with autocast(device, amp):
                    out = model(**inputs)
                for h in heads:
                    probs[h].append(average_views(out.logits[h].float().view(b, v, -1)).cpu())
                    targets[h].append(batch[h].cpu())
                if record:
                    for name, e in rec.take().items():
                        embeds.setdefault(name, []).append(e.view(b, v, -1).mean(1).cpu())
                index.append(batch["index"].cpu())
    finally:
        model.train(was_training)
    empty_long = torch.empty(0, dtype=torch.long)
    return Outputs(
        probs={h: torch.cat(p) if p else torch.empty(0, heads[h]) for h, p in probs.items()},
        targets={h: torch.cat(t) if t else empty_long for h, t in targets.items()},
        index=torch.cat(index) if index else empty_long,
        embeddings={k: torch.cat(v) for k, v in embeds.items()},
        skipped=dict(skipped),
        bad=bad,
    )


__all__ = ["RECORDABLE", "Outputs", "Recorder", "autocast", "model_inputs", "run_model"]
