"""``mmt-fast analyze``: Table 5 of the paper on a trained run (the work is
:func:`mmt_fast.tools.analysis.analyze`): a split's audio, video and fused embeddings
clustered with k-means (k = number of classes), the adjusted Rand index and homogeneity of
each, and a t-SNE map of each embedding."""

from __future__ import annotations

import argparse

HELP = "cluster a split's audio/video/fused embeddings (k-means ARI, homogeneity; t-SNE)"
DESCRIPTION = (
    "Table 5: embed a split with a trained run, k-means with k = number of classes, adjusted "
    "Rand index and homogeneity per embedding (printed + JSON), and a t-SNE map of each "
    "embedding (PNG)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file")
    p.add_argument("--config", default=None, help="a YAML instead of the run's saved config")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--views", type=int, default=None, help="views per clip (default: the run's)")
    p.add_argument("--which", default="best", choices=("best", "latest"), help="for a run folder")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="k-means and t-SNE seed")
    p.add_argument("--no-plot", action="store_true", help="skip the t-SNE picture")


def run(args: argparse.Namespace) -> int:
    from mmt_fast.tools.analysis import analyze  # here: --help answers before torch loads

    analyze(
        args.checkpoint,
        args.config,
        args.split,
        args.out,
        args.views,
        args.which,
        args.device,
        args.seed,
        plot=not args.no_plot,
    )
    return 0
