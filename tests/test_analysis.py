"""``mmt-fast analyze`` (Table 5: k-means of the embeddings, ARI and homogeneity,
t-SNE) and ``mmt-fast explain`` (Grad-CAM) on a tiny MMT trained on generated
clips (label = motion x pitch).

- analyze: the scores are scikit-learn's on the k-means clusters; they are
  checked against brute-force pair counting (ARI) and entropies (homogeneity)
  computed here from the clusters and classes the JSON lists; the fused
  embedding must separate the 4 classes better than either encoder's, which can
  only see one factor (homogeneity <= 0.5 in expectation for them).
- explain: a tiny model trained in test time does not reliably put its heat on
  the square or the tone (its last-stage grids are 2 x 2 to 4 x 4 tokens), so
  the Grad-CAM function is checked on hand-built models whose answer is known
  (closed-form Grad-CAM in float64; the heat on the synthetic square and on the
  tone's mel band), and the command end to end for the validity of its output.
"""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmt_fast.cli import main
from mmt_fast.data.synthetic import MOTION_VECTORS, MOTIONS, render_clip
from mmt_fast.tools.explain import CamLayer, grad_cam, upsample

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "demo_synthetic.yaml"


@pytest.fixture(scope="module")
def data_dir(synthetic_320):
    """The session's 320-clip set (tests/conftest.py), shared with test_train_learning.py."""
    return synthetic_320


@pytest.fixture(scope="module")
def run(trained_synthetic):
    """A tiny MMT trained as in the demo (8 epochs, 224 train clips; the session's run,
    shared with test_train_learning.py)."""
    return trained_synthetic("MMT-tiny").out_dir


@pytest.fixture(scope="module")
def analysis(run, tmp_path_factory):
    import json

    out = tmp_path_factory.mktemp("analysis")
    assert main(["analyze", "--checkpoint", str(run), "--out", str(out)]) == 0
    return json.loads((out / "analysis_test.json").read_text()), out


def _pairs_ari(a: list[int], b: list[int]) -> float:
    """Adjusted Rand index by counting pairs of items (Hubert & Arabie)."""
    n = len(a)
    both = same_a = same_b = 0
    for i, j in itertools.combinations(range(n), 2):
        sa, sb = a[i] == a[j], b[i] == b[j]
        both += sa and sb
        same_a += sa
        same_b += sb
    total = n * (n - 1) // 2
    expected = same_a * same_b / total
    return (both - expected) / ((same_a + same_b) / 2 - expected)


def _homogeneity(labels: list[int], clusters: list[int]) -> float:
    n = len(labels)

    def entropy(counts):
        return -sum(c / n * math.log(c / n) for c in counts if c)

    h_c = entropy([labels.count(c) for c in set(labels)])
    h_ck = 0.0
    for k in set(clusters):
        members = [c for c, kk in zip(labels, clusters) if kk == k]
        h_ck -= sum(
            members.count(c) / n * math.log(members.count(c) / len(members)) for c in set(members)
        )
    return 1.0 - h_ck / h_c


def test_analyze_scores_and_pictures(analysis, capsys):
    res, out = analysis
    assert res["num_clips"] == 48 and len(res["clips"]) == 48
    assert res["class_names"]["label"] == ["left-300Hz", "left-700Hz", "right-300Hz", "right-700Hz"]
    assert list(res["embeddings"]) == ["audio", "video", "fused"]
    assert res["embeddings"]["fused"]["dim"] == 2 * res["embeddings"]["audio"]["dim"]
    labels = res["targets"]["label"]
    for name, e in res["embeddings"].items():
        s = e["scores"]["label"]
        clusters = e["clusters"]["label"]
        assert -1.0 <= s["ari"] <= 1.0 and 0.0 <= s["homogeneity"] <= 1.0, (name, s)
        assert len(set(clusters)) <= 4 and len(clusters) == 48
        assert s["ari"] == pytest.approx(_pairs_ari(labels, clusters), abs=1e-9)
        assert s["homogeneity"] == pytest.approx(_homogeneity(labels, clusters), abs=1e-9)
    scores = {k: e["scores"]["label"] for k, e in res["embeddings"].items()}
    print("test-split clustering:", scores)
    fused = scores.pop("fused")
    for single in scores.values():
        assert fused["ari"] > single["ari"] + 0.2, (fused, scores)
        assert fused["homogeneity"] > single["homogeneity"] + 0.2, (fused, scores)
    import matplotlib.image

    img = matplotlib.image.imread(out / "tsne_test.png")
    assert img.ndim == 3 and img.shape[1] > 2 * img.shape[0]  # three panels side by side
    assert img[..., :3].std() > 0.05  # not a blank picture


def test_single_modality_models_have_one_embedding(data_dir):
    """An audio-only model (untrained: the embeddings' existence and shapes, not their quality)."""
    from mmt_fast.inference import LoadedRun
    from mmt_fast.run import builders as B
    from mmt_fast.run import load_config
    from mmt_fast.tools.analysis import embed_split

    m = str(data_dir / "manifest.csv")
    ov = [f"data.train={m}", f"data.test={m}", "model.preset=MMT-tiny-audio", "data.test_views=2"]
    cfg = load_config(DEMO, ov)
    classes = B.class_info(cfg.data, B.read_records(cfg.data, "train"))
    mc = B.model_config(cfg, classes)
    torch.manual_seed(0)
    run = LoadedRun(cfg, None, classes, mc, B.build_model(mc).eval())
    se = embed_split(run, "test", progress=False)
    assert list(se.embeddings) == ["audio"]
    assert se.embeddings["audio"].shape == (48, run.model.audio_encoder.num_features)
    assert np.isfinite(se.embeddings["audio"]).all()
    assert sorted(np.bincount(se.targets["label"]).tolist()) == [12, 12, 12, 12]
    assert [Path(p).name for p in se.paths][:2] == ["clip_00272.mp4", "clip_00273.mp4"]


def test_ari_reference_on_known_partitions():
    from mmt_fast.tools.analysis import cluster_scores

    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert cluster_scores(labels, np.array([2, 2, 2, 0, 0, 0, 1, 1, 1])) == {
        "ari": 1.0,
        "homogeneity": 1.0,
    }
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 30), rng.integers(0, 3, 30)
        s = cluster_scores(a, b)
        assert s["ari"] == pytest.approx(_pairs_ari(a.tolist(), b.tolist()), abs=1e-12)
        assert s["homogeneity"] == pytest.approx(_homogeneity(a.tolist(), b.tolist()), abs=1e-12)


# ---------------------------------------------------------------- Grad-CAM
class _Toy(nn.Module):
    """Patch embedding with two channels: relu(mean patch value - threshold) and a
    constant; the hooked ``block`` (identity) is the last-stage tokens; a linear head on
    their mean. d z_t / d A[n, c] = W[t, c] / N, so Grad-CAM = relu(A @ W[t] / N)."""

    def __init__(self, nd: int, patch: tuple[int, ...], chans: int, thr: float) -> None:
        super().__init__()
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.embed = conv(chans, 2, patch, stride=patch)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[0] = 1.0 / (chans * math.prod(patch))
            self.embed.bias.copy_(torch.tensor([-thr, 1.0]))
        self.block = nn.Identity()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(self.embed(x))
        self.grid = tuple(t.shape[2:])
        return self.fc(self.block(t.flatten(2).transpose(1, 2)).mean(1))


def _square_mask(seed: int, size: int, t: int) -> np.ndarray:
    """(T, size, size) bool: the square's pixels, from the draws render_clip makes."""
    rng = np.random.default_rng(seed)
    rng.uniform(0, 100, 3)  # background
    side = int(rng.integers(size // 8, size // 4 + 1))
    rng.uniform(150, 255, 3)  # colour
    speed = rng.uniform(1.0, 2.5) * size / 64
    y0, x0 = rng.uniform(0, size, 2)
    dy, dx = MOTION_VECTORS[MOTIONS[0]]
    mask = np.zeros((t, size, size), bool)
    ar = np.arange(side)
    for i in range(t):
        y, x = int(y0 + dy * speed * i) % size, int(x0 + dx * speed * i) % size
        mask[i][np.ix_((y + ar) % size, (x + ar) % size)] = True
    return mask


def test_grad_cam_closed_form_and_square():
    size, t = 32, 8
    frames, _, _ = render_clip(0, 0, np.random.default_rng(3), size=size, duration=0.5)
    assert frames.shape[0] == t
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float()  # (1, 3, T, H, W)
    model = _Toy(3, (1, 4, 4), 3, thr=125.0)
    model(x)
    layers = {"video": CamLayer(model.block, model.grid)}
    logits, cams = grad_cam(lambda: model(x), 0, layers)
    # closed form in float64
    w, b = model.embed.weight.detach().double(), model.embed.bias.detach().double()
    a = torch.relu(torch.nn.functional.conv3d(x.double(), w, b, stride=(1, 4, 4)))
    a = a.flatten(2)[0].T  # (N, 2)
    ref = torch.relu(a @ model.fc.weight[0].double() / a.shape[0]).reshape(model.grid)
    torch.testing.assert_close(cams["video"].double(), ref, rtol=1e-5, atol=1e-7)
    assert logits.shape == (1, 2)
    # the heat sits on the square (its pixels drawn as render_clip draws them)
    heat = upsample(cams["video"], (t, size, size)).numpy()
    assert heat.max() == pytest.approx(1.0)
    mask = _square_mask(3, size, t)
    inside = heat[mask].sum() / heat.sum()
    assert inside > 4 * mask.mean(), (inside, mask.mean())
    # a target whose weight on the square channel is negative: the heat avoids the square
    _, cams1 = grad_cam(lambda: model(x), 1, layers)
    ref1 = torch.relu(a @ model.fc.weight[1].double() / a.shape[0]).reshape(model.grid)
    torch.testing.assert_close(cams1["video"].double(), ref1, rtol=1e-5, atol=1e-7)
    heat1 = upsample(cams1["video"], (t, size, size)).numpy()
    assert heat1[mask].sum() / heat1.sum() < mask.mean()


def test_grad_cam_on_the_tone_band():
    from mmt_fast.data.audio import fbank

    _, audio, freq = render_clip(0, 1, np.random.default_rng(5), size=16, duration=1.0)
    mel_bins = 32
    spec = fbank(torch.from_numpy(audio), mel_bins).T  # (F, T)
    x = spec[None, None]
    # one token per mel bin and 8 frames; the tone's bins reach ~3, noise bins stay below 0
    model = _Toy(2, (1, 8), 1, thr=1.0)
    model(x)
    _, cams = grad_cam(lambda: model(x), 0, {"audio": CamLayer(model.block, model.grid)})
    heat = upsample(cams["audio"], tuple(spec.shape)).numpy()

    # the tone's mel bin (Kaldi: 20 Hz .. 8 kHz, bins evenly spaced in 1127 ln(1 + f / 700))
    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    centre = (mel(freq) - lo) / ((hi - lo) / (mel_bins + 1)) - 1
    band = np.zeros(mel_bins, bool)
    band[max(0, int(centre) - 2) : int(centre) + 4] = True
    inside = heat[band].sum() / heat.sum()
    assert inside > 0.8 and band.mean() < 0.25, (inside, centre)


def test_explain_command(run, data_dir, tmp_path, capsys):
    import csv

    import matplotlib.image

    rows = [r for r in csv.DictReader(open(data_dir / "manifest.csv")) if r["split"] == "test"]
    clip = data_dir / rows[0]["path"]
    png = tmp_path / "cam.png"
    capsys.readouterr()
    args = ["explain", "--checkpoint", str(run), "--clip", str(clip), "--out", str(png)]
    assert main([*args, "--target", "left-700Hz"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = ["left-300Hz", "left-700Hz", "right-300Hz", "right-700Hz"]
    top = [line.split("\t") for line in out]
    assert len(top) == 4  # top-5 of 4 classes
    assert sorted(n.split(". ")[1] for n, _ in top) == names
    probs = [float(p) for _, p in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-3)
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and min(img.shape[:2]) > 300 and img[..., :3].std() > 0.05
    assert main([*args, "--target", "up-9000Hz"]) == 2  # a config error, in one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'up-9000Hz' is not a class of this run" in err[0], err
    bad = ["explain", "--checkpoint", str(run), "--clip", str(tmp_path / "missing.mp4")]
    assert main(bad) == 3  # a data error
    assert "missing.mp4: no such file" in capsys.readouterr().err


def test_explain_grad_cam_on_the_trained_model(run, data_dir):
    """The maps of the real encoders: finite, in [0, 1], of the input's size."""
    from mmt_fast.inference import load_run
    from mmt_fast.tools.explain import explain_clip

    clip = sorted(data_dir.glob("clip_*.mp4"))[-1]
    ex = explain_clip(load_run(run), str(clip))
    assert set(ex.heat) == {"audio", "video"}
    for m, h in ex.heat.items():
        assert h.shape == ex.inputs[m].shape[1:]
        assert torch.isfinite(h).all() and float(h.min()) >= 0 and float(h.max()) <= 1.0
    assert ex.target == int(ex.probs.argmax())


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from mmt_fast.cli import main\n"
        "for cmd in ('analyze', 'explain'):\n"
        "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "--checkpoint" in r.stdout and "--clip" in r.stdout and "--target" in r.stdout
