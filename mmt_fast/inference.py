"""The one inference path: load a trained run, decode clips as in evaluation, run the
model over them with multi-view averaging, and optionally record embeddings.

Used by ``mmt-fast evaluate`` (:mod:`mmt_fast.train.run_eval`, and the trainer's
validation through :func:`mmt_fast.train.evaluate.predict`), ``predict``,
``analyze`` and ``explain`` (:mod:`mmt_fast.commands`); the commands import
this module, not the trainer's internals.

- :func:`load_run`: a run folder, checkpoint folder or ``model.safetensors`` ->
  :class:`LoadedRun` (the config and class index saved with the checkpoint,
  the model with its weights, on the CPU in eval mode).
- :func:`clip_dataset` / :func:`clip_loader`: the clips decoded with the run's
  data settings in test mode (``V`` views: uniform temporal windows and a
  centre crop); unlabelled clips get placeholder targets.
- :func:`run_model`: the evaluation loop. For each batch the views are folded
  into the batch (:func:`model_inputs`), the model runs under :func:`autocast`,
  and each clip's class probabilities are the mean over its views of the
  softmax of the multimodal logits, ``p = 1/V sum_v softmax(z_v)``
  (:func:`mmt_fast.train.metrics.average_views`). With ``record``, a
  :class:`Recorder` keeps the embeddings named there, averaged over the views.

This module sits between the library parts of :mod:`mmt_fast.train` (config,
checkpoint, builders, metrics), which it uses, and the trainer and the
commands, which use it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from mmt_fast.config import MMTConfig
from mmt_fast.data import AVClipDataset, BadItem, ClipRecord, DataConfig, collate_clips
from mmt_fast.errors import ConfigError
from mmt_fast.train import builders as B
from mmt_fast.train.checkpoint import Checkpoint, load_checkpoint
from mmt_fast.train.config import TrainConfig, check_paths, config_from_dict, load_config
from mmt_fast.train.metrics import average_views

#: what :class:`Recorder` can record (see there)
RECORDABLE = ("audio", "video", "head")


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


def read_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A training config file plus ``KEY=VALUE`` overrides; every failure to read or
    validate it is a :class:`ConfigError` (exit code 2) naming the file."""
    try:
        return load_config(path, overrides)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"config file {e.filename} does not exist") from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"{path}: {msg}") from e


@dataclass
class DataSetup:
    """What a config says about its data, for commands that decode clips without a
    trained run (``check-data``, ``prepare``): the records per split, the class index
    (:func:`mmt_fast.train.builders.class_info`), the model config the clips are shaped
    for, and the test-mode dataset config with ``views`` views."""

    records: dict[str, list[ClipRecord]]
    classes: dict
    model_cfg: MMTConfig
    dataset_cfg: DataConfig

    def dataset_kwargs(self) -> dict:
        """The class arguments of :class:`~mmt_fast.data.AVClipDataset` for these classes."""
        from mmt_fast.data.manifests import ClassIndex

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
    train = records.get("train") or B.read_records(cfg.data, "train")
    classes = B.class_info(cfg.data, train or next(iter(records.values()), None))
    mc = B.model_config(cfg, classes)
    try:
        dc = B.dataset_config(cfg.data, mc, mode, views)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return DataSetup(records, classes, mc, dc)


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


def split_records(cfg: TrainConfig, split: str) -> list[ClipRecord]:
    """The records of a configured split (``data.<split>``); ConfigError when it is not set."""
    records = B.read_records(cfg.data, split)
    if records is None:
        raise ConfigError(f"data.{split} is not set in the config")
    return records


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


# ------------------------------------------------------------------ the model
def autocast(device: torch.device, amp: str):
    """bf16 autocast on CUDA for ``amp`` in (auto, bf16); nothing on the CPU (unless bf16)."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_inputs(batch: dict, modalities, device: torch.device) -> tuple[dict, int]:
    """Inputs for ``model(**inputs)`` with views folded into the batch.

    audio (B, 1, F, T) or (B, V, 1, F, T); video (B, 3, T, H, W) or (B, V, 3, T, H, W).
    Returns the inputs ((B * V, ...) tensors) and V.
    """
    inputs, views = {}, 1
    for m in modalities:
        x = batch[m]
        base = 4 if m == "audio" else 5
        if x.ndim == base + 1:
            views = x.shape[1]
            x = x.flatten(0, 1)
        inputs[m] = x.to(device, non_blocking=True)
    return inputs, views


class Recorder:
    """Records embeddings during the forward passes of an MMT model (a context manager).

    - ``audio``, ``video``: the encoder's CLS embedding after its final LayerNorm
      (AST: the mean of the CLS and distillation tokens), (B, C): the encoder's
      ``forward_features`` is wrapped on the instance (restored on exit);
    - ``head``: the input of the classification head(s), taken by forward
      pre-hooks; for MMT ``[LN(video CLS), LN(audio CLS)]`` after the
      AVBottleneck (B, 2C), for one encoder its CLS, for ``avg`` fusion the two
      branches' inputs concatenated in call order (audio, video).

    :meth:`take` returns name -> the tensors recorded since the last call
    (concatenated along the last axis), float32, detached.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] = RECORDABLE) -> None:
        core = model.module if hasattr(model, "module") else model
        names = tuple(names)
        unknown = [n for n in names if n not in RECORDABLE]
        if unknown:
            raise ValueError(f"cannot record {unknown}; expected some of {RECORDABLE}")
        self.parts: dict[str, list[torch.Tensor]] = {}
        self._wrapped: list[nn.Module] = []
        self._handles = []
        for name in core.modalities:
            if name not in names:
                continue
            enc = getattr(core, f"{name}_encoder")
            orig = enc.forward_features

            def wrapper(x, _orig=orig, _name=name):
                f = _orig(x)
                self._add(_name, f.cls)
                return f

            enc.forward_features = wrapper
            self._wrapped.append(enc)
        if "head" in names:
            for n in ("head", "head_video", "head_audio"):
                if hasattr(core, n):
                    hook = getattr(core, n).register_forward_pre_hook(self._head_hook)
                    self._handles.append(hook)

    def _add(self, name: str, x: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(x.detach().float())

    def _head_hook(self, module: nn.Module, args: tuple) -> None:
        self._add("head", args[0])

    def take(self) -> dict[str, torch.Tensor]:
        out = {k: torch.cat(v, dim=-1) for k, v in self.parts.items()}
        self.parts = {}
        return out

    def remove(self) -> None:
        for enc in self._wrapped:
            del enc.forward_features
        for h in self._handles:
            h.remove()
        self._wrapped, self._handles = [], []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class Outputs:
    """What :func:`run_model` returns, one row per clip in loader order.

    ``probs``: head -> (N, C) view-averaged probabilities; ``targets``: head ->
    (N,) the dataset's targets (placeholders for unlabelled clips); ``index``:
    (N,) dataset indices; ``embeddings``: name -> (N, D) view-averaged float32
    (the names recorded); ``skipped``: bad clips per kind; ``bad``: the bad
    clips the loader returned (:class:`~mmt_fast.data.BadItem`).
    """

    probs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    index: torch.Tensor
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    bad: list[BadItem] = field(default_factory=list)


@torch.no_grad()
def run_model(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    amp: str = "auto",
    record: Iterable[str] = (),
    transform: Callable[[dict, torch.device], dict] | None = None,
) -> Outputs:
    """The evaluation loop: ``model`` (on ``device``; a DDP wrapper is fine) in eval mode
    over ``batches`` (from :func:`mmt_fast.data.collate_clips`), views averaged, the
    ``record`` embeddings kept (see :class:`Recorder`); the model's mode is restored.
    ``transform(batch, device)`` finishes each batch first (see :func:`batch_transform`)."""
    core = model.module if hasattr(model, "module") else model
    heads = dict(core.cfg.heads)
    was_training = core.training
    model.eval()
    probs: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    targets: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    embeds: dict[str, list[torch.Tensor]] = {}
    index: list[torch.Tensor] = []
    skipped: collections.Counter = collections.Counter()
    bad: list[BadItem] = []
    record = tuple(record)
    rec = Recorder(core, record) if record else contextlib.nullcontext()
    try:
        with rec:
            for batch in batches:
                skipped.update(batch["skipped"])
                bad += batch.get("bad", [])
                b = batch["batch_size"]
                if not b:
                    continue
                if transform is not None:
                    batch = transform(batch, device)
                inputs, v = model_inputs(batch, core.modalities, device)
                with autocast(device, amp):
                    out = model(**inputs)
                for h in heads:
                    probs[h].append(average_views(out.logits[h].float().view(b, v, -1)).cpu())
                    targets[h].append(batch[h].cpu())
                if record:
                    for name, e in rec.take().items():
                        embeds.setdefault(name, []).append(e.view(b, v, -1).mean(1).cpu())
                index.append(batch["index"].cpu())
    finally:
        model.train(was_training)
    empty_long = torch.empty(0, dtype=torch.long)
    return Outputs(
        probs={h: torch.cat(p) if p else torch.empty(0, heads[h]) for h, p in probs.items()},
        targets={h: torch.cat(t) if t else empty_long for h, t in targets.items()},
        index=torch.cat(index) if index else empty_long,
        embeddings={k: torch.cat(v) for k, v in embeds.items()},
        skipped=dict(skipped),
        bad=bad,
    )


__all__ = [
    "RECORDABLE",
    "DataSetup",
    "LoadedRun",
    "Outputs",
    "Recorder",
    "autocast",
    "batch_transform",
    "class_names",
    "clip_dataset",
    "clip_loader",
    "data_setup",
    "load_run",
    "model_inputs",
    "read_config",
    "resolve_device",
    "resolve_views",
    "run_config",
    "run_model",
    "split_records",
    "with_placeholder_targets",
]
