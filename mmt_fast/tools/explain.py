"""``mmt-fast explain``: Grad-CAM of one clip on both encoders, with the top-5 predictions.

Grad-CAM (Selvaraju et al., 2017) on token features: for the last block of an
encoder (the last stage's output, *before* the encoder's final LayerNorm) with
grid tokens ``A`` (N, C) (the CLS / distillation tokens left out) and the
gradient ``G = d z_target / d A`` of the target class's logit (before the
softmax; for MMT the multimodal logit, so the gradient flows back through the
AVBottleneck):

    alpha_c = 1/N sum_n G[n, c]                 (channel weights: averaged gradients)
    cam_n   = ReLU(sum_c alpha_c A[n, c])        (N,), reshaped to the token grid

and upsampled (linear interpolation) to the input: (T, H, W) frames for the
video encoder, (F, T) = (mel bins, frames) for MAT's spectrogram. Each map is
scaled to [0, 1] by its maximum (all zeros stays zeros).

The clip is decoded as in evaluation (one test view: the centre crop and the
middle temporal window); the picture shows ``--frames`` frames sampled evenly
from the model's input frames with their heat overlaid, the spectrogram with
its heat, and the top-5 classes with their probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmt_fast.data import ClipRecord, collate_clips
from mmt_fast.errors import ConfigError, DataError
from mmt_fast.inference import LoadedRun, batch_transform, clip_dataset, model_inputs


@dataclass
class CamLayer:
    """Where Grad-CAM reads the features: ``module``'s output (a tensor (B, P + N, C),
    or a tuple whose first item is one), ``prefix`` = P leading non-grid tokens
    (CLS, distillation), ``grid`` the token grid with prod(grid) = N."""

    module: nn.Module
    grid: tuple[int, ...]
    prefix: int = 0


def grad_cam(
    forward: Callable[[], torch.Tensor],
    target: int | None,
    layers: dict[str, CamLayer],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Grad-CAM maps on the token grids of ``layers`` for one sample.

    ``forward()`` runs the model and returns the logits (1, K) of the sample;
    ``target``: the class whose logit is explained (None: the arg-max).
    Returns the logits (1, K) (detached) and name -> cam (``grid``, float32,
    non-negative, not yet scaled); see the module docstring for the formula.
    """
    feats: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out) -> None:
            feats[name] = out[0] if isinstance(out, tuple) else out

        return fn

    handles = [spec.module.register_forward_hook(hook(n)) for n, spec in layers.items()]
    try:
        with torch.enable_grad():
            logits = forward()
            if logits.ndim != 2 or logits.shape[0] != 1:
                raise ValueError(
                    f"grad_cam explains one sample: logits (1, K), got {tuple(logits.shape)}"
                )
            t = int(logits.argmax(-1)) if target is None else int(target)
            names = list(layers)
            missing = [n for n in names if n not in feats]
            if missing:
                raise RuntimeError(f"the layers {missing} did not run in the forward pass")
            grads = torch.autograd.grad(logits[0, t], [feats[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    cams = {}
    for n, g in zip(names, grads):
        spec = layers[n]
        a = feats[n][0, spec.prefix :].detach().float()  # (N, C)
        g = torch.zeros_like(a) if g is None else g[0, spec.prefix :].float()
        n_tok = int(np.prod(spec.grid))
        if a.shape[0] != n_tok:
            raise ValueError(f"{n}: {a.shape[0]} tokens do not fill the grid {spec.grid}")
        alpha = g.mean(0)  # (C,)
        cams[n] = torch.relu(a @ alpha).reshape(spec.grid)
    return logits.detach(), cams


def upsample(cam: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear interpolation of a 2-D or 3-D map to ``size``, scaled to [0, 1] by its maximum."""
    mode = {2: "bilinear", 3: "trilinear"}[cam.ndim]
    up = F.interpolate(cam[None, None].float(), size=tuple(size), mode=mode, align_corners=False)
    up = up[0, 0].clamp_min(0)
    m = float(up.max())
    return up / m if m > 0 else up


def encoder_layer(encoder: nn.Module) -> CamLayer:
    """The last block of a multiscale encoder (MAT, MViTv2) or of AST."""
    if hasattr(encoder, "grids"):  # MultiscaleEncoder
        return CamLayer(
            encoder.blocks[-1], tuple(encoder.grids[-1]), int(encoder.cls_token is not None)
        )
    return CamLayer(encoder.blocks[-1], tuple(encoder.cfg.patch_grid), 2)  # AST: CLS + dist


@dataclass
class Explanation:
    """One clip explained: ``probs`` (K,), ``target`` the explained class id,
    ``inputs`` modality -> (C, *size) model input, ``heat`` modality -> map of the
    input's size ((T, H, W) or (F, T)) in [0, 1], ``class_names`` (K)."""

    probs: torch.Tensor
    target: int
    inputs: dict[str, torch.Tensor]
    heat: dict[str, torch.Tensor]
    class_names: list[str]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        p, i = self.probs.topk(min(k, len(self.probs)))
        return [(self.class_names[j], float(v)) for j, v in zip(i.tolist(), p.tolist())]


def _load_clip(run: LoadedRun, path: str) -> dict[str, torch.Tensor]:
    rec = ClipRecord(path=str(path), clip_id=Path(path).stem)
    ds = clip_dataset(run, [rec], 1, labelled=False)
    if ds.dropped:
        b = ds.dropped[0]
        raise DataError(f"{path}: {b.kind}: {b.reason}")
    batch = collate_clips([ds[0]])
    if batch["bad"]:
        b = batch["bad"][0]
        raise DataError(f"{path}: {b.kind}: {b.reason}")
    transform = batch_transform(ds)
    if transform is not None:
        batch = transform(batch, torch.device("cpu"))
    inputs, _ = model_inputs(batch, run.model.modalities, torch.device("cpu"))
    return inputs


def explain_clip(run: LoadedRun, path: str, target: str | None = None) -> Explanation:
    """Grad-CAM of ``target`` (a class name; None: the top-1) for the clip at ``path``
    on the last stage of each encoder of ``run``'s model (on the CPU, fp32)."""
    model = run.model.cpu().eval()
    names = list(run.classes["names"]) if run.classes.get("kind") == "label" else None
    if names is None:
        raise ConfigError("explain supports label classification runs (one 'label' head)")
    t = None
    if target is not None:
        if target not in names:
            raise ConfigError(f"--target {target!r} is not a class of this run: {', '.join(names)}")
        t = names.index(target)
    inputs = _load_clip(run, path)
    layers = {m: encoder_layer(getattr(model, f"{m}_encoder")) for m in model.modalities}
    logits, cams = grad_cam(lambda: model(**inputs).logits["label"].float(), t, layers)
    probs = logits[0].softmax(-1)
    t = int(probs.argmax()) if t is None else t
    x = {m: v[0].detach() for m, v in inputs.items()}
    heat = {m: upsample(cams[m], tuple(x[m].shape[1:])) for m in cams}
    return Explanation(probs, t, x, heat, names)


def plot_explanation(ex: Explanation, path: str | Path, title: str = "", frames: int = 4) -> Path:
    """Write the picture: frames with heat, spectrogram with heat, top-5 (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_v, has_a = "video" in ex.heat, "audio" in ex.heat
    nf = frames if has_v else 0
    cols = max(nf, 2)
    rows = int(has_v) + int(has_a) + 1
    ratios = [1.0] * (rows - 1) + [0.55]  # the last row: the top-5 text
    fig = plt.figure(figsize=(2.6 * cols, 2.6 * sum(ratios) + 0.4))
    gs = fig.add_gridspec(rows, cols, height_ratios=ratios)
    r = 0
    if has_v:
        v = ex.inputs["video"]  # (3, T, H, W), normalised
        idx = np.linspace(0, v.shape[1] - 1, nf).round().astype(int)
        lo, hi = float(v.min()), float(v.max())
        for j, fi in enumerate(idx):
            ax = fig.add_subplot(gs[r, j])
            img = ((v[:, fi].permute(1, 2, 0) - lo) / max(hi - lo, 1e-6)).clamp(0, 1).numpy()
            ax.imshow(img)
            ax.imshow(ex.heat["video"][fi].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(f"frame {fi}", fontsize=8)
            ax.axis("off")
        r += 1
    if has_a:
        ax = fig.add_subplot(gs[r, :])
        spec = ex.inputs["audio"][0].numpy()  # (F, T)
        ax.imshow(spec, origin="lower", aspect="auto", cmap="gray")
        ax.imshow(ex.heat["audio"].numpy(), origin="lower", aspect="auto", cmap="jet", alpha=0.45)
        ax.set_xlabel("fbank frame (10 ms)")
        ax.set_ylabel("mel bin")
        ax.set_title("spectrogram + Grad-CAM (MAT last stage)", fontsize=9)
        r += 1
    ax = fig.add_subplot(gs[r, :])
    ax.axis("off")
    lines = [f"{i + 1}. {n}  {p:.3f}" for i, (n, p) in enumerate(ex.top(5))]
    ax.text(
        0.0, 1.0, f"Grad-CAM target: {ex.class_names[ex.target]}\ntop-5:\n" + "\n".join(lines),
        va="top", family="monospace", fontsize=9,
    )  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
