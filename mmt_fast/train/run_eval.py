"""``mmt-fast evaluate``: a checkpoint on a split, with multi-view testing.

By default a run is evaluated with what it was trained with: the config and the
class index saved in its checkpoint folder (``config.yaml``, ``classes.json``),
loaded by :func:`mmt_fast.inference.load_run`; the clips are decoded as every
inference command decodes them (:func:`mmt_fast.inference.clip_dataset`), on
each rank's share of the split.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmt_fast import inference
from mmt_fast.data.dataset import check_split
from mmt_fast.errors import DataError
from mmt_fast.train import builders as B
from mmt_fast.train import distributed as D
from mmt_fast.train.config import TrainConfig
from mmt_fast.train.evaluate import predict, report, summary, write_report
from mmt_fast.train.sampling import ResumableSampler


def evaluate_checkpoint(
    config: TrainConfig | str | Path | None,
    checkpoint: str | Path,
    split: str = "test",
    views: int | None = None,
    out: str | Path | None = None,
    which: str = "best",
    plot: bool = True,
    overrides: list[str] | None = None,
) -> dict:
    """Evaluate ``checkpoint`` (file, checkpoint folder or run folder) on ``split``.

    ``config``: None to use the config saved with the checkpoint (``overrides``
    apply to it), or a YAML path / :class:`TrainConfig` whose model section must
    match. The class index comes from the checkpoint. Writes ``out`` (default
    ``RUN_DIR/eval_<split>.json``, beside ``metrics.csv``) and the confusion-matrix
    plots beside it; returns the report (see :func:`report`).
    """
    run = inference.load_run(checkpoint, config, overrides, which)
    cfg, ck, classes = run.cfg, run.checkpoint, run.classes
    info = D.setup(cfg.train.device)
    try:
        records = inference.split_records(cfg, split)
        model = run.model.to(info.device)
        nv = inference.resolve_views(cfg, split, views)
        ds = inference.clip_dataset(run, records, nv, split=split)
        check_split(split, ds, cfg.data.max_bad_fraction)
        sampler = ResumableSampler(len(ds), info.world_size, info.rank, shuffle=False, pad=False)
        loader = B.make_loader(
            ds,
            cfg.data.eval_batch_size or cfg.train.batch_size,
            cfg.data.num_workers,
            sampler,
            cfg.train.seed,
            0,
            drop_last=False,
        )
        pred = predict(
            model,
            loader,
            info.device,
            cfg.train.amp,
            progress=info.is_main,
            transform=inference.batch_transform(ds),
        )
        if info.is_main:  # records dropped when the dataset was built (not seen by the loader)
            for b in ds.dropped:
                pred["skipped"][b.kind] = pred["skipped"].get(b.kind, 0) + 1
        if len(pred["index"]) == 0:
            raise DataError(
                f"no clip of the {split} split could be evaluated (skipped {pred['skipped']})"
            )
        names = classes.get("names") if classes.get("kind") == "label" else None
        res = report(pred, names)
        res.update(checkpoint=str(ck.path), step=ck.step, split=split, views=nv)
        if info.is_main:
            dest = Path(out) if out else run.run_dir / f"eval_{split}.json"
            files = write_report(res, dest, plot=plot)
            print(f"[mmt-fast] {split}: {summary(res)}", file=sys.stderr)
            print(
                f"[mmt-fast] checkpoint: {ck.path} (step {ck.step}; --which {which})",
                file=sys.stderr,
            )
            print(f"[mmt-fast] wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
        return res
    finally:
        D.cleanup()
