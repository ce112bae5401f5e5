"""The training loop (``mmt-fast train``).

One process or many under ``torchrun`` (DDP; gloo on the CPU, NCCL on GPUs),
AdamW with warmup + cosine (:mod:`schedule`), gradient accumulation and
clipping, bf16 autocast on CUDA, the model's own loss (Eq. 8 or the ablation's,
by the preset), validation with best-checkpoint tracking, atomic checkpoints
and exact resume.

Units: a *step* is one optimizer update = ``grad_accum`` micro-batches of
``batch_size`` clips on each of ``world_size`` processes. An epoch has
``floor(clips / world_size / batch_size)`` micro-batches per process (the last
partial batch is dropped) and ``ceil(micro_batches / grad_accum)`` steps.

Exact resume: a checkpoint is taken between steps and holds the model, AdamW,
the schedule, (epoch, micro-batches done in the epoch), every rank's RNG states
and the skip counters. The sampler's permutation depends on (seed, epoch) only
and augmentation on (seed, epoch, clip), so the resumed run replays the same
remaining batches with the same augmentation and reaches the same weights as an
uninterrupted run (bit-identical on the CPU with ``deterministic: true``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mmt_fast.data.dataset import check_split
from mmt_fast.data.device_transforms import DeviceTransform
from mmt_fast.data.errors import BAD_KINDS
from mmt_fast.errors import ConfigError, DataError, TrainingError
from mmt_fast.models.checkpointing import set_activation_checkpointing
from mmt_fast.run import builders as B
from mmt_fast.run import distributed as D
from mmt_fast.run.checkpoint import (
    CheckpointManager,
    load_latest_loadable,
    model_state_for_saving,
    rng_state,
    set_rng_state,
)
from mmt_fast.run.config import TrainConfig, check_paths
from mmt_fast.run.evaluation import gather_predictions, report, summary
from mmt_fast.run.loop import autocast, model_inputs
from mmt_fast.run.sampling import CachedDataset, ResumableSampler, SeededDataset, derive_seed
from mmt_fast.train.logger import MetricLogger
from mmt_fast.train.preemption import (
    StartupGuard,
    StartupPreempted,
    StopWatch,
    clear_marker,
    preempted_at_startup,
    worker_ignores,
    write_marker,
)
from mmt_fast.train.schedule import WarmupCosine

log = logging.getLogger("mmt_fast.train")

KINDS = (*BAD_KINDS, "unknown")  # bad-clip kinds counted per step (collate's "unknown": None)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay for biases, norms (1-D) and ``model.no_weight_decay()``."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class _Loop:
    """State of :meth:`Trainer.fit` across steps: how it ends, step times, and the
    window of steps since the last log line."""

    def __init__(self) -> None:
        self.interrupted = False
        self.preempted = False
        self.step_times: list[float] = []
        self.window_parts: collections.defaultdict = collections.defaultdict(float)
        self.reset_window()

    def reset_window(self) -> None:
        self.window_clips, self.window_n = 0, 0
        self.window_t0 = time.perf_counter()
        self.window_parts.clear()

    def add(self, parts: dict, clips: int) -> None:
        """One micro-batch's loss parts and good clips."""
        self.window_clips += clips
        for k, v in parts.items():
            self.window_parts[k] += v
        self.window_n += bool(parts)


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`fit` runs the loop.

    Args:
        cfg: the run's config.
        resume: continue from the latest checkpoint in ``cfg.train.out_dir``
            (a fresh start when there is none).
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self._bar = None  # the progress bar while fit() runs (messages go above it)
        self._setup_process()
        ck, resume_from = self._find_checkpoint(resume)
        self._warn_shared_store()
        base_train = self._build_data(ck, resume_from)
        self._plan_steps(base_train)
        self._build_model(ck)
        self._init_loop_state(base_train)
        seed_everything(derive_seed(cfg.train.seed, self.dist.rank, 1))
        if ck is not None:
            self._load_state(ck)
        self.logger = MetricLogger(self.out_dir, self.dist.is_main, cfg.train.tensorboard)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clear_marker(self.out_dir)  # a preempted run continues (or a new one starts)
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
            self._announce(base_train, ck, resume_from)

    def _setup_process(self) -> None:
        """Paths, the process group, threads, determinism, the checkpoint manager."""
        t = self.cfg.train
        check_paths(self.cfg, ("train", "val") if t.eval_every > 0 else ("train",))
        self.dist = D.setup(t.device)
        self.device = self.dist.device
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.out_dir = Path(t.out_dir)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", t.keep_last)

    def _find_checkpoint(self, resume: bool):
        """The checkpoint to resume from (None for a fresh start) and its path."""
        how = "--resume" if resume else "train.auto_resume"
        resume = resume or self.cfg.train.auto_resume
        if not resume and self.ckpt.latest() is not None:
            raise ConfigError(
                f"{self.ckpt.dir} already holds checkpoints: pass --resume (or set "
                "train.auto_resume: true) to continue that run, or choose another train.out_dir"
            )
        ck, skipped_ckpts = load_latest_loadable(self.ckpt) if resume else (None, [])
        for why in skipped_ckpts:
            log.warning("resume: skipping a checkpoint that does not load: %s", why)
        if resume and ck is None and skipped_ckpts:
            raise TrainingError(
                f"{how}: no checkpoint in {self.ckpt.dir} loads: " + "; ".join(skipped_ckpts)
            )
        if resume and ck is None and self.dist.is_main:
            self._print(f"{how}: no checkpoint in {self.ckpt.dir}, so this run starts from step 0")
        return ck, (ck.path if ck is not None else None)

    def _warn_shared_store(self) -> None:
        if (
            self.dist.is_main
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        ):
            log.warning(
                "torchrun --max-restarts with the rendezvous store shared with the workers: a "
                "restarted group can fail to connect (pytorch/pytorch#135712); run torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
            )

    def _build_data(self, ck, resume_from):
        """Records, classes, the model config and the train/val datasets and sampler;
        returns the training split's base dataset."""
        cfg, t = self.cfg, self.cfg.train
        self.train_records = B.read_records(cfg.data, "train")
        if self.train_records is None:
            raise ConfigError("data.train is not set")
        self.val_records = B.read_records(cfg.data, "val") if t.eval_every > 0 else None
        self.classes = B.class_info(cfg.data, self.train_records)
        if ck is not None and ck.classes is not None and ck.classes != self.classes:
            raise ValueError(
                f"the class index of {resume_from} differs from the data's; "
                "resume with the same data (or set data.classes to its classes.json)"
            )
        self.model_cfg = B.model_config(cfg, self.classes)
        dev_tf = cfg.data.device_transforms
        dc_train = B.dataset_config(
            cfg.data, self.model_cfg, "test" if cfg.data.cache else "train", 1, dev_tf
        )
        self.train_tf = DeviceTransform(dc_train, t.seed) if dev_tf else None
        self.val_tf = None
        w, r = self.dist.world_size, self.dist.rank
        base_train = B.build_split_dataset(
            cfg.data, "train", self.train_records, dc_train, self.classes, self.model_cfg
        )
        # empty or mostly unusable splits stop here, before any decoding or training
        check_split("train", base_train, cfg.data.max_bad_fraction)
        stream = cfg.data.format == "webdataset"
        if stream:  # shards stream sequentially; the stream is its own sampler
            from mmt_fast.data.shards import ShardStream

            self.train_set = ShardStream(
                base_train, t.seed, t.batch_size, cfg.data.num_workers, w, r,
                shuffle_buffer=cfg.data.shuffle_buffer,
            )  # fmt: skip
            self.sampler = self.train_set
        else:
            src = CachedDataset(base_train) if cfg.data.cache else base_train
            self.train_set = SeededDataset(src, t.seed)
            self.sampler = ResumableSampler(len(self.train_set), w, r, shuffle=True, seed=t.seed)
        self._build_val(dev_tf)
        return base_train

    def _build_val(self, dev_tf: bool) -> None:
        cfg = self.cfg
        self.val_set = None
        if self.val_records is None:
            return
        dc_val = B.dataset_config(cfg.data, self.model_cfg, "test", cfg.data.val_views, dev_tf)
        self.val_tf = DeviceTransform(dc_val) if dev_tf else None
        self.val_set = B.build_split_dataset(
            cfg.data, "val", self.val_records, dc_val, self.classes, self.model_cfg
        )
        check_split("val", self.val_set, cfg.data.max_bad_fraction)
        if cfg.data.cache:
            self.val_set = CachedDataset(self.val_set)

    def _plan_steps(self, base_train) -> None:
        """Micro-batches per epoch, steps per epoch and the planned total."""
        t, w = self.cfg.train, self.dist.world_size
        if self.sampler is self.train_set:
            per_rank = self.train_set.samples_per_rank
        else:
            per_rank = len(self.sampler.epoch_indices())
        self.batches_per_epoch = per_rank // t.batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{len(base_train)} training clips on {w} process(es) do not fill one batch of {t.batch_size}"
            )
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.grad_accum)
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)

    def _build_model(self, ck) -> None:
        """Model, AdamW (fused on CUDA), schedule, DDP and torch.compile (same init on
        every rank). ``self.core`` is the plain model (checkpoints hold its state dict,
        so names never carry DDP's or torch.compile's prefix); ``self.model`` is what
        the training step calls."""
        cfg, t = self.cfg, self.cfg.train
        seed_everything(t.seed)
        init = cfg.model.init if ck is None else None  # a resumed run has its own weights
        model = B.build_model(self.model_cfg, init, self._print if self.dist.is_main else None)
        model = model.to(self.device)
        set_activation_checkpointing(model, t.activation_checkpointing)
        self.core = model
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            fused=self.device.type == "cuda" or None,
        )
        sc = cfg.schedule
        warm = sc.warmup_steps
        if sc.warmup_epochs is not None:
            warm = round(sc.warmup_epochs * self.steps_per_epoch)
        self.scheduler = WarmupCosine(
            self.optimizer, self.total_steps, warm, sc.min_lr_ratio, sc.warmup_start_ratio
        )
        self.model: nn.Module = model
        self._ddp: DDP | None = None
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = self._ddp = DDP(model, device_ids=ids)
        self._eval_model = self.model  # validation runs eagerly
        # compiled at the call site (the model's code stays eager): forward and backward
        # of the training step; compilation happens on the first step
        self._compiling = t.compile
        if t.compile:
            self.model = torch.compile(self.model, backend=t.compile_backend)

    def _init_loop_state(self, base_train) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict | None = None
        # skip events (a bad clip counts once per epoch it is drawn) and the unique bad clips
        self.skipped: collections.Counter = collections.Counter(base_train.skip_counts)
        self.bad_clips: dict[str, list[str]] = {
            b.path: [b.kind, b.reason] for b in base_train.dropped
        }
        self.warnings: collections.Counter = collections.Counter()
        self.last_val: dict | None = None
        self.nonfinite_steps = 0  # updates skipped for a non-finite loss/gradient (all time)
        self._nonfinite_run = 0  # ... in a row
        self.good_clips = 0  # clips that reached a loss in this process since it started
        self._epoch_good = 0
        self._bad_loss: float | None = None
        self._val_pending = False  # a preempted epoch end whose validation is still to run
        self._step_bad: collections.Counter = collections.Counter()  # this rank, this step
        self._epoch_bad = 0  # clips that failed to load this epoch, all ranks
        self.bad_seen: collections.Counter = collections.Counter()  # ... since start, per kind
        self._postfix: dict[str, str] = {}
        self._watch: StopWatch | None = None

    def _announce(self, base_train, ck, resume_from) -> None:
        cfg, w = self.cfg, self.dist.world_size
        n_par = sum(p.numel() for p in self.core.parameters())
        self._print(
            f"model {cfg.model.preset} ({n_par / 1e6:.2f} M params, heads {self.model_cfg.heads}, "
            f"inputs {self.core.modalities}); {len(base_train)} train clips"
            + (f", {len(self.val_set)} val clips" if self.val_set is not None else "")
            + f"; {w} process(es) on {self.device}; {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps ({self.planned_epochs} epochs) planned"
            + (f"; resumed from {resume_from} (step {self.step})" if ck is not None else "")
            + (
                f"; elastic restart {os.environ['TORCHELASTIC_RESTART_COUNT']}"
                if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")
                else ""
            )
        )

    @property
    def planned_epochs(self) -> int:
        """Epochs the run will reach (``train.epochs``, fewer when ``max_steps`` stops it earlier)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        rngs = D.all_gather_object(rng_state())
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "sampler": self.sampler.state_dict(),
            "best": self.best,
            "skipped": dict(self._gather_counter(self.skipped)),
            "warnings": dict(self._gather_counter(self.warnings)),
            "bad_clips": self._gather_bad(),
            "nonfinite_steps": self.nonfinite_steps,
            "val_pending": self._val_pending,
        }

    def _load_state(self, ck) -> None:
        s = ck.state
        if s.get("world_size") != self.dist.world_size and s.get("batch_in_epoch", 0):
            raise ConfigError(
                f"{ck.path} was written mid-epoch by {s.get('world_size')} processes; resume "
                f"with the same number (now {self.dist.world_size}) or from an end-of-epoch checkpoint"
            )
        saved_workers = s.get("sampler", {}).get("workers")
        now_workers = self.sampler.state_dict().get("workers")
        if saved_workers != now_workers and s.get("batch_in_epoch", 0):
            raise ConfigError(
                f"{ck.path} was written mid-epoch while streaming shards with {saved_workers} "
                f"DataLoader worker(s) per process; resume with data.num_workers giving the "
                f"same count (now {now_workers}) or from an end-of-epoch checkpoint"
            )
        self.core.load_state_dict(ck.model)
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.scheduler.total_steps != self.total_steps:
            log.warning(
                "the checkpoint planned %d steps, the config %d: the schedule follows the config",
                self.scheduler.total_steps,
                self.total_steps,
            )
            self.scheduler.total_steps = self.total_steps
            self.scheduler._apply()
        self.step, self.epoch, self.batch_in_epoch = s["step"], s["epoch"], s["batch_in_epoch"]
        # best.json is written after validation, which follows the epoch's checkpoint
        self.best = self.ckpt.best_info() or s.get("best")
        self.nonfinite_steps = int(s.get("nonfinite_steps", 0))
        self._val_pending = bool(s.get("val_pending", False))
        # counters were summed over ranks when saved: rank 0 carries the totals
        if self.dist.is_main:
            self.skipped = collections.Counter(s.get("skipped", {}))
            self.warnings = collections.Counter(s.get("warnings", {}))
            self.bad_clips = dict(s.get("bad_clips", {}))
        else:
            self.skipped, self.warnings = collections.Counter(), collections.Counter()
        rngs = s["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            seed_everything(derive_seed(self.cfg.train.seed, self.dist.rank, self.step))

    def _gather_counter(self, c: collections.Counter) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for part in D.all_gather_object(dict(c)):
            total.update(part)
        return total

    def _gather_bad(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for part in D.all_gather_object(self.bad_clips):
            out.update(part)
        return out

    def save(self, meta: dict | None = None) -> Path | None:
        bad = [n for n, p in self.core.state_dict().items() if not torch.isfinite(p).all()]
        if bad:  # never write a checkpoint that cannot be trained or evaluated from
            raise TrainingError(
                f"step {self.step}: {len(bad)} weight tensors are not finite (e.g. {bad[0]}); "
                f"not saving. The last good checkpoint is {self.ckpt.latest() or 'none yet'}; "
                "lower optim.lr"
            )
        with self._watch.deferred() if self._watch is not None else contextlib.nullcontext():
            return self._save(meta)

    def _save(self, meta: dict | None) -> Path | None:
        state = self._state()  # collective: every rank takes part
        path = None
        if self.dist.is_main:
            path = self.ckpt.save(
                self.step,
                model_state_for_saving(self.core),
                state,
                classes=self.classes,
                config_yaml=self.cfg.to_yaml(),
                meta={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **(meta or {})},
            )
        D.barrier()
        if self._watch is not None:
            self._watch.saved()
        return path

    # ------------------------------------------------------------------ steps
    def _dummy_batch(self) -> dict:
        """Zeros standing in for a micro-batch whose clips were all bad: every
        rank must still run forward/backward so DDP's all-reduce stays in step."""
        mc, b = self.model_cfg, 2
        out: dict = {}
        if mc.audio is not None:
            out["audio"] = torch.zeros(b, 1, *mc.audio.input_size)
        if mc.video is not None:
            out["video"] = torch.zeros(b, 3, *mc.video.input_size)
        for h in mc.heads:
            out[h] = torch.zeros(b, dtype=torch.long)
        return out

    def _micro_step(self, batch: dict, scale: float, sync: bool) -> tuple[dict, int]:
        """Forward + backward of one micro-batch; returns (loss parts, good clips)."""
        self.skipped.update(batch["skipped"])
        self._step_bad.update(batch["skipped"])
        self.warnings.update(batch.get("warnings", {}))
        for b in batch.get("bad", []):
            self.bad_clips[b.path] = [b.kind, b.reason]
        n = batch["batch_size"]
        if n == 0:
            batch, scale = self._dummy_batch(), 0.0
        elif self.train_tf is not None:
            batch = self.train_tf(batch, self.device, self.epoch)
        inputs, _ = model_inputs(batch, self.core.modalities, self.device)
        targets = {h: batch[h].to(self.device) for h in self.model_cfg.heads}
        ctx = (
            self._ddp.no_sync() if self._ddp is not None and not sync else contextlib.nullcontext()
        )
        compiling, t0 = self._compiling, time.perf_counter()
        if compiling and self.dist.is_main:
            self._print("torch.compile: compiling the model (forward and backward) on this step...")
        with ctx:
            with autocast(self.device, self.cfg.train.amp):
                out = self.model(**inputs)
                loss, parts = self.core.loss(out, targets)
            (loss * scale).backward()
        if compiling:
            self._compiling = False
            if self.dist.is_main:
                self._print(
                    f"torch.compile: compiled; the first step took {time.perf_counter() - t0:.1f} s"
                )
        if n and not math.isfinite(float(loss.detach())):
            self._bad_loss = float(loss.detach())
        self.good_clips += n
        self._epoch_good += n
        return (parts if n else {}), n

    def _optimizer_step(self) -> float | None:
        """Clip, check and apply the gradients. A non-finite loss (any rank) or gradient
        norm (the same on every rank after DDP's all-reduce) never reaches the weights:
        the run stops (``train.nonfinite: stop``) or the update is skipped and counted."""
        t = self.cfg.train
        gn = float(nn.utils.clip_grad_norm_(self.core.parameters(), t.clip_grad or float("inf")))
        bad_loss, self._bad_loss = self._bad_loss, None
        flag = torch.tensor([float(bad_loss is not None or not math.isfinite(gn))])
        if D.is_dist():
            flag = D.all_reduce_sum(flag.to(self.device)).cpu()
        if flag.item() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            self._nonfinite_run += 1
            what = f"loss {bad_loss}" if bad_loss is not None else f"gradient norm {gn}"
            where = f"step {self.step + 1} (epoch {self.epoch})"
            if t.nonfinite == "stop" or self._nonfinite_run >= t.max_nonfinite:
                raise TrainingError(
                    f"non-finite {what} at {where}"
                    + (f", {self._nonfinite_run} updates in a row" if t.nonfinite == "skip" else "")
                    + "; the weights were not updated and the last checkpoint is "
                    f"{self.ckpt.latest() or 'none yet'}. Lower optim.lr, check the data, or set "
                    "train.nonfinite: skip"
                )
            log.warning("skipping the update of %s: non-finite %s", where, what)
        else:
            self._nonfinite_run = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return gn if t.clip_grad else None

    # ------------------------------------------------------------------ evaluation
    def validate(self) -> dict | None:
        if self.val_set is None:
            return None
        d = self.cfg.data
        sampler = ResumableSampler(
            len(self.val_set), self.dist.world_size, self.dist.rank, shuffle=False, pad=False
        )
        loader = B.make_loader(
            self.val_set,
            d.eval_batch_size or self.cfg.train.batch_size,
            d.num_workers,
            sampler,
            self.cfg.train.seed,
            self.epoch,
            drop_last=False,
            worker_init_fn=worker_ignores(self.cfg.train.preempt_signals),
        )
        pred = gather_predictions(
            self._eval_model, loader, self.device, self.cfg.train.amp, transform=self.val_tf
        )
        if len(pred["index"]) == 0:
            raise DataError(
                f"validation after epoch {self.epoch - 1}: no clip of the val split could be "
                f"loaded (skipped {pred['skipped']}); the epoch's checkpoint is saved "
                f"({self.ckpt.latest()})"
            )
        res = report(pred)
        self.last_val = res
        return res

    def _check_progress(self, where: str) -> None:
        """A run whose clips all fail must not look like success (every rank agrees)."""
        n = torch.tensor([float(self._epoch_good)])
        if D.is_dist():
            n = D.all_reduce_sum(n.to(self.device)).cpu()
        if n.item() > 0:
            return
        skips = dict(self._gather_counter(self.skipped))
        bad = self._gather_bad()
        first = "; ".join(f"{p}: {r}" for p, (_, r) in list(bad.items())[:3])
        raise DataError(
            f"{where}: no training step saw a valid clip (skipped {skips}"
            + (f"; first: {first}" if first else "")
            + "). Check data.root, the files and the labels"
        )

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train to ``total_steps`` (or ``stop_at_step``); returns a summary dict."""
        t = self.cfg.train
        self._bar = self._make_bar()
        loop = _Loop()
        watch = StopWatch(t.preempt_signals, t.ckpt_every_minutes)
        self._watch = watch
        started = time.perf_counter()
        try:
            with watch:
                if self._val_pending and self.val_set is not None:  # preempted before validating
                    self._validate_epoch(self.epoch)
                while self.step < self.total_steps and not loop.interrupted:
                    self._run_epoch(loop)
        finally:
            self._watch = None
            if self._bar is not None:
                self._bar.close()
            self._bar = None
        elapsed = time.perf_counter() - started
        if loop.step_times:
            n = torch.tensor([float(self.good_clips)])
            if D.is_dist():
                n = D.all_reduce_sum(n.to(self.device)).cpu()
            if n.item() == 0:
                self._epoch_good = 0
                self._check_progress("training")
        reason = watch.stop_reason if loop.preempted else None
        return self._finish(loop.interrupted, elapsed, loop.step_times, reason)

    def _make_bar(self):
        t = self.cfg.train
        if not (self.dist.is_main and t.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            desc=f"epoch {self.epoch + 1}/{self.planned_epochs}",
        )

    def _run_epoch(self, loop: _Loop) -> None:
        """The rest of the current epoch (or until a stop), then its end: checkpoint and
        validation, or the checkpoint of a run that reached ``max_steps`` mid-epoch."""
        t = self.cfg.train
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * t.batch_size)
        loader = B.make_loader(
            self.train_set,
            t.batch_size,
            self.cfg.data.num_workers,
            self.sampler,
            t.seed,
            self.epoch,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_ignores(t.preempt_signals),
        )
        it = iter(loader)
        self.model.train()
        self._epoch_good = 0
        self._epoch_bad = 0
        epoch_start_batch = self.batch_in_epoch
        while self.batch_in_epoch < self.batches_per_epoch and self.step < self.total_steps:
            if self._train_step(it, loop):
                break
        del it, loader
        if self.batch_in_epoch > epoch_start_batch:
            self._check_progress(f"epoch {self.epoch}")
        if not loop.interrupted:
            self._close_epoch(loop)

    def _train_step(self, it, loop: _Loop) -> bool:
        """One optimizer step (``grad_accum`` micro-batches), its logging, the stop
        watch's poll and a checkpoint when one is due; True when the epoch's loop ends."""
        t = self.cfg.train
        t0 = time.perf_counter()
        n_micro = min(t.grad_accum, self.batches_per_epoch - self.batch_in_epoch)
        for j in range(n_micro):
            parts, n = self._micro_step(next(it), 1.0 / n_micro, j == n_micro - 1)
            loop.add(parts, n)
        gn = self._optimizer_step()
        self.step += 1
        self.batch_in_epoch += n_micro
        loop.step_times.append(time.perf_counter() - t0)
        if self._bar is not None:
            self._bar.update(1)
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self._log_window(loop, gn)
        # one collective per step: a signal (any rank) or a due time-based save
        # ... which also sums the clips that failed to load, per kind
        stop, due, bad = self._watch.poll(self.device, [self._step_bad.get(k, 0) for k in KINDS])
        self._step_bad.clear()
        if any(bad):
            self._count_bad(bad)
        loop.preempted = stop and self.step < self.total_steps
        if self.batch_in_epoch >= self.batches_per_epoch:
            return True  # end of epoch: handled by _close_epoch (its checkpoint covers `due`)
        if (t.ckpt_every and self.step % t.ckpt_every == 0) or due or loop.preempted:
            self.save()
        if loop.preempted or (t.stop_at_step is not None and self.step >= t.stop_at_step):
            loop.interrupted = True
            return True
        return self.step == self.total_steps

    def _log_window(self, loop: _Loop, gn: float | None) -> None:
        """Log the steps since the last log line (loss parts, lr, clips/s, gradient norm)."""
        dt = time.perf_counter() - loop.window_t0
        cps = loop.window_clips * self.dist.world_size / max(dt, 1e-9)
        vals = {f"train/{k}": v / max(loop.window_n, 1) for k, v in loop.window_parts.items()}
        vals.update({"train/lr": self.scheduler.get_last_lr()[0], "train/clips_per_s": cps})
        if gn is not None:
            vals["train/grad_norm"] = gn
        self.logger.log(self.step, self.epoch + 1, vals)
        if self._bar is not None:
            self._postfix.update(
                loss=f"{vals.get('train/total', float('nan')):.3f}",
                clips_s=f"{cps:.1f}",
                lr=f"{vals['train/lr']:.2e}",
            )
            self._bar.set_postfix(self._postfix)
        loop.reset_window()

    def _close_epoch(self, loop: _Loop) -> None:
        t = self.cfg.train
        if self.batch_in_epoch >= self.batches_per_epoch:
            if self._end_epoch(validate=not loop.preempted):
                loop.preempted = True  # a signal came before the validation
            if loop.preempted:
                loop.interrupted = True
                return
            if self._bar is not None and self.step < self.total_steps:
                self._bar.set_description(f"epoch {self.epoch + 1}/{self.planned_epochs}")
            if t.stop_at_step is not None and self.step >= t.stop_at_step:
                loop.interrupted = self.step < self.total_steps
        elif self.step >= self.total_steps:
            self.save()  # max_steps reached mid-epoch

    def _count_bad(self, bad: list[float]) -> None:
        """Show this step's unusable clips (all ranks) at once and stop as soon as the
        epoch is sure to exceed ``data.max_bad_fraction`` (every rank holds the same sums)."""
        new_kinds = [k for k, n in zip(KINDS, bad) if n and k not in self.bad_seen]
        for k, n in zip(KINDS, bad):
            if n:
                self.bad_seen[k] += int(n)
        self._epoch_bad += int(sum(bad))
        text = ", ".join(f"{k} {n}" for k, n in sorted(self.bad_seen.items()))
        if self._bar is not None:
            self._postfix["bad"] = text
            self._bar.set_postfix(self._postfix)
        elif new_kinds and self.dist.is_main:
            self._print(f"step {self.step}: clips that fail to load so far: {text}")
        d, t = self.cfg.data, self.cfg.train
        epoch_clips = self.batches_per_epoch * t.batch_size * self.dist.world_size
        if self._epoch_bad > d.max_bad_fraction * epoch_clips:
            self._check_progress(f"epoch {self.epoch}")  # none usable at all: says so
            bad_clips = self._gather_bad()  # collective: every rank is here at this step
            first = "; ".join(f"{p}: {r}" for p, (_, r) in list(bad_clips.items())[:3])
            raise DataError(
                f"epoch {self.epoch + 1}, step {self.step}: {self._epoch_bad} of the "
                f"{epoch_clips} clips the epoch draws failed to load ({text} since the start), "
                f"more than data.max_bad_fraction={d.max_bad_fraction}; first: {first}. The last "
                f"checkpoint is {self.ckpt.latest() or 'none yet'}; `mmt-fast check-data` "
                "lists every unusable clip"
            )

    def _end_epoch(self, validate: bool = True) -> bool:
        """Save the epoch's checkpoint, then validate: a failing evaluation never loses
        the epoch's work. The val result is added to the checkpoint's meta.json and
        best.json afterwards. ``validate=False`` (preempted), or a preemption signal
        on any rank before the validation starts (True is returned): the checkpoint
        records that the validation is pending and the resumed run does it first."""
        t = self.cfg.train
        finished = self.epoch + 1  # 1-based, as printed and logged
        self.epoch += 1
        self.batch_in_epoch = 0
        skips = self._gather_counter(self.skipped)
        self.logger.log(self.step, finished, {"data/skip_events": sum(skips.values())})
        due = (
            self.val_set is not None
            and t.eval_every
            and (self.epoch % t.eval_every == 0 or self.step >= self.total_steps)
        )
        stop = False
        if due and validate and self._watch is not None:  # validation can take minutes
            stop = self._watch.poll(self.device)[0]
        self._val_pending = bool(due and (stop or not validate))
        self.save({"finished_epoch": finished})
        if due and validate and not stop:
            self._validate_epoch(finished)
        return stop

    def _validate_epoch(self, finished: int) -> None:
        """Validate after epoch ``finished`` (1-based) and record the result."""
        self._val_pending = False
        res = self.validate()
        val = {k: res[k] for k in ("top1", "top5", "num_clips")}
        self.logger.log(self.step, finished, {"val/top1": res["top1"], "val/top5": res["top5"]})
        if self.dist.is_main:
            self._print(f"epoch {finished}/{self.planned_epochs}: val {summary(res)}")
            self.ckpt.update_meta(self.step, {"val": val})
        v = val["top1"]  # every rank holds the same gathered result
        if self.best is None or v > self.best["value"]:
            self.best = {"step": self.step, "metric": "val/top1", "value": v}
            if self.dist.is_main:
                self.ckpt.update_best(self.step, "val/top1", v)
        D.barrier()

    def _finish(
        self, interrupted: bool, elapsed: float, step_times: list[float], preempted: str | None
    ) -> dict:
        skipped = self._gather_counter(self.skipped)
        warnings = self._gather_counter(self.warnings)
        bad = self._gather_bad()
        # the first step of each loader start includes worker start-up: use the median
        med = float(np.median(step_times)) if step_times else float("nan")
        clips_per_step = (
            self.cfg.train.batch_size * self.cfg.train.grad_accum * self.dist.world_size
        )
        result = {
            "step": self.step,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "interrupted": interrupted,
            "preempted": preempted,
            "best": self.best,
            "last_val": None
            if self.last_val is None
            else {k: self.last_val[k] for k in ("top1", "top5", "num_clips")},
            "skipped_clips": dict(collections.Counter(kind for kind, _ in bad.values())),
            "nonfinite_steps": self.nonfinite_steps,
            "skip_events": dict(skipped),
            "warnings": dict(warnings),
            "bad_clips": {p: {"kind": k, "reason": r} for p, (k, r) in sorted(bad.items())},
            "seconds": elapsed,
            "median_step_s": med,
            "clips_per_s": clips_per_step / med if step_times else float("nan"),
        }
        if self.dist.is_main:
            import json

            (self.out_dir / "train_summary.json").write_text(json.dumps(result, indent=1) + "\n")
            n_bad = len(bad)
            mid = 0 < self.batch_in_epoch < self.batches_per_epoch  # self.epoch: 0-based
            where = f"in epoch {self.epoch + 1}" if mid else f"after epoch {self.epoch}"
            self._print(
                f"{'stopped' if interrupted else 'done'} at step {self.step}/{self.total_steps} "
                f"({where}/{self.planned_epochs}) in {elapsed:.1f} s; "
                + (
                    f"skipped {n_bad} bad clips {result['skipped_clips']} "
                    f"({sum(skipped.values())} times; list in train_summary.json)"
                    if n_bad
                    else "no clips skipped"
                )
                + (f"; warnings {dict(warnings)}" if warnings else "")
            )
            if preempted:
                ck = self.ckpt.latest()
                write_marker(
                    self.out_dir,
                    {"signal": preempted, "step": self.step, "checkpoint": str(ck)},
                )
                self._print(
                    f"preempted by {preempted}: stopped after step {self.step}, checkpoint {ck}; "
                    "continue with --resume (or train.auto_resume: true); exit code 75"
                )
        self.logger.close()
        return result

    def _print(self, msg: str) -> None:
        """A line on stderr; above the progress bar while it is shown."""
        if self._bar is not None:
            self._bar.write(f"[mmt-fast] {msg}", file=sys.stderr)
        else:
            print(f"[mmt-fast] {msg}", file=sys.stderr, flush=True)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Build a :class:`Trainer`, run it, leave the process group; returns the summary.

    Process-wide torch settings the run changes (thread count, deterministic
    algorithms) are restored afterwards.
    """
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    guard = StartupGuard(cfg.train.preempt_signals)
    result: dict = {}
    try:
        with guard:  # a preemption signal before the first step: exit 75 all the same
            trainer = Trainer(cfg, resume=resume)
        result = trainer.fit()
        return result
    except StartupPreempted as e:
        result = preempted_at_startup(cfg.train.out_dir, e.args[0], D.rank())
        return result
    finally:
        if not result.get("preempted"):  # a stopped run ignores the signals until it exits
            guard.restore()
        D.cleanup()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
