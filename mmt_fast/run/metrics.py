"""Classification metrics (pure functions on tensors).

Shapes: ``probs`` (N, C) class probabilities (after view averaging), ``targets``
(N,) int64. Multi-view: :func:`average_views` takes per-view logits (N, V, C)
and returns the mean of the softmaxes over the V views (the paper's 5-view
testing). Epic-Kitchens: an action is a (verb, noun) pair; its score is
``p_verb[v] * p_noun[n]`` (the heads treated as independent), so the top-1
action is (argmax verb, argmax noun) and the action is right when both are.
"""

from __future__ import annotations

import torch


def average_views(logits: torch.Tensor) -> torch.Tensor:
    """(N, V, C) logits -> (N, C) mean over views of softmax; (N, C) is treated as V = 1."""
    if logits.ndim == 2:
        logits = logits[:, None]
    return logits.float().softmax(-1).mean(1)


def topk_correct(probs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: the target is among the k highest scores (k clipped to C)."""
    k = min(k, probs.shape[-1])
    top = probs.topk(k, dim=-1).indices
    return (top == targets[:, None]).any(-1)


def topk_accuracy(probs: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} in percent."""
    if len(targets) == 0:
        return {f"top{k}": float("nan") for k in ks}
    n = len(targets)
    return {f"top{k}": 100.0 * int(topk_correct(probs, targets, k).sum()) / n for k in ks}


def action_scores(p_verb: torch.Tensor, p_noun: torch.Tensor) -> torch.Tensor:
    """(N, Cv), (N, Cn) -> (N, Cv * Cn) joint scores; action id = verb * Cn + noun."""
    return (p_verb[:, :, None] * p_noun[:, None, :]).flatten(1)


def action_accuracy(
    p_verb: torch.Tensor,
    p_noun: torch.Tensor,
    verb: torch.Tensor,
    noun: torch.Tensor,
    ks=(1, 5),
) -> dict[str, float]:
    """Top-k accuracy (percent) of the joint (verb, noun) prediction."""
    joint = action_scores(p_verb, p_noun)
    return topk_accuracy(joint, verb * p_noun.shape[1] + noun, ks)


def confusion_matrix(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    idx = targets.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """(C,) percent right per true class (nan for classes without clips)."""
    n = cm.sum(1).double()
    return torch.where(n > 0, 100.0 * cm.diag().double() / n.clamp_min(1), torch.nan)


def head_report(probs: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k, per-class and mean-class accuracy and the confusion matrix of one head."""
    c = probs.shape[1]
    cm = confusion_matrix(probs.argmax(-1), targets, c)
    pca = per_class_accuracy(cm)
    valid = ~torch.isnan(pca)
    return {
        **topk_accuracy(probs, targets, ks),
        "mean_class_accuracy": float(pca[valid].mean()) if valid.any() else float("nan"),
        "per_class_accuracy": [None if torch.isnan(x) else float(x) for x in pca],
        "confusion_matrix": cm.tolist(),
        "num_clips": len(targets),
    }


def plot_confusion(cm, names: list[str] | None, path, title: str = "") -> None:
    """Save a row-normalised confusion matrix as an image (PNG/PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.as_tensor(cm).double()
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    c = cm.shape[0]
    size = min(4 + 0.25 * c, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if names is not None and c <= 60:
        ax.set_xticks(range(c), names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
