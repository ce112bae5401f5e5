"""Evaluation across ranks: multi-view predictions gathered from every rank, accuracy reports
(for the trainer's validation and ``mmt-fast evaluate``).

Each clip's prediction is the mean over its test views of the softmax of the
multimodal logits (``output.logits``, p_AV). Single-label data: top-1/top-5,
per-class and mean-class accuracy, the confusion matrix (JSON and a plot).
Epic-Kitchens (verb + noun heads): verb, noun and action top-1/top-5, where the
action prediction is joint over the two heads (see :mod:`metrics`). Under
``torchrun`` every rank predicts its share (the loop is
:func:`mmt_fast.run.loop.run_model`) and the results are gathered on every rank.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import torch
from torch import nn

from mmt_fast.run import distributed as D
from mmt_fast.run import metrics as M
from mmt_fast.run.loop import run_model

__all__ = ["gather_predictions", "report", "summary", "write_report"]


@torch.no_grad()
def gather_predictions(
    model: nn.Module,
    loader,
    device: torch.device,
    amp: str = "auto",
    progress: bool = False,
    transform=None,
) -> dict:
    """Run ``model`` over ``loader`` (:func:`mmt_fast.run.loop.run_model`: views averaged);
    returns (on every rank, gathered from all ranks)
    ``{"probs": {head: (N, C)}, "targets": {head: (N,)}, "index": (N,), "skipped": {kind: n}}``
    sorted by dataset index, duplicates (sampler padding) removed. ``transform(batch, device)``,
    when given, finishes each batch on the device
    (:class:`~mmt_fast.data.device_transforms.DeviceTransform`)."""
    core = model.module if hasattr(model, "module") else model
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    o = run_model(model, it, device, amp, transform=transform)
    heads = list(core.cfg.heads)
    local = {"probs": o.probs, "targets": o.targets, "index": o.index, "skipped": o.skipped}
    parts = D.all_gather_object(local)
    idx = torch.cat([p["index"] for p in parts])
    order = torch.argsort(idx, stable=True)
    idx = idx[order]
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[1:] = idx[1:] != idx[:-1]
    sel = order[keep]
    merged_skips = collections.Counter()
    for p in parts:
        merged_skips.update(p["skipped"])
    out = {"probs": {}, "targets": {}, "index": idx[keep], "skipped": dict(merged_skips)}
    for h in heads:
        pr = [p["probs"][h] for p in parts if h in p["probs"] and p["probs"][h].numel()]
        tg = [p["targets"][h] for p in parts if h in p["targets"] and p["targets"][h].numel()]
        out["probs"][h] = torch.cat(pr)[sel] if pr else torch.empty(0, 0)
        out["targets"][h] = torch.cat(tg)[sel] if tg else torch.empty(0, dtype=torch.long)
    return out


def report(pred: dict, class_names: list[str] | None = None) -> dict:
    """Accuracy report from :func:`gather_predictions`' output (percentages).

    Keys: ``top1``/``top5`` (the ``label`` head, or the action for verb/noun),
    ``heads`` (per head: top-k, per-class accuracy, confusion matrix),
    ``action`` (verb/noun only), ``num_clips``, ``skipped``.
    """
    probs, targets = pred["probs"], pred["targets"]
    res: dict = {"heads": {}, "num_clips": len(pred["index"]), "skipped": pred["skipped"]}
    for h in probs:
        res["heads"][h] = M.head_report(probs[h], targets[h])
    if set(probs) == {"verb", "noun"}:
        res["action"] = M.action_accuracy(
            probs["verb"], probs["noun"], targets["verb"], targets["noun"]
        )
        res["top1"], res["top5"] = res["action"]["top1"], res["action"]["top5"]
        res["verb_top1"] = res["heads"]["verb"]["top1"]
        res["noun_top1"] = res["heads"]["noun"]["top1"]
    else:
        h = next(iter(probs))
        res["top1"], res["top5"] = res["heads"][h]["top1"], res["heads"][h]["top5"]
        res["mean_class_accuracy"] = res["heads"][h]["mean_class_accuracy"]
        if class_names is not None:
            res["class_names"] = class_names
    return res


def summary(res: dict) -> str:
    parts = [f"top1 {res['top1']:.2f}", f"top5 {res['top5']:.2f}"]
    if "verb_top1" in res:
        parts = [
            f"verb {res['verb_top1']:.2f}",
            f"noun {res['noun_top1']:.2f}",
            f"action {res['top1']:.2f} (top5 {res['top5']:.2f})",
        ]
    elif "mean_class_accuracy" in res:
        parts.append(f"mean-class {res['mean_class_accuracy']:.2f}")
    parts.append(f"{res['num_clips']} clips")
    if res["skipped"]:
        parts.append(f"skipped {res['skipped']}")
    return ", ".join(parts)


def write_report(res: dict, out_json: str | Path, plot: bool = True) -> list[Path]:
    """Write the JSON and one confusion-matrix PNG per head beside it; returns the paths."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    written = [out_json]
    if plot:
        for h, r in res["heads"].items():
            names = res.get("class_names") if h == "label" else None
            png = out_json.with_name(f"{out_json.stem}_confusion_{h}.png")
            M.plot_confusion(
                r["confusion_matrix"], names, png, title=f"{h}: top-1 {r['top1']:.1f}%"
            )
            written.append(png)
    return written
