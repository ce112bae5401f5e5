"""``mmt-fast analyze``: clustering of the learned embeddings (the paper's Table 5) and t-SNE maps.

Every clip of a split is embedded by the trained run, averaged over the test
views (as in ``mmt-fast predict``), in up to three ways:

- ``audio``: the audio encoder's CLS embedding (MAT; the mean of the CLS and
  distillation tokens for AST), after its final LayerNorm, (N, C_A);
- ``video``: the video encoder's CLS embedding, after its final LayerNorm, (N, C_V);
- ``fused``: the input of MMT's classification head, ``[LN(video CLS), LN(audio CLS)]``
  after the AVBottleneck (N, 2C); for ``avg`` fusion ``[video CLS, audio CLS]``.

An audio-only or video-only model has only its own embedding. Each embedding is
clustered by k-means (scikit-learn, k = number of classes, 10 initialisations,
seeded) and the clusters are compared with the true classes:

- adjusted Rand index, ``ARI = (RI - E[RI]) / (max RI - E[RI])`` over pairs of
  clips (1: the same partition, about 0: chance, may be negative);
- homogeneity, ``h = 1 - H(C | K) / H(C)`` (1: every cluster holds one class).

Writes ``OUT/analysis_<split>.json`` (the table, with the number of clips and
the embedding sizes; per clip its path, class id and k-means cluster in each
embedding), ``OUT/tsne_<split>.png`` (a 2-D t-SNE map of each embedding,
points coloured by class name) and prints the table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmt_fast.errors import DataError
from mmt_fast.inference import (
    LoadedRun,
    batch_transform,
    clip_dataset,
    clip_loader,
    load_run,
    resolve_device,
    resolve_views,
    run_model,
)
from mmt_fast.run.builders import split_records

EMBEDDINGS = ("audio", "video", "fused")


@dataclass
class SplitEmbeddings:
    """``embeddings``: name -> (N, D) float32 (view-averaged); ``targets``: head -> (N,)
    int64 class ids; ``class_names``: head -> names; ``paths``: the N clips, in row order;
    ``skipped``: bad clips per kind."""

    embeddings: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    class_names: dict[str, list[str]]
    paths: list[str]
    skipped: dict[str, int]


def embed_split(
    run: LoadedRun,
    split: str = "test",
    views: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SplitEmbeddings:
    """Embed every clip of ``split`` with ``run``'s model (see the module docstring; the
    loop is :func:`mmt_fast.inference.run_model`, the embeddings its ``audio``, ``video``
    and, for two encoders, ``head`` recordings)."""
    cfg = run.cfg
    records = split_records(cfg, split)
    device = resolve_device(device)
    nv = resolve_views(cfg, split, views)
    ds = clip_dataset(run, records, nv, split=split)
    batches = clip_loader(run, ds)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"embed {split}", unit="batch", file=sys.stderr, leave=False)
    model = run.model.to(device)
    out = run_model(
        model,
        batches,
        device,
        cfg.train.amp,
        ("audio", "video", "head"),
        transform=batch_transform(ds),
    )
    skipped: dict[str, int] = {}
    for b in ds.dropped:
        skipped[b.kind] = skipped.get(b.kind, 0) + 1
    for k, n in out.skipped.items():
        skipped[k] = skipped.get(k, 0) + n
    if not len(out.index):
        raise DataError(f"no clip of the {split} split could be embedded (skipped {skipped})")
    embeds = {m: out.embeddings[m] for m in model.modalities}
    if len(model.modalities) == 2:
        embeds["fused"] = out.embeddings["head"]
    return SplitEmbeddings(
        embeddings={k: embeds[k].numpy() for k in EMBEDDINGS if k in embeds},
        targets={h: t.numpy() for h, t in out.targets.items()},
        class_names=run.class_names,
        paths=[ds.records[i].path for i in out.index.tolist()],
        skipped=skipped,
    )


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster ids (N,) of k-means on ``x`` (N, D) (k clusters, 10 seeded initialisations)."""
    from sklearn.cluster import KMeans

    if len(x) < k:
        raise DataError(f"{len(x)} clips cannot be clustered into k={k} clusters")
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x.astype(np.float64))


def cluster_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """Adjusted Rand index and homogeneity of ``clusters`` (N,) against ``labels`` (N,)."""
    from sklearn.metrics import adjusted_rand_score, homogeneity_score

    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "homogeneity": float(homogeneity_score(labels, clusters)),
    }


def tsne_map(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates (N, 2) of ``x`` (N, D) (perplexity min(30, (N - 1) / 3))."""
    from sklearn.manifold import TSNE

    n = len(x)
    if n < 3:
        return np.zeros((n, 2)) if n == 0 else np.c_[np.arange(n, dtype=float), np.zeros(n)]
    perplexity = float(max(1.0, min(30.0, (n - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        x.astype(np.float64)
    )


def plot_tsne(
    maps: dict[str, np.ndarray], labels: np.ndarray, names: list[str], path: str | Path, title: str
) -> Path:
    """One scatter panel per embedding, points coloured by class name; writes ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for ax, (emb, xy) in zip(axes[0], maps.items()):
        for c, name in enumerate(names):
            sel = labels == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(c % cmap.N), label=name)
        ax.set_title(emb)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(names) <= 20:
        axes[0][-1].legend(fontsize=7, loc="best", markerscale=1.2)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(res: dict) -> str:
    """The printed table: one row per embedding (and head), ARI and homogeneity."""
    lines = [f"{'embedding':<10} {'head':<6} {'dim':>5} {'ARI':>7} {'homog.':>7}"]
    for emb, per_head in res["embeddings"].items():
        for h, s in per_head["scores"].items():
            lines.append(
                f"{emb:<10} {h:<6} {per_head['dim']:>5} {s['ari']:>7.3f} {s['homogeneity']:>7.3f}"
            )
    return "\n".join(lines)


def analyze(
    checkpoint: str | Path,
    config: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    views: int | None = None,
    which: str = "best",
    device: str | None = None,
    seed: int = 0,
    plot: bool = True,
    progress: bool = True,
) -> dict:
    """Embed ``split``, cluster and score each embedding, write JSON + t-SNE PNG into
    ``out`` (default: the run folder); returns the JSON's content."""
    run = load_run(checkpoint, config, None, which)
    se = embed_split(run, split, views, device, progress)
    res: dict = {
        "checkpoint": str(run.checkpoint.path),
        "split": split,
        "num_clips": len(next(iter(se.targets.values()))),
        "skipped": se.skipped,
        "kmeans": {"k": {h: len(n) for h, n in se.class_names.items()}, "n_init": 10, "seed": seed},
        "embeddings": {},
    }
    for name, x in se.embeddings.items():
        clusters = {h: kmeans(x, len(se.class_names[h]), seed) for h in se.targets}
        res["embeddings"][name] = {
            "dim": int(x.shape[1]),
            "scores": {h: cluster_scores(se.targets[h], c) for h, c in clusters.items()},
            "clusters": {h: c.tolist() for h, c in clusters.items()},
        }
    res["clips"] = se.paths
    res["targets"] = {h: t.tolist() for h, t in se.targets.items()}
    res["class_names"] = se.class_names
    dest = Path(out) if out is not None else run.run_dir
    dest.mkdir(parents=True, exist_ok=True)
    files = [dest / f"analysis_{split}.json"]
    files[0].write_text(json.dumps(res, indent=1) + "\n")
    if plot:
        if progress:
            print(f"[mmt-fast] t-SNE of {len(se.embeddings)} embeddings", file=sys.stderr)
        h = next(iter(se.targets))
        maps = {k: tsne_map(x, seed) for k, x in se.embeddings.items()}
        title = f"t-SNE of the {split} embeddings ({res['num_clips']} clips, colour: {h})"
        files.append(
            plot_tsne(maps, se.targets[h], se.class_names[h], dest / f"tsne_{split}.png", title)
        )
    print(format_table(res))
    print(f"[mmt-fast] wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return res
