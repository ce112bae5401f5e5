"""Losses of MMT (Eq. 3, 4, 7, 8) and of the ablations.

All contrastive losses share one form. For L2-normalised embeddings a, b of
shape (B, d), temperature tau, a positive mask P (B, B) and a candidate mask C:

    log p[i, j] = a_i . b_j / tau - log sum_{k in C_i} exp(a_i . b_k / tau)
    loss_i      = - sum_j P[i, j] log p[i, j] / sum_j P[i, j]
    loss        = mean of loss_i over anchors i with at least one positive

- AVC (Eq. 3, supervised audio-video): a = g_A(E_A^CLS), b = g_V(E_V^CLS),
  P[i, j] = [y_i == y_j] (the clip's own pair included), every clip a
  candidate; averaged over both directions (audio->video and video->audio).
- AL (unsupervised alignment, ablation "+AL"): the same with P = identity
  (ALBEF's image-text contrastive form).
- IMC (Eq. 4/7, supervised intra-modal, per modality): a = b = one modality's
  embeddings, P[i, j] = [y_i == y_j and i != j], candidates k != i (SupCon's
  form: a clip is not its own positive, and an anchor that is the only member
  of its class in the batch contributes nothing).
- IMAL (unsupervised intra-modal, ablation "+AVC+IMAL"): with one view per
  clip the only unsupervised intra-modal positive pair we have is the clip's
  embedding before and after the AVBottleneck; a = g(E^CLS), b = g(Ê^CLS),
  P = identity, both directions. This is our interpretation; the paper cites
  Yang et al.'s augmentation views without giving the form.

Labels for several heads (Epic-Kitchens verb + noun) are combined: a pair is
positive when every head agrees (the same action).

Total (Eq. 8): L = L_CLS + lambda1 L_align + lambda2 (L_intra^V + L_intra^A) / 2,
lambda1 = lambda2 = 0.25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    positives: torch.Tensor,
    temperature: float,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The shared form above. a, b: (B, d) normalised; positives, candidates: (B, B) bool."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"embeddings must both be (B, d), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    B = a.shape[0]
    if positives.shape != (B, B):
        raise ValueError(f"positive mask must be ({B}, {B}), got {tuple(positives.shape)}")
    logits = a @ b.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax over a batch in half precision loses too much
    logits = logits / temperature
    if candidates is not None:
        positives = positives & candidates
        logits = logits.masked_fill(~candidates, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = positives.float()
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return (a.sum() + b.sum()) * 0.0
    # -inf (non-candidates) times 0 would be nan: zero those entries first.
    per_anchor = -(log_p.masked_fill(~positives, 0.0) * pos).sum(1)
    return (per_anchor[has] / n_pos[has]).mean()


def same_label(labels: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, heads) labels -> (B, B) mask of pairs that agree on every head."""
    if labels.ndim == 1:
        labels = labels[:, None]
    return (labels[:, None, :] == labels[None, :, :]).all(-1)


def avc_loss(a: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07):
    """Supervised audio-video contrastive loss (Eq. 3), both directions."""
    pos = same_label(labels)
    return 0.5 * (
        contrastive_loss(a, v, pos, temperature) + contrastive_loss(v, a, pos.t(), temperature)
    )


def al_loss(a: torch.Tensor, v: torch.Tensor, temperature: float = 0.07):
    """Unsupervised audio-video alignment: the clip's own pair is the positive."""
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    return 0.5 * (
        contrastive_loss(a, v, eye, temperature) + contrastive_loss(v, a, eye, temperature)
    )


def imc_loss(x: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07):
    """Supervised intra-modal contrastive loss (Eq. 4/7) within one modality."""
    not_self = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return contrastive_loss(x, x, same_label(labels), temperature, candidates=not_self)


def imal_loss(before: torch.Tensor, after: torch.Tensor, temperature: float = 0.07):
    """Unsupervised intra-modal alignment between a modality's embeddings
    before and after fusion (the same clip is the positive)."""
    return al_loss(before, after, temperature)


def classification_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
    """Sum of the cross-entropies of every head."""
    missing = set(logits) - set(targets)
    if missing:
        raise KeyError(f"targets lack {sorted(missing)}; got {sorted(targets)}")
    return sum(F.cross_entropy(logits[k].float(), targets[k]) for k in logits)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
