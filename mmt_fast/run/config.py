"""Training configs: YAML files <-> nested dataclasses.

A run is described by one YAML file with five sections (every key optional;
unknown keys are an error, so a typo never passes silently)::

    model:      {preset: MMT, overrides: {num_classes: 309}, init: {audio: mat.pth}}
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
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmt_fast.errors import ConfigError
from mmt_fast.run.signals import check_signals

INIT_FORMATS = ("auto", "mmt-fast", "timm-mvitv2", "slowfast", "torchvision", "ast")


@dataclass
class InitSection:
    """Pretrained weights for the encoders (:mod:`mmt_fast.pretrained`), loaded
    when a run starts (not on ``--resume``). Files only: nothing is downloaded.

    ``audio``: a checkpoint for the audio encoder: timm MViTv2 (ImageNet) for
    MAT, or an AST / DeiT checkpoint when the audio encoder is AST (``ast`` is
    the same field under AST's name). ``video``: a SlowFast ``.pyth`` or
    torchvision MViTv2 state dict for the video encoder. Any of them may also
    be a file written by ``mmt-fast convert``. ``*_from``: the checkpoint's
    format, ``auto`` to detect it from the key names. ``strict``: every tensor
    used or its omission explained (see the report in the log), else an error.
    """

    audio: str | None = None
    video: str | None = None
    ast: str | None = None
    audio_from: str = "auto"
    video_from: str = "auto"
    strict: bool = True

    def __post_init__(self) -> None:
        if self.audio is not None and self.ast is not None:
            raise ConfigError("model.init.audio and model.init.ast both set: give one")
        for name in ("audio_from", "video_from"):
            if getattr(self, name) not in INIT_FORMATS:
                raise ConfigError(
                    f"model.init.{name}={getattr(self, name)!r}; expected one of {INIT_FORMATS}"
                )

    def audio_checkpoint(self) -> tuple[str | None, str]:
        """(path, format) for the audio encoder."""
        if self.ast is not None:
            return self.ast, "ast" if self.audio_from == "auto" else self.audio_from
        return self.audio, self.audio_from


@dataclass
class ModelSection:
    """The model: a preset of :mod:`mmt_fast.config`, field overrides and
    pretrained weights (``init``, see :class:`InitSection`).

    ``overrides`` use ``__`` for nested fields (``audio__drop_path_rate: 0.1``,
    ``loss__align: null``). ``num_classes`` of a single-label preset defaults to
    the size of the class index.
    """

    preset: str = "MMT"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: InitSection = field(default_factory=InitSection)


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
    ``skip`` bad clips (counted and reported per kind) or ``raise``.
    ``max_bad_fraction``: before training, a split whose clips are missing or have
    labels outside the class list in a larger fraction than this (or that has no
    usable clip at all) stops the run with a message naming the split, the counts
    per kind and the first files; during training, an epoch stops the run as soon
    as its clips that failed to load (counted per kind over all ranks after every
    step) exceed this fraction of the clips it draws. ``cache``:
    decode each training clip once, with the deterministic test-time transform
    (centre window and crop, no SpecAugment), and keep it in memory: no
    augmentation; for small data sets and demos on the CPU (needs ``num_workers: 0``).
    ``webdataset``: ``train``/``val``/``test`` are shard indexes (``index.json`` or
    its folder) written by :func:`mmt_fast.data.shards.write_shards`; training
    streams the shards (DDP-rank and worker splitting, a shuffle buffer of
    ``shuffle_buffer`` clips per worker; see :mod:`mmt_fast.data.shards`),
    evaluation reads clips by offset. ``device_transforms``: the loader hands uint8
    frames and raw fbanks to the trainer, which crops, flips, normalises and applies
    SpecAugment batched on its device (see :mod:`mmt_fast.data.device_transforms`);
    for training, validation and ``mmt-fast evaluate``.
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
    max_bad_fraction: float = 0.5
    cache: bool = False
    shuffle_buffer: int = 256
    device_transforms: bool = False

    def __post_init__(self) -> None:
        formats = ("manifest", "vggsound", "kinetics_sounds", "epic_kitchens", "webdataset")
        if self.format not in formats:
            raise ConfigError(f"data.format={self.format!r}; expected one of {formats}")
        if self.cache and self.num_workers:
            raise ConfigError("data.cache keeps clips in the main process: set data.num_workers: 0")
        if self.cache and self.format == "webdataset":
            raise ConfigError("data.cache is for folders of clips; set it false with webdataset")
        _check("data.shuffle_buffer", self.shuffle_buffer, self.shuffle_buffer >= 1, ">= 1")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={self.on_error!r}; expected raise or skip")
        _check("data.num_workers", self.num_workers, self.num_workers >= 0, ">= 0")
        _check("data.val_views", self.val_views, self.val_views >= 1, ">= 1")
        _check("data.test_views", self.test_views, self.test_views >= 1, ">= 1")
        if self.eval_batch_size is not None:
            _check("data.eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1, ">= 1")
        _check(
            "data.max_bad_fraction",
            self.max_bad_fraction,
            0.0 <= self.max_bad_fraction <= 1.0,
            "in [0, 1]",
        )


@dataclass
class OptimSection:
    """AdamW. ``lr`` is the peak learning rate (paper: 1e-4) for the whole batch;
    no linear scaling with the number of processes is applied."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check("optim.lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a finite number > 0")
        _check("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("optim.betas", self.betas, all(0 <= b < 1 for b in self.betas), "in [0, 1)")
        _check("optim.eps", self.eps, self.eps > 0, "> 0")


@dataclass
class ScheduleSection:
    """Linear warmup from ``warmup_start_ratio * lr`` over ``warmup_steps``
    (or ``warmup_epochs`` when set) optimizer steps, then cosine decay to
    ``min_lr_ratio * lr`` at the last step."""

    warmup_steps: int = 0
    warmup_epochs: float | None = None
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.01

    def __post_init__(self) -> None:
        _check("schedule.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        if self.warmup_epochs is not None:
            _check("schedule.warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0")
        for name in ("warmup_start_ratio", "min_lr_ratio"):
            v = getattr(self, name)
            _check(f"schedule.{name}", v, 0 <= v <= 1, "in [0, 1]")


@dataclass
class TrainSection:
    """The loop. One *step* is one optimizer update (``grad_accum`` micro-batches
    of ``batch_size`` clips per process). ``max_steps`` caps the planned length
    (the schedule spans it); ``stop_at_step`` ends the process early without
    changing the plan (an interruption, for tests). ``amp``: ``auto`` = bf16
    autocast on CUDA, none on the CPU; ``bf16``; ``none``. ``nonfinite``: what a
    non-finite loss or gradient norm does: ``stop`` the run (the weights are not
    updated; the last checkpoint stays the latest) or ``skip`` the update
    (counted in ``train_summary.json``; the run stops after ``max_nonfinite``
    skipped updates in a row).
    ``activation_checkpointing``: ``none``, ``blocks`` (recompute every
    block's activations in the backward pass), ``stage1`` (only the
    multiscale encoders' first stage, where most activation memory sits) or
    ``selective`` (every block keeps its matmul and fused-attention outputs and
    recomputes norms, activations, casts and adds: about half the memory of
    ``none`` without extra matmul FLOPs); see ``mmt-fast plan`` for what each
    saves. ``compile``: run the training step's forward and backward through
    ``torch.compile`` (the fused ops stay opaque custom ops; compilation takes
    the first step; checkpoints keep the plain model's names, so a run resumes
    with it on or off). Off by default until timed on a GPU. ``compile_backend``:
    torch.compile's backend (``inductor``; ``aot_eager`` traces and checks the same
    graphs without generating code, in seconds on a CPU).

    Clusters (see docs/cluster.md): ``ckpt_every_minutes`` writes
    a checkpoint when that much time has passed since the last one (beside
    ``ckpt_every`` steps; rank 0's clock decides). ``preempt_signals``: signals
    on which the run finishes the step in flight, saves a checkpoint and exits
    with code 75 (empty: none handled). ``auto_resume``: continue from the
    newest loadable checkpoint in ``out_dir`` when there is one, without
    ``--resume`` (for requeued jobs and ``torchrun --max-restarts``)."""

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
    nonfinite: str = "stop"
    max_nonfinite: int = 10
    activation_checkpointing: str = "none"
    compile: bool = False
    compile_backend: str = "inductor"
    ckpt_every_minutes: float | None = None
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    auto_resume: bool = False

    def __post_init__(self) -> None:
        from mmt_fast.models.checkpointing import check_mode

        check_signals(self.preempt_signals)
        if self.ckpt_every_minutes is not None:
            v = self.ckpt_every_minutes
            _check("train.ckpt_every_minutes", v, math.isfinite(v) and v > 0, "> 0 or null")

        check_mode(self.activation_checkpointing)
        if not self.compile_backend or not isinstance(self.compile_backend, str):
            raise ConfigError(f"train.compile_backend={self.compile_backend!r}; expected a name")
        if self.amp not in ("auto", "bf16", "none"):
            raise ConfigError(f"train.amp={self.amp!r}; expected auto, bf16 or none")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite={self.nonfinite!r}; expected stop or skip")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ConfigError("train.batch_size, grad_accum and epochs must be >= 1")
        if self.keep_last < 1:
            raise ConfigError("train.keep_last must be >= 1")
        for name in ("log_every", "max_nonfinite"):
            _check(f"train.{name}", getattr(self, name), getattr(self, name) >= 1, ">= 1")
        for name in ("max_steps", "stop_at_step", "ckpt_every", "torch_threads"):
            v = getattr(self, name)
            if v is not None:
                _check(f"train.{name}", v, v >= 1, ">= 1 or null")
        _check("train.eval_every", self.eval_every, self.eval_every >= 0, ">= 0 (0 disables)")
        if self.clip_grad is not None:
            ok = math.isfinite(self.clip_grad) and self.clip_grad > 0
            _check("train.clip_grad", self.clip_grad, ok, "> 0 or null")
        if not str(self.out_dir).strip():
            raise ConfigError("train.out_dir is empty")
        dev = self.device
        if dev not in ("auto", "cpu", "cuda") and not (
            dev.startswith("cuda:") and dev[5:].isdigit()
        ):
            raise ConfigError(f"train.device={dev!r}; expected auto, cpu, cuda or cuda:N")


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


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}; expected {expected}")


def check_paths(cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"), out_dir: bool = True):
    """Check, before anything is built, that the configured files exist and ``out_dir`` is
    writable (created if needed). ConfigError naming the key and the path otherwise."""
    d = cfg.data
    for split in splits:
        p = getattr(d, split)
        if p and d.format == "webdataset":
            if not (Path(p).is_file() or (Path(p) / "index.json").is_file()):
                raise ConfigError(
                    f"data.{split}: shard index {p} (or {p}/index.json) does not exist"
                )
        elif p and not Path(p).is_file():
            raise ConfigError(f"data.{split}: manifest {p} does not exist")
    if d.classes and not Path(d.classes).is_file():
        raise ConfigError(f"data.classes: {d.classes} does not exist")
    if d.root and not Path(d.root).is_dir():
        raise ConfigError(f"data.root: {d.root} is not a folder")
    if out_dir:
        out = Path(cfg.train.out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"train.out_dir: cannot write to {out} ({e.strerror or e})") from e


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
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
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
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.epochs=3)")
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
        raise ConfigError(f"config base cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
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
    for section, names in (
        (cfg.data, ("train", "val", "test", "root", "classes")),
        (cfg.model.init, ("audio", "video", "ast")),
    ):
        for name in names:
            p = getattr(section, name)
            if p and not Path(p).is_absolute() and not Path(p).exists() and (base / p).exists():
                setattr(section, name, str(base / p))
    return cfg


def read_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A training config file plus ``KEY=VALUE`` overrides, as the commands read it: every
    failure to read or validate it is a :class:`ConfigError` (exit code 2) naming the file."""
    try:
        return load_config(path, overrides)
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"config file {e.filename} does not exist") from e
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"{path}: {msg}") from e
