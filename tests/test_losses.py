"""Each loss against a brute-force loop over pairs, written from Eq. 3-8."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmt_fast import losses


def brute(a, b, pos, tau, exclude_self=False):
    """-mean_i [ sum_{j pos} log(exp(s_ij) / sum_{k cand} exp(s_ik)) / |pos_i| ]
    over anchors i with at least one positive."""
    B = a.shape[0]
    total, n = 0.0, 0
    for i in range(B):
        cand = [k for k in range(B) if not (exclude_self and k == i)]
        denom = sum(math.exp(float(a[i] @ b[k]) / tau) for k in cand)
        ps = [j for j in cand if pos(i, j)]
        if not ps:
            continue
        total += -sum(math.log(math.exp(float(a[i] @ b[j]) / tau) / denom) for j in ps) / len(ps)
        n += 1
    return total / n if n else 0.0


def emb(B, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=-1)


LABELS = [
    torch.tensor([0, 1, 0, 2, 1, 0]),
    torch.tensor([3, 3, 3, 3]),
    torch.tensor([0, 1, 2, 3, 4]),  # every class has a single member
    torch.tensor([5, 5, 7]),  # one singleton class
]


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_avc_against_loop(labels, tau):
    a, v = emb(len(labels)), emb(len(labels), seed=1)

    def same(i, j):
        return labels[i] == labels[j]

    want = 0.5 * (brute(a, v, same, tau) + brute(v, a, same, tau))
    got = losses.avc_loss(a, v, labels, tau)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("labels", LABELS)
def test_imc_against_loop(labels):
    x = emb(len(labels), seed=2)

    def same(i, j):
        return labels[i] == labels[j]

    want = brute(x, x, same, 0.07, exclude_self=True)
    got = losses.imc_loss(x, labels, 0.07)
    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_imc_with_only_singletons_is_zero_and_differentiable():
    x = emb(4, seed=3).requires_grad_()
    loss = losses.imc_loss(x, torch.tensor([0, 1, 2, 3]), 0.07)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert x.grad is not None and torch.all(x.grad == 0)


@pytest.mark.parametrize("B", [1, 3, 6])
def test_al_and_imal_against_loop(B):
    a, v = emb(B, seed=4), emb(B, seed=5)

    def eye(i, j):
        return i == j

    want = 0.5 * (brute(a, v, eye, 0.07) + brute(v, a, eye, 0.07))
    assert float(losses.al_loss(a, v, 0.07)) == pytest.approx(want, rel=1e-9)
    assert float(losses.imal_loss(a, v, 0.07)) == pytest.approx(want, rel=1e-9)


def test_multi_head_labels_need_every_head_to_agree():
    verb_noun = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    mask = losses.same_label(verb_noun)
    assert mask.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]


def test_total_loss_is_eq_8():
    """L = L_CLS + 0.25 L_AVC + 0.25 (L_IMC^V + L_IMC^A) / 2, from the parts."""
    from mmt_fast import create_model

    torch.manual_seed(0)
    model = create_model("MMT-tiny")
    out = model(audio=torch.randn(4, 1, 32, 64), video=torch.randn(4, 3, 4, 32, 32))
    y = torch.tensor([0, 1, 0, 1])
    total, parts = model.loss(out, {"label": y})
    ce = F.cross_entropy(out.logits["label"], y)
    avc = losses.avc_loss(out.audio_embed, out.video_embed, y, 0.07)
    imc = (losses.imc_loss(out.video_embed, y) + losses.imc_loss(out.audio_embed, y)) / 2
    expected = (ce + 0.25 * avc + 0.25 * imc).detach()
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert parts["avc"] == pytest.approx(float(avc.detach()), rel=1e-5)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        losses.contrastive_loss(emb(3), emb(4), torch.eye(3, dtype=torch.bool), 0.07)
    with pytest.raises(KeyError, match="targets lack"):
        losses.classification_loss(
            {"verb": torch.zeros(2, 3)}, {"noun": torch.zeros(2, dtype=torch.long)}
        )
