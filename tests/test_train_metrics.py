"""Evaluation metrics against brute-force computations."""

import math

import pytest
import torch

from mmt_fast import create_model
from mmt_fast.run import metrics as M
from mmt_fast.run.evaluation import gather_predictions, report


def _brute_topk(probs, targets, k):
    hits = 0
    for p, t in zip(probs.tolist(), targets.tolist()):
        ranked = sorted(range(len(p)), key=lambda c: -p[c])
        hits += t in ranked[:k]
    return 100.0 * hits / len(targets)


def _brute_softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


@pytest.mark.parametrize(("n", "c", "k"), [(37, 10, 1), (37, 10, 5), (20, 3, 5), (50, 309, 5)])
def test_topk_matches_brute_force(n, c, k):
    g = torch.Generator().manual_seed(n * c + k)
    probs = torch.rand(n, c, generator=g)
    targets = torch.randint(0, c, (n,), generator=g)
    got = M.topk_accuracy(probs, targets, ks=(k,))[f"top{k}"]
    assert got == pytest.approx(_brute_topk(probs, targets, k), abs=1e-9)


@pytest.mark.parametrize("views", [1, 3, 5])
def test_multiview_average_matches_brute_force(views):
    g = torch.Generator().manual_seed(views)
    logits = torch.randn(6, views, 7, generator=g) * 3
    got = M.average_views(logits)
    for i in range(6):
        per_view = [_brute_softmax(logits[i, v].tolist()) for v in range(views)]
        want = [sum(pv[c] for pv in per_view) / views for c in range(7)]
        assert got[i].tolist() == pytest.approx(want, abs=1e-6)


def test_action_accuracy_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    n, cv, cn = 40, 6, 9
    pv = torch.rand(n, cv, generator=g).softmax(-1)
    pn = torch.rand(n, cn, generator=g).softmax(-1)
    verb = torch.randint(0, cv, (n,), generator=g)
    noun = torch.randint(0, cn, (n,), generator=g)
    # make some clips right on both heads, some on one only
    verb[:10], noun[:10] = pv[:10].argmax(-1), pn[:10].argmax(-1)
    verb[10:20] = pv[10:20].argmax(-1)
    got = M.action_accuracy(pv, pn, verb, noun)
    both = [(pv[i].argmax() == verb[i]) & (pn[i].argmax() == noun[i]) for i in range(n)]
    assert got["top1"] == pytest.approx(100.0 * sum(bool(b) for b in both) / n)
    hits5 = 0
    for i in range(n):
        pairs = sorted(((pv[i, a] * pn[i, b]).item(), a, b) for a in range(cv) for b in range(cn))[
            ::-1
        ][:5]
        hits5 += any(a == verb[i] and b == noun[i] for _, a, b in pairs)
    assert got["top5"] == pytest.approx(100.0 * hits5 / n)


def test_confusion_and_per_class_accuracy():
    targets = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0])
    cm = M.confusion_matrix(pred, targets, 4)
    want = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(targets.tolist(), pred.tolist()):
        want[t, p] += 1
    assert torch.equal(cm, want)
    pca = M.per_class_accuracy(cm)
    assert pca[:3].tolist() == pytest.approx([200 / 3, 200 / 3, 50.0])
    assert math.isnan(pca[3])  # no clips of class 3
    rep = M.head_report(torch.nn.functional.one_hot(pred, 4).float(), targets)
    assert rep["mean_class_accuracy"] == pytest.approx((200 / 3 + 200 / 3 + 50) / 3)
    assert rep["per_class_accuracy"][3] is None


@pytest.mark.parametrize("preset", ["MMT-tiny", "MMT-tiny-EK"])
def test_gather_predictions_averages_views_of_the_real_model(preset):
    """gather_predictions() folds (B, V, ...) views into the batch, averages the softmax per
    clip, and restores dataset order; compared with per-view forward passes."""
    torch.manual_seed(0)
    model = create_model(preset).eval()
    heads = model.cfg.heads
    n, v = 5, 3
    audio = torch.randn(n, v, 1, 32, 64)
    video = torch.randn(n, v, 3, 4, 32, 32)
    targets = {h: torch.randint(0, c, (n,)) for h, c in heads.items()}
    order = [3, 0, 4, 1, 2]  # batches arrive out of dataset order
    batches = []
    for chunk in (order[:2], order[2:]):
        idx = torch.tensor(chunk)
        b = {"audio": audio[idx], "video": video[idx], "index": idx, "batch_size": len(chunk)}
        b.update({h: t[idx] for h, t in targets.items()})
        b["skipped"] = {"corrupt_file": 1} if chunk[0] == 3 else {}
        batches.append(b)
    pred = gather_predictions(model, batches, torch.device("cpu"))
    assert pred["index"].tolist() == [0, 1, 2, 3, 4]
    assert pred["skipped"] == {"corrupt_file": 1}
    with torch.no_grad():
        for h in heads:
            per_view = torch.stack(
                [
                    model(audio=audio[:, k], video=video[:, k]).logits[h].softmax(-1)
                    for k in range(v)
                ],
                1,
            )
            torch.testing.assert_close(pred["probs"][h], per_view.mean(1), atol=1e-5, rtol=1e-4)
            assert torch.equal(pred["targets"][h], targets[h])
    res = report(pred)
    if preset == "MMT-tiny-EK":
        assert set(res["heads"]) == {"verb", "noun"} and "action" in res
        both = (pred["probs"]["verb"].argmax(-1) == targets["verb"]) & (
            pred["probs"]["noun"].argmax(-1) == targets["noun"]
        )
        assert res["top1"] == pytest.approx(100.0 * both.float().mean().item())
    else:
        assert res["top1"] == pytest.approx(
            _brute_topk(pred["probs"]["label"], targets["label"], 1)
        )
