"""Inference: load a trained run, decode clips as in evaluation, run the model over them
(the loop of :mod:`mmt_fast.run.loop`: views averaged, embeddings recorded on request), and
evaluate a checkpoint on a split (``mmt-fast evaluate``).

Used by the commands ``evaluate``, ``predict``, ``analyze`` and ``explain`` (through
:mod:`mmt_fast.tools`); it builds on the run layer (:mod:`mmt_fast.run`: config,
checkpoint, builders, metrics, the loop) and knows nothing of the trainer
(:mod:`mmt_fast.train`), which builds on the same layer.

- :func:`load_run`: a run folder, checkpoint folder or ``model.safetensors`` ->
  :class:`LoadedRun` (the config and class index saved with the checkpoint,
  the model with its weights, on the CPU in eval mode).
- :func:`clip_dataset` / :func:`clip_loader`: the clips decoded with the run's
  data settings in test mode (``V`` views: uniform temporal windows and a
  centre crop); unlabelled clips get placeholder targets.
- :func:`run_model` (from :mod:`mmt_fast.run.loop`): the evaluation loop. For each batch
  the views are folded into the batch (:func:`model_inputs`), the model runs under
  :func:`autocast`, and each clip's class probabilities are the mean over its views of the
  softmax of the multimodal logits, ``p = 1/V sum_v softmax(z_v)``. With ``record``, a
  :class:`Recorder` keeps the embeddings named there, averaged over the views.
- :func:`evaluate_checkpoint`: a checkpoint on a labelled split, on every rank's share
  under ``torchrun``; the report (top-1/top-5, per-class, EK action) written beside the
  run's ``metrics.csv``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from mmt_fast.config import MMTConfig
from mmt_fast.data import AVClipDataset, ClipRecord, collate_clips
from mmt_fast.data.dataset import check_split
from mmt_fast.errors import ConfigError, DataError
from mmt_fast.run import builders as B
from mmt_fast.run import distributed as D
from mmt_fast.run.checkpoint import Checkpoint, load_checkpoint
from mmt_fast.run.config import TrainConfig, config_from_dict, load_config
from mmt_fast.run.evaluation import gather_predictions, report, summary, write_report
from mmt_fast.run.loop import RECORDABLE, Outputs, Recorder, autocast, model_inputs, run_model
from mmt_fast.run.sampling import ResumableSampler


# ------------------------------------------------------------------ runs
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

    @property
    def class_names(self) -> dict[str, list[str]]:
        """head -> class names (the saved class index; class ids as strings for verb/noun)."""
        return class_names(self.classes, self.model_cfg)


def class_names(classes: dict, model_cfg: MMTConfig) -> dict[str, list[str]]:
    """head -> class names of a class index (``{"kind": "label", "names": [...]}``, or
    verb/noun ids as strings, from the model's heads)."""
    if classes.get("kind") == "label":
        return {"label": list(classes["names"])}
    return {h: [str(i) for i in range(n)] for h, n in model_cfg.heads.items()}


def run_config(
    config: TrainConfig | str | Path | None,
    ck: Checkpoint,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """The config to run ``ck`` with.

    ``config=None``: the config saved with the checkpoint, plus ``overrides``.
    A YAML path or a :class:`TrainConfig`: that config, whose model section must
    equal the saved one. Every problem is a :class:`ConfigError` in one sentence.
    """
    saved = yaml.safe_load(ck.config) if ck.config else None
    if config is None:
        if saved is None:
            raise ConfigError(
                f"{ck.path} has no config.yaml (not written by mmt-fast train?): pass --config"
            )
        try:
            return config_from_dict(saved, overrides)
        except (TypeError, KeyError) as e:  # an override naming an unknown key, a bad value
            raise ConfigError(e.args[0] if e.args else str(e)) from e
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


# ------------------------------------------------------------------ clips
def resolve_views(cfg: TrainConfig, split: str = "test", views: int | None = None) -> int:
    """Views per clip: ``views``, else the config's ``data.test_views`` for the test split
    (and for unlabelled clips) or ``data.val_views`` for the others; >= 1 (ConfigError)."""
    if views is not None:
        nv = views
    else:
        nv = cfg.data.test_views if split == "test" else cfg.data.val_views
    if nv < 1:
        raise ConfigError(f"--views must be >= 1, got {nv}")
    return nv


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def with_placeholder_targets(records: list[ClipRecord], classes: dict) -> list[ClipRecord]:
    """``records`` with a target each (the first class, or verb/noun 0): the dataset attaches
    a target to every item, which inference on unlabelled clips ignores."""
    if classes.get("kind") == "label":
        name = classes["names"][0]
        return [ClipRecord(**{**r.to_dict(), "label": name}) for r in records]
    return [ClipRecord(**{**r.to_dict(), "verb": 0, "noun": 0}) for r in records]


def clip_dataset(
    run: LoadedRun,
    records: list[ClipRecord],
    views: int,
    labelled: bool = True,
    split: str | None = None,
) -> AVClipDataset:
    """The clips decoded as in evaluation: the run's data settings in test mode, ``views``
    views per clip; ``labelled=False``: placeholder targets (see
    :func:`with_placeholder_targets`). ``split``: the records are that configured split,
    read from its shards when the run trains from them (``data.format: webdataset``).
    With ``data.device_transforms`` the items are uint8 frames and raw fbank, finished by
    :func:`batch_transform` on the device."""
    if not labelled:
        records = with_placeholder_targets(records, run.classes)
    data = run.cfg.data
    dc = B.dataset_config(data, run.model_cfg, "test", views, data.device_transforms)
    if split is not None:
        return B.build_split_dataset(data, split, records, dc, run.classes, run.model_cfg)
    return B.build_dataset(records, dc, run.classes, run.model_cfg)


def batch_transform(dataset) -> Callable[[dict, torch.device], dict] | None:
    """What finishes ``dataset``'s batches on the device before the model: a
    :class:`~mmt_fast.data.device_transforms.DeviceTransform` when its items are left
    raw (``data.device_transforms``), else None."""
    cfg = dataset.config
    if not cfg.device_transforms:
        return None
    from mmt_fast.data.device_transforms import DeviceTransform

    return DeviceTransform(cfg)


def clip_loader(
    run: LoadedRun,
    dataset: AVClipDataset,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> DataLoader:
    """A loader over ``dataset`` in order (batch size: ``batch_size``, else the config's
    ``data.eval_batch_size``, else ``train.batch_size``; workers: ``data.num_workers``)."""
    cfg = run.cfg
    return DataLoader(
        dataset,
        batch_size=batch_size or cfg.data.eval_batch_size or cfg.train.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        collate_fn=collate_clips,
    )


# ------------------------------------------------------------------ evaluate
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
    plots beside it; returns the report (see :func:`mmt_fast.run.evaluation.report`).
    """
    run = load_run(checkpoint, config, overrides, which)
    cfg, ck, classes = run.cfg, run.checkpoint, run.classes
    info = D.setup(cfg.train.device)
    try:
        records = B.split_records(cfg, split)
        model = run.model.to(info.device)
        nv = resolve_views(cfg, split, views)
        ds = clip_dataset(run, records, nv, split=split)
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
        pred = gather_predictions(
            model,
            loader,
            info.device,
            cfg.train.amp,
            progress=info.is_main,
            transform=batch_transform(ds),
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


__all__ = [
    "RECORDABLE",
    "LoadedRun",
    "Outputs",
    "Recorder",
    "autocast",
    "batch_transform",
    "class_names",
    "clip_dataset",
    "clip_loader",
    "evaluate_checkpoint",
    "load_run",
    "model_inputs",
    "resolve_device",
    "resolve_views",
    "run_config",
    "run_model",
    "with_placeholder_targets",
]
