"""Metric sinks of rank 0: a long-format CSV and TensorBoard.

``metrics.csv`` has one row per value: ``time,step,epoch,name,value`` (epochs 1-based; e.g.
``train/loss``, ``train/lr``, ``train/clips_per_s``, ``val/top1``). It is opened
in append mode, so a resumed run continues the same file (rows after the
checkpoint it resumed from are repeated by the resumed run; keep the last row of
each (step, name)).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path


class MetricLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._csv = self._writer = self._tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        self._csv = open(path, "a", newline="")
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(["time", "step", "epoch", "name", "value"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV only
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(out / "tb"))

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = f"{time.time():.3f}"
        for k, v in values.items():
            if v is None:
                continue
            self._writer.writerow([now, step, epoch, k, f"{float(v):.6g}"])
            if self._tb is not None:
                self._tb.add_scalar(k, float(v), step)
        self._csv.flush()

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
