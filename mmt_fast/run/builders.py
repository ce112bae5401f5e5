"""From a :class:`TrainConfig` to records, class index, datasets, loaders and the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mmt_fast.config import MMTConfig, apply_overrides, get_config
from mmt_fast.data import (
    AVClipDataset,
    ClassIndex,
    ClipRecord,
    DataConfig,
    collate_clips,
    data_config,
    read_epic_kitchens,
    read_kinetics_sounds,
    read_manifest,
    read_vggsound,
)
from mmt_fast.errors import ConfigError, DataError
from mmt_fast.registry import build
from mmt_fast.run.config import DataSection, InitSection, TrainConfig, check_paths
from mmt_fast.run.sampling import ResumableSampler, SeededDataset, derive_seed


def _tuples(x):
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


# ------------------------------------------------------------------ records
def _no_split_column(split: str, path: str, shared: list[str]) -> DataError:
    return DataError(
        f"data.{split}={path!r} has no 'split' column but also serves "
        f"{', '.join('data.' + s for s in shared)}: every row would be used for each "
        "(test clips trained on). Add a split column (train/val/test) or give one "
        "manifest per split"
    )


def read_records(data: DataSection, split: str) -> list[ClipRecord] | None:
    """The records of ``split`` (``train``/``val``/``test``), None when not configured."""
    path = getattr(data, split)
    if not path:
        return None
    name = getattr(data, f"{split}_split")
    root = data.root
    # a file that serves training and another split must say which row belongs to which
    shared = [s for s in ("train", "val", "test") if s != split and getattr(data, s) == path]
    if "train" not in (split, *shared):
        shared = []  # val and test from one list: evaluating on the val clips is allowed
    if data.format == "manifest":
        recs = read_manifest(path, root)
        if name is not None and any(r.split for r in recs):
            recs = [r for r in recs if r.split == name]
        elif name is not None and shared and recs:
            raise _no_split_column(split, path, shared)
    elif data.format == "vggsound":
        recs = read_vggsound(path, root or Path(path).parent, split=name)
    elif data.format == "kinetics_sounds":
        recs = read_kinetics_sounds(
            path, root or Path(path).parent, on_error=data.on_error, split=None
        )
        if name is not None and any(r.split for r in recs):
            recs = [r for r in recs if r.split == name]
        elif name is not None and shared and recs:
            raise DataError(
                f"data.{split}={path!r} has no split column but also serves "
                f"{', '.join('data.' + s for s in shared)}: give one list per split"
            )
    elif data.format == "webdataset":
        from mmt_fast.data.shards import ShardIndex

        index = ShardIndex.load(path)
        recs = [index.record(i) for i in index.select(name)]
        if name is not None and shared and recs and not index.has_splits():
            raise _no_split_column(split, path, shared)
    else:
        recs = read_epic_kitchens(path, root or Path(path).parent)
    if not recs:
        raise DataError(f"data.{split}={path!r} (split {name!r}) has no clips")
    return recs


def class_info(data: DataSection, train_records: list[ClipRecord] | None) -> dict:
    """``{"kind": "label", "names": [...]}`` or ``{"kind": "verb_noun"}`` (saved with checkpoints)."""
    if data.classes:
        idx = ClassIndex.load(data.classes)
        return {"kind": "label", "names": idx.names}
    if data.format == "epic_kitchens" or (
        train_records and train_records[0].label is None and train_records[0].verb is not None
    ):
        return {"kind": "verb_noun"}
    if not train_records:
        raise ValueError("no class list: give data.classes or a training manifest")
    return {"kind": "label", "names": ClassIndex.from_labels(r.label for r in train_records).names}


# ------------------------------------------------------------------ model
def model_config(cfg: TrainConfig, classes: dict | None) -> MMTConfig:
    """The preset with overrides; a single-label head sized to the class index."""
    mc = get_config(cfg.model.preset)
    if not isinstance(mc, MMTConfig):
        raise TypeError(
            f"model.preset={cfg.model.preset!r} is an encoder preset; training needs an MMT preset "
            "(e.g. MMT, ablation/audio-only for MAT alone, ablation/video-only)"
        )
    ov = _tuples(dict(cfg.model.overrides))
    if classes and classes.get("kind") == "label" and "num_classes" not in ov:
        if isinstance(mc.num_classes, int):
            ov["num_classes"] = len(classes["names"])
    if ov:
        mc = apply_overrides(mc, ov)
    if classes and classes.get("kind") == "label":
        n = len(classes["names"])
        if mc.heads != {"label": n}:
            raise ValueError(
                f"the model's heads {mc.heads} do not match the {n} classes of the data"
            )
    return mc


def build_model(
    mc: MMTConfig, init: InitSection | None = None, log: Callable[[str], None] | None = None
) -> nn.Module:
    """The model of ``mc``; with ``init``, its encoders loaded from pretrained
    checkpoints (:func:`mmt_fast.pretrained.init_mmt`), each report passed to ``log``."""
    model = build(mc)
    if init is not None:
        audio, audio_from = init.audio_checkpoint()
        if audio is not None or init.video is not None:
            from mmt_fast.pretrained import init_mmt

            reports = init_mmt(model, audio, init.video, audio_from, init.video_from, init.strict)
            for name, report in reports.items():
                if log is not None:
                    log(f"{name} encoder initialised: {report.summary()}")
    return model


def modalities_of(mc: MMTConfig) -> str:
    a, v = mc.audio is not None, mc.video is not None
    return "av" if a and v else ("audio" if a else "video")


# ------------------------------------------------------------------ data
def dataset_config(
    data: DataSection, mc: MMTConfig, mode: str, views: int = 1, device_transforms: bool = False
) -> DataConfig:
    """A DataConfig whose sizes match the model's input sizes (mismatch -> ValueError);
    ``device_transforms``: items for :class:`~mmt_fast.data.device_transforms.DeviceTransform`."""
    ov = _tuples(dict(data.overrides))
    derived: dict = {"modalities": modalities_of(mc)}
    if mc.audio is not None:
        derived["num_mel_bins"], derived["target_length"] = mc.audio.input_size
    if mc.video is not None:
        t, h, w = mc.video.input_size
        if h != w:
            raise ValueError(f"video input {mc.video.input_size}: the data pipeline crops squares")
        derived["num_frames"], derived["crop_size"] = t, h
    for k, v in derived.items():
        if k in ov and ov[k] != v and k != "modalities":
            raise ValueError(f"data.overrides.{k}={ov[k]} but the model expects {v}")
        ov[k] = v
    ov.setdefault("on_error", data.on_error)
    ov.update(mode=mode, num_views=max(views, 1), device_transforms=device_transforms)
    return data_config(data.preset, **ov)


def build_dataset(
    records: list[ClipRecord], dc: DataConfig, classes: dict, mc: MMTConfig
) -> AVClipDataset:
    if classes["kind"] == "label":
        return AVClipDataset(records, dc, class_index=ClassIndex(classes["names"]))
    heads = mc.heads
    return AVClipDataset(records, dc, num_verbs=heads["verb"], num_nouns=heads["noun"])


def build_split_dataset(
    data: DataSection,
    split: str,
    records: list[ClipRecord],
    dc: DataConfig,
    classes: dict,
    mc: MMTConfig,
):
    """The map-style dataset of ``split``: :class:`AVClipDataset` over ``records``, or for
    ``data.format: webdataset`` :class:`~mmt_fast.data.shards.ShardClips` serving those
    ``records`` (samples of the split's index) from the shards."""
    if data.format != "webdataset":
        return build_dataset(records, dc, classes, mc)
    from mmt_fast.data.shards import ShardClips

    name = getattr(data, f"{split}_split")
    if classes["kind"] == "label":
        kw = {"class_index": ClassIndex(classes["names"])}
    else:
        kw = {"num_verbs": mc.heads["verb"], "num_nouns": mc.heads["noun"]}
    return ShardClips(getattr(data, split), name, dc, records, **kw)


def make_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    sampler: ResumableSampler,
    seed: int,
    epoch: int,
    drop_last: bool,
    pin_memory: bool = False,
    worker_init_fn=None,
) -> DataLoader:
    """A DataLoader for one epoch (or what is left of it).

    Its own ``generator`` keeps the main process's torch RNG untouched (a plain
    DataLoader draws the worker base seed from it); augmentation randomness
    comes from :class:`SeededDataset` per clip. ``worker_init_fn``: run in each
    worker (the trainer's ignores the preemption signals there). A streamed dataset
    (:class:`~mmt_fast.data.shards.ShardStream`) is its own sampler: none is passed.
    """
    if isinstance(dataset, SeededDataset):
        dataset.epoch = epoch
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 7))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=None if isinstance(dataset, IterableDataset) else sampler,
        num_workers=num_workers,
        collate_fn=collate_clips,
        drop_last=drop_last,
        generator=g,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=worker_init_fn,
        multiprocessing_context="fork" if num_workers > 0 and _fork_ok() else None,
    )


def _fork_ok() -> bool:
    import multiprocessing as mp

    return "fork" in mp.get_all_start_methods()


def split_records(cfg: TrainConfig, split: str) -> list[ClipRecord]:
    """The records of a configured split (``data.<split>``); ConfigError when it is not set."""
    records = read_records(cfg.data, split)
    if records is None:
        raise ConfigError(f"data.{split} is not set in the config")
    return records


@dataclass
class DataSetup:
    """What a config says about its data, for commands that decode clips without a
    trained run (``check-data``, ``prepare``): the records per split, the class index
    (:func:`class_info`), the model config the clips are shaped for, and the test-mode
    dataset config with ``views`` views."""

    records: dict[str, list[ClipRecord]]
    classes: dict
    model_cfg: MMTConfig
    dataset_cfg: DataConfig

    def dataset_kwargs(self) -> dict:
        """The class arguments of :class:`~mmt_fast.data.AVClipDataset` for these classes."""
        if self.classes["kind"] == "label":
            return {"class_index": ClassIndex(self.classes["names"])}
        return {
            "num_verbs": self.model_cfg.heads["verb"],
            "num_nouns": self.model_cfg.heads["noun"],
        }


def data_setup(
    cfg: TrainConfig, splits: Iterable[str], views: int = 1, mode: str = "test"
) -> DataSetup:
    """The :class:`DataSetup` of ``splits`` (each must be configured, and the files the
    config names must exist: ConfigError)."""
    check_paths(cfg, tuple(splits), out_dir=False)
    records = {s: split_records(cfg, s) for s in splits}
    train = records.get("train") or read_records(cfg.data, "train")
    classes = class_info(cfg.data, train or next(iter(records.values()), None))
    mc = model_config(cfg, classes)
    try:
        dc = dataset_config(cfg.data, mc, mode, views)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return DataSetup(records, classes, mc, dc)
