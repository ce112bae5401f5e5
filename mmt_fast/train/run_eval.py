"""``mmt-fast evaluate``: a checkpoint on a split, with multi-view testing.

By default a run is evaluated with what it was trained with: the config and the
class index saved in its checkpoint folder (``config.yaml``, ``classes.json``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from mmt_fast.config import MMTConfig
from mmt_fast.data.dataset import check_split
from mmt_fast.errors import ConfigError, DataError
from mmt_fast.train import builders as B
from mmt_fast.train import distributed as D
from mmt_fast.train.checkpoint import Checkpoint, load_checkpoint
from mmt_fast.train.config import TrainConfig, config_from_dict, load_config
from mmt_fast.train.evaluate import predict, report, summary, write_report
from mmt_fast.train.sampling import ResumableSampler


@dataclass
class LoadedRun:
    """A trained model ready for inference, with the config and class index it was trained with."""

    cfg: TrainConfig
    checkpoint: Checkpoint
    classes: dict
    model_cfg: MMTConfig
    model: nn.Module

    @property
    def run_dir(self) -> Path:
        """The run folder (``train.out_dir``) when the checkpoint sits in ``RUN/checkpoints/``,
        else the checkpoint folder."""
        p = self.checkpoint.path
        return p.parent.parent if p.parent.name == "checkpoints" else p


def run_config(
    config: TrainConfig | str | Path | None,
    ck: Checkpoint,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """The config to evaluate ``ck`` with.

    ``config=None``: the config saved with the checkpoint, plus ``overrides``.
    A YAML path or a :class:`TrainConfig`: that config, whose model section must
    equal the saved one (ValueError in one sentence otherwise).
    """
    saved = yaml.safe_load(ck.config) if ck.config else None
    if config is None:
        if saved is None:
            raise ConfigError(
                f"{ck.path} has no config.yaml (not written by mmt-fast train?): pass --config"
            )
        return config_from_dict(saved, overrides)
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    if saved is not None:
        # model.init (where the weights started) does not change the model being evaluated
        mine = {k: v for k, v in cfg.to_dict()["model"].items() if k != "init"}
        theirs = {
            k: v for k, v in config_from_dict(saved).to_dict()["model"].items() if k != "init"
        }
        if mine != theirs:
            where = config if not isinstance(config, TrainConfig) else "the given config"
            diff = ", ".join(
                f"model.{k}={mine.get(k)!r} (the run: {theirs.get(k)!r})"
                for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)
            )
            raise ConfigError(
                f"{where} describes another model than {ck.path} was trained as: {diff}; "
                "leave out --config to evaluate with the run's own config"
            )
    return cfg


def load_run(
    checkpoint: str | Path,
    config: TrainConfig | str | Path | None = None,
    overrides: list[str] | None = None,
    which: str = "best",
) -> LoadedRun:
    """Load a checkpoint (run folder, checkpoint folder or ``model.safetensors``), its
    config (see :func:`run_config`) and class index, and build the model with its weights
    (on the CPU, in eval mode)."""
    ck = load_checkpoint(checkpoint, which=which, weights_only_model=True)
    cfg = run_config(config, ck, overrides)
    classes = ck.classes
    if classes is None:
        classes = B.class_info(cfg.data, B.read_records(cfg.data, "train"))
    mc = B.model_config(cfg, classes)
    model = B.build_model(mc)
    missing, unexpected = _state_dict_mismatch(model, ck.model)
    if missing or unexpected:
        raise ConfigError(
            f"the weights in {ck.path} do not fit model.preset={cfg.model.preset!r} "
            f"({len(missing)} missing and {len(unexpected)} unexpected or differently shaped "
            f"tensors, e.g. {(missing + unexpected)[0]!r}): evaluate with the run's own config"
        )
    model.load_state_dict(ck.model)
    model.eval()
    return LoadedRun(cfg, ck, classes, mc, model)


def _state_dict_mismatch(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    bad = sorted(k for k in state if k not in own or tuple(own[k].shape) != tuple(state[k].shape))
    return missing, bad


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
    run = load_run(checkpoint, config, overrides, which)
    cfg, ck, classes, mc = run.cfg, run.checkpoint, run.classes, run.model_cfg
    info = D.setup(cfg.train.device)
    try:
        records = B.read_records(cfg.data, split)
        if records is None:
            raise ConfigError(f"data.{split} is not set in the config")
        model = run.model.to(info.device)
        nv = (
            views
            if views is not None
            else (cfg.data.test_views if split == "test" else cfg.data.val_views)
        )
        dc = B.dataset_config(cfg.data, mc, "test", nv, cfg.data.device_transforms)
        ds = B.build_split_dataset(cfg.data, split, records, dc, classes, mc)
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
        tf = None
        if cfg.data.device_transforms:
            from mmt_fast.data.device_transforms import DeviceTransform

            tf = DeviceTransform(dc)
        pred = predict(
            model, loader, info.device, cfg.train.amp, progress=info.is_main, transform=tf
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
            print(f"[mmt-fast] wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
        return res
    finally:
        D.cleanup()
