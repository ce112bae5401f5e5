"""Training configs: YAML files <-> nested dataclasses.

A run is described by one YAML file with five sections (every key optional;
unknown keys are an error, so a typo never passes silently)::

    model:      {preset: MMT, overrides: {num_classes: 309}}
    data:       {format: manifest, train: ..., val: ..., test: ..., ...}
    optim:      {lr: 1.0e-4, weight_decay: 0.05, ...}
    schedule:   {warmup_steps: 500, min_lr_ratio: 0.01}
    train:      {epochs: 50, batch_size: 8, out_dir: runs/mmt, ...}

``load_config(path, overrides=["train.epochs=3", "optim.lr=1e-3"])`` reads a file
and applies dotted overrides (values parsed as YAML). A file may start from another with
``base: other.yaml`` and change only some keys. ``config.to_yaml()`` writes
the resolved config back (it is saved with every checkpoint). Nothing here runs
code from the file: YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelSection:
    """The model: a preset of :mod:`mmt_fast.config` and field overrides.

    ``overrides`` use ``__`` for nested fields (``audio__drop_path_rate: 0.1``,
    ``loss__align: null``). ``num_classes`` of a single-label preset defaults to
    the size of the class index.
    """

    preset: str = "MMT"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Where the clips are and how they are sampled.

    ``format``: ``manifest`` (plain CSV/JSONL with ``path,label[,split]`` or
    ``path,verb,noun``), ``vggsound`` (the official ``vggsound.csv``),
    ``kinetics_sounds`` or ``epic_kitchens``. ``train``/``val``/``test``: manifest
    files (the same file may serve several splits, filtered by ``*_split``, the
    value of its ``split`` column). ``root``: folder of the media files (default:
    the manifest's folder). ``classes``: a ``classes.json`` (ClassIndex) file;
    default: the sorted labels of the training manifest.
    ``preset``/``overrides``: a :data:`mmt_fast.data.DATA_PRESETS` name and
    :class:`mmt_fast.data.DataConfig` fields. Sizes the model fixes
    (``num_mel_bins``, ``target_length``, ``num_frames``, ``crop_size``) are filled
    in from the model config when not given. ``test_views``: views averaged at
    evaluation; ``val_views`` during training (1 is cheaper). ``on_error``:
    ``skip`` bad clips (counted and reported per kind) or ``raise``. ``cache``:
    decode each training clip once, with the deterministic test-time transform
    (centre window and crop, no SpecAugment), and keep it in memory: no
    augmentation; for small data sets and demos on the CPU (needs ``num_workers: 0``).
    """

    format: str = "manifest"
    train: str | None = None
    val: str | None = None
    test: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"
    root: str | None = None
    classes: str | None = None
    preset: str = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 4
    val_views: int = 1
    test_views: int = 5
    eval_batch_size: int | None = None
    on_error: str = "skip"
    cache: bool = False

    def __post_init__(self) -> None:
        formats = ("manifest", "vggsound", "kinetics_sounds", "epic_kitchens")
        if self.format not in formats:
            raise ValueError(f"data.format={self.format!r}; expected one of {formats}")
        if self.cache and self.num_workers:
            raise ValueError("data.cache keeps clips in the main process: set data.num_workers: 0")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={self.on_error!r}; expected raise or skip")


@dataclass
class OptimSection:
    """AdamW. ``lr`` is the peak learning rate (paper: 1e-4) for the whole batch;
    no linear scaling with the number of processes is applied."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ScheduleSection:
    """Linear warmup from ``warmup_start_ratio * lr`` over ``warmup_steps``
    (or ``warmup_epochs`` when set) optimizer steps, then cosine decay to
    ``min_lr_ratio * lr`` at the last step."""

    warmup_steps: int = 0
    warmup_epochs: float | None = None
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.01


@dataclass
class TrainSection:
    """The loop. One *step* is one optimizer update (``grad_accum`` micro-batches
    of ``batch_size`` clips per process). ``max_steps`` caps the planned length
    (the schedule spans it); ``stop_at_step`` ends the process early without
    changing the plan (an interruption, for tests). ``amp``: ``auto`` = bf16
    autocast on CUDA, none on the CPU; ``bf16``; ``none``.
    ``activation_checkpointing``: ``none``, ``blocks`` (recompute every
    block's activations in the backward pass) or ``stage1`` (only the
    multiscale encoders' first stage, where most activation memory sits); see
    ``mmt-fast plan`` for what each saves."""

    out_dir: str = "runs/mmt"
    epochs: int = 50
    max_steps: int | None = None
    stop_at_step: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    amp: str = "auto"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int | None = 1000
    keep_last: int = 3
    eval_every: int = 1  # epochs; 0 disables validation
    tensorboard: bool = True
    progress: bool = True
    torch_threads: int | None = None
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        from mmt_fast.models.checkpointing import check_mode

        check_mode(self.activation_checkpointing)
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"train.amp={self.amp!r}; expected auto, bf16 or none")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("train.batch_size, grad_accum and epochs must be >= 1")
        if self.keep_last < 1:
            raise ValueError("train.keep_last must be >= 1")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _convert(tp, value, where: str):
    """Check/convert a YAML value to the annotated type ``tp`` (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{where}: {value!r} fits none of {tp} ({'; '.join(errors)})")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)  # YAML reads "1e-4" (no dot) as a string
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, d: dict | None, where: str = ""):
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys."""
    d = d or {}
    if not isinstance(d, dict):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise KeyError(
            f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise KeyError(f"override {dotted!r}: {k!r} is not a section")
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.epochs=3", "model.overrides.loss__align=null"]`` -> (key, YAML value) pairs."""
    out = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. train.epochs=3)")
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def config_from_dict(d: dict | None, overrides: list[str] | None = None) -> TrainConfig:
    d = _plain(d or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(d, key, value)
    return from_dict(TrainConfig, d)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config as a dict; a top-level ``base: other.yaml`` (relative to this
    file) is read first and this file's keys are merged over it (recursively)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config base cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise TypeError(f"{path}: expected a mapping at the top level")
    base = d.pop("base", None)
    if base is not None:
        d = _merge(read_yaml(path.parent / base, (*_seen, path)), d)
    return d


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (with its ``base`` chain) and apply dotted ``KEY=VALUE`` overrides."""
    cfg = config_from_dict(read_yaml(path), overrides)
    base = Path(path).resolve().parent
    # Relative data paths are relative to the config file's folder when they exist there.
    for name in ("train", "val", "test", "root", "classes"):
        p = getattr(cfg.data, name)
        if p and not Path(p).is_absolute() and not Path(p).exists() and (base / p).exists():
            setattr(cfg.data, name, str(base / p))
    return cfg
