"""``mmt-fast evaluate``: a checkpoint on a split, with multi-view testing."""

from __future__ import annotations

import sys
from pathlib import Path

from mmt_fast.data.dataset import check_split
from mmt_fast.errors import ConfigError, DataError
from mmt_fast.train import builders as B
from mmt_fast.train import distributed as D
from mmt_fast.train.checkpoint import load_checkpoint
from mmt_fast.train.config import TrainConfig
from mmt_fast.train.evaluate import predict, report, summary, write_report
from mmt_fast.train.sampling import ResumableSampler


def evaluate_checkpoint(
    cfg: TrainConfig,
    checkpoint: str | Path,
    split: str = "test",
    views: int | None = None,
    out: str | Path | None = None,
    which: str = "best",
    plot: bool = True,
) -> dict:
    """Evaluate ``checkpoint`` (file, checkpoint folder or run folder) on ``split``.

    The class index comes from the checkpoint, the data and model settings from
    ``cfg``. Writes ``out`` (default ``<checkpoint>/eval_<split>.json``) and the
    confusion-matrix plots beside it; returns the report (see :func:`report`).
    """
    info = D.setup(cfg.train.device)
    try:
        ck = load_checkpoint(checkpoint, which=which, weights_only_model=True)
        classes = ck.classes
        if classes is None:
            classes = B.class_info(cfg.data, B.read_records(cfg.data, "train"))
        records = B.read_records(cfg.data, split)
        if records is None:
            raise ConfigError(f"data.{split} is not set in the config")
        mc = B.model_config(cfg, classes)
        model = B.build_model(mc)
        model.load_state_dict(ck.model)
        model.to(info.device)
        nv = (
            views
            if views is not None
            else (cfg.data.test_views if split == "test" else cfg.data.val_views)
        )
        dc = B.dataset_config(cfg.data, mc, "test", nv)
        ds = B.build_dataset(records, dc, classes, mc)
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
        pred = predict(model, loader, info.device, cfg.train.amp, progress=info.is_main)
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
            dest = Path(out) if out else ck.path / f"eval_{split}.json"
            files = write_report(res, dest, plot=plot)
            print(f"[mmt-fast] {split}: {summary(res)}", file=sys.stderr)
            print(f"[mmt-fast] wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
        return res
    finally:
        D.cleanup()
