"""Checkpoints: safetensors weights + a tensors-and-numbers state file, written atomically.

Layout of a run's ``out_dir/checkpoints/``::

    step_000001200/
        model.safetensors   model weights (no code, no pickle)
        state.pt            optimizer, scheduler, loop position, RNG states, counters;
                            only tensors/numbers/strings: read with torch.load(weights_only=True)
        classes.json        the class index (ClassIndex.to_dict, or {"verb": .., "noun": ..})
        config.yaml         the resolved training config
        meta.json           step, epoch, metrics (written last)
    best.json               {"step": ..., "metric": "val/top1", "value": ...}

Atomicity: everything is written into a hidden temporary folder next to the
final one, each file flushed and fsync'ed, and the folder renamed into place
(``rename`` is atomic on POSIX filesystems). A crash at any point leaves either
the complete new checkpoint or none; temporary folders are ignored and removed
by the next save. ``best.json`` is replaced with ``os.replace``.
``keep_last`` complete checkpoints are kept, plus the best one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmt_fast.errors import CheckpointError

STEP_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


# ------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python RNG states as tensors/ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


# ------------------------------------------------------------------------ files
def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with DDP's ``module.`` prefix removed and tensors made contiguous CPU copies."""
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in m.state_dict().items()}


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``state`` is empty when only weights were loaded."""

    path: Path
    model: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)
    classes: dict | None = None
    config: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta.get("step", self.state.get("step", 0)))


class CheckpointManager:
    """Saves, finds, prunes and loads the checkpoints of one run (see module docstring)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last

    # ------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def path_of(self, step: int) -> Path:
        return self.dir / step_dir_name(step)

    def latest(self) -> Path | None:
        s = self.steps()
        return self.path_of(s[-1]) if s else None

    def best_info(self) -> dict | None:
        p = self.dir / "best.json"
        if not p.is_file():
            return None
        info = json.loads(p.read_text())
        return info if self.path_of(int(info["step"])).is_dir() else None

    def best(self) -> Path | None:
        info = self.best_info()
        return self.path_of(int(info["step"])) if info else None

    # ------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        state: dict[str, Any],
        classes: dict | None = None,
        config_yaml: str | None = None,
        meta: dict | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically, then prune old ones. Returns its folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        final = self.path_of(step)
        tmp = self.dir / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            save_file(model_state, str(tmp / "model.safetensors"), metadata={"step": str(step)})
            torch.save(state, tmp / "state.pt")
            if classes is not None:
                (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "meta.json").write_text(
                json.dumps({"step": step, **(meta or {})}, indent=1) + "\n"
            )
            for f in tmp.iterdir():
                _fsync_file(f)
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # the same step saved twice (periodic + end of epoch)
            old = self.dir / f"{TMP_PREFIX}old-{final.name}.{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.dir)
        self.prune()
        return final

    def update_meta(self, step: int, extra: dict) -> None:
        """Add keys to ``meta.json`` of checkpoint ``step`` (atomically)."""
        f = self.path_of(step) / "meta.json"
        write_json_atomic(f, {**json.loads(f.read_text()), **extra})

    def update_best(
        self, step: int, metric: str, value: float, higher_is_better: bool = True
    ) -> bool:
        """Record checkpoint ``step`` as the best if ``value`` beats the current best."""
        info = self.best_info()
        if info is not None:
            better = value > info["value"] if higher_is_better else value < info["value"]
            if not better:
                return False
        write_json_atomic(self.dir / "best.json", {"step": step, "metric": metric, "value": value})
        self.prune()
        return True

    def prune(self) -> None:
        """Delete all but the last ``keep_last`` complete checkpoints and the best."""
        steps = self.steps()
        info = self.best_info()
        keep = set(steps[-self.keep_last :])
        if info is not None:
            keep.add(int(info["step"]))
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.path_of(s), ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        for p in self.dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


# ------------------------------------------------------------------------ loading
def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint folder from: a ``model.safetensors`` file, a checkpoint folder,
    a run's ``checkpoints/`` folder or the run folder (``which``: ``best``, falling
    back to the latest, or ``latest``)."""
    p = Path(path)
    if p.is_file():
        return p.parent
    if (p / "model.safetensors").is_file():
        return p
    for d in (p / "checkpoints", p):
        mgr = CheckpointManager(d)
        if mgr.steps():
            found = (mgr.best() if which == "best" else None) or mgr.latest()
            assert found is not None
            return found
    raise FileNotFoundError(f"no checkpoint in {p} (expected model.safetensors or step_* folders)")


STATE_KEYS = ("step", "epoch", "batch_in_epoch", "optimizer", "scheduler", "rng")


def load_checkpoint(
    path: str | os.PathLike,
    which: str = "best",
    weights_only_model: bool = False,
    require_state: bool = False,
) -> Checkpoint:
    """Load weights (safetensors) and, unless ``weights_only_model``, the training
    state with ``torch.load(weights_only=True)``: no code from the file is run.

    ``require_state``: the checkpoint must hold a complete training state (for
    resuming). A missing or unreadable file raises :class:`CheckpointError`
    naming it."""
    d = resolve_checkpoint(path, which)

    def read(name: str, fn):
        f = d / name
        try:
            return fn(f)
        except FileNotFoundError:
            raise CheckpointError(f"{f} is missing (incomplete checkpoint)") from None
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{f} cannot be read (damaged?): {msg}") from e

    model = read("model.safetensors", lambda f: load_file(str(f)))
    state: dict[str, Any] = {}
    if require_state or (not weights_only_model and (d / "state.pt").is_file()):
        state = read("state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
        missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
        if require_state and missing:
            raise CheckpointError(f"{d / 'state.pt'} lacks the training state {missing}")
    classes = (
        read("classes.json", lambda f: json.loads(f.read_text()))
        if (d / "classes.json").is_file()
        else None
    )
    config = (d / "config.yaml").read_text() if (d / "config.yaml").is_file() else None
    meta = (
        read("meta.json", lambda f: json.loads(f.read_text()))
        if (d / "meta.json").is_file()
        else {}
    )
    return Checkpoint(d, model, state, classes, config, meta)


def load_latest_loadable(mgr: CheckpointManager) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of ``mgr`` that loads completely (weights and training
    state), and one line per newer checkpoint skipped, saying why. ``(None, reasons)``
    when there are checkpoints but none loads; ``(None, [])`` when there is none."""
    skipped: list[str] = []
    for step in reversed(mgr.steps()):
        try:
            return load_checkpoint(mgr.path_of(step), require_state=True), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped
