"""Stopping cleanly when the cluster asks: preemption signals and time-based checkpoints.

SLURM (``--signal``, ``scancel``, preemption) and Kubernetes (pod deletion,
node drain) warn a job with a signal (SIGTERM by default) some seconds before
they kill it. :class:`StopWatch` installs handlers for the configured signals
(``train.preempt_signals``, default SIGTERM and SIGUSR1) that only record the
signal: the trainer finishes the optimizer step in flight, writes a checkpoint
(atomically, as every checkpoint), writes ``out_dir/preempted.json`` and the
command exits with :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try
again later"), which a job script uses to requeue; ``--resume`` or
``train.auto_resume: true`` continues the run exactly.

DataLoader workers: PyTorch's worker start-up installs a C handler that exits a
worker on a SIGTERM from anyone but its parent, which the main process then
reports as "DataLoader worker is killed by signal". SLURM signals every process
of a job step, so the trainer's loaders start their workers with
:func:`worker_ignores` (the handled signals ignored there; the main process
still stops its workers as usual).

The handler does nothing but set a flag, and the signals are blocked while a
checkpoint is written (they stay pending until the files are complete), so a
second signal (or a third) arriving during the save changes nothing: the
checkpoint is finished and the process exits as after the first. Once a run
has stopped for a signal, the signals are ignored until the process exits.

Start-up (reading the data, building the model, loading a checkpoint) comes
before the training loop and its :class:`StopWatch`: :class:`StartupGuard`
covers it. A handled signal then stops start-up at once (there is nothing to
save yet), the marker is written with ``"step": null`` and the command exits
with 75 as after a checkpoint; a signal between the end of start-up and the
loop is recorded and handed to the loop's :class:`StopWatch`, which stops after
the first step.

Under DDP each rank checks the flag after every step with one all-reduce of a
few numbers (the stop flag, the "checkpoint is due" flag of
``train.ckpt_every_minutes`` decided by rank 0's clock, and the trainer's
unusable clips per kind): one rank receiving the signal is enough, and all
ranks stop after the same step. Measured: about 1 ms per step with gloo on a
loaded 2-core CPU machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from mmt_fast.run import distributed as D
from mmt_fast.run.signals import parse_signal

log = logging.getLogger("mmt_fast.train")

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL: a temporary failure, the job may be retried
MARKER = "preempted.json"


class StopWatch:
    """Signal flags and the time-based checkpoint clock of one training run.

    Use as a context manager around the loop: the handlers are installed on
    entry and the previous ones restored on exit (unless the run stopped for a
    signal: see the module docstring). :meth:`poll` (called by every rank after
    every step, a collective under DDP) returns ``(stop, save_due, counts)``
    agreed by all ranks.
    """

    def __init__(self, signals=(), ckpt_every_minutes: float | None = None) -> None:
        self.signals = [parse_signal(s) for s in signals]
        self.interval_s = None if ckpt_every_minutes is None else 60.0 * ckpt_every_minutes
        self.received: list[str] = []  # names, in order of arrival (set by the handler)
        self.stop_reason: str | None = None  # what all ranks agreed on (set by poll)
        self._previous: dict[signal.Signals, object] = {}
        self._last_save = time.monotonic()

    # ------------------------------------------------------------ handlers
    def _handler(self, signum, frame) -> None:  # only records: safe at any point, repeatable
        self.received.append(signal.Signals(signum).name)

    def __enter__(self) -> StopWatch:
        if self.signals and threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return self
        self.received.extend(_PENDING)  # arrived after start-up, before this loop
        _PENDING.clear()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if not self.received and self.stop_reason is None:
            self.restore()
            return
        # the process is about to exit with PREEMPTED_EXIT_CODE: from now on the signals
        # are ignored, so that more of them on the way out (the cluster repeating itself,
        # torchrun terminating the ranks still writing their summary after another rank
        # has exited) cannot turn a clean stop into a kill. (Python resets its own handlers to the
        # default action when the interpreter shuts down, but not SIG_IGN.) restore()
        # undoes this.
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """Put the signal handlers back as they were before :meth:`__enter__`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self):
        """Hold the handled signals back while a checkpoint is written: a signal
        arriving meanwhile stays pending and is delivered when the save is done, so
        no write is interrupted (EINTR) half-way."""
        sigs = set(self._previous)
        if not sigs:
            yield
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # ------------------------------------------------------------ polling
    def saved(self) -> None:
        """Restart the time-based interval (a checkpoint was just written)."""
        self._last_save = time.monotonic()

    def poll(
        self, device: torch.device, counts: list[float] = ()
    ) -> tuple[bool, bool, list[float]]:
        """(stop, save_due, counts summed over ranks), the same on every rank. ``counts``
        ride along in the same all-reduce (the trainer's bad clips per kind)."""
        stop = float(bool(self.received))
        due = 0.0
        if self.interval_s is not None and D.rank() == 0:
            due = float(time.monotonic() - self._last_save >= self.interval_s)
        counts = [float(c) for c in counts]
        if D.is_dist():
            t = torch.tensor([stop, due, *counts], dtype=torch.float64, device=device)
            stop, due, *counts = (float(v) for v in D.all_reduce_sum(t).cpu().tolist())
        if stop and self.stop_reason is None:
            mine = self.received[0] if self.received else None
            who = D.all_gather_object(mine)
            self.stop_reason = next(
                f"{s} (received by rank {r})" for r, s in enumerate(who) if s is not None
            )
        return stop > 0, due > 0, counts


_PENDING: list[str] = []  # signals recorded by a StartupGuard after start-up


class StartupPreempted(BaseException):
    """Raised by :class:`StartupGuard`'s handler in the main thread (a BaseException, so
    that no ``except Exception`` on the way swallows it); ``args[0]`` is the signal name."""


class StartupGuard:
    """Preemption signals before the training loop: ``with guard:`` around start-up makes
    a handled signal raise :class:`StartupPreempted` at once; on leaving, the handlers
    only record (for the loop's :class:`StopWatch`) until :meth:`restore`."""

    def __init__(self, signals=()) -> None:
        self.signals = [parse_signal(s) for s in signals]
        self._previous: dict[signal.Signals, object] = {}

    def _raise(self, signum, frame) -> None:
        raise StartupPreempted(signal.Signals(signum).name)

    @staticmethod
    def _record(signum, frame) -> None:
        _PENDING.append(signal.Signals(signum).name)

    def __enter__(self) -> StartupGuard:
        _PENDING.clear()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._raise)
        return self

    def __exit__(self, *exc) -> None:
        for sig in self._previous:
            signal.signal(sig, self._record if exc[0] is None else signal.SIG_IGN)

    def restore(self) -> None:
        """Put the signal handlers back as they were before :meth:`__enter__`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
        _PENDING.clear()


def write_marker(out_dir: Path, info: dict) -> Path:
    """``out_dir/preempted.json``: why and where the run stopped (read by job scripts)."""
    from mmt_fast.run.checkpoint import write_json_atomic

    p = Path(out_dir) / MARKER
    write_json_atomic(p, {**info, "exit_code": PREEMPTED_EXIT_CODE, "pid": os.getpid()})
    return p


def preempted_at_startup(out_dir: str | Path, sig: str, rank: int) -> dict:
    """The summary of a run stopped by ``sig`` before its first step (nothing to save);
    rank 0 writes the marker so that a job script requeues it."""
    reason = f"{sig} (received by rank {rank} during start-up)"
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_marker(Path(out_dir), {"signal": reason, "step": None, "checkpoint": None})
        print(
            f"[mmt-fast] preempted by {reason}: stopped before the first step, nothing to "
            "save; start it again (exit code 75)",
            file=sys.stderr,
            flush=True,
        )
    return {"preempted": reason, "interrupted": True, "step": None}


def clear_marker(out_dir: Path) -> None:
    (Path(out_dir) / MARKER).unlink(missing_ok=True)


def _ignore(signals: tuple[int, ...], worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def worker_ignores(names) -> functools.partial | None:
    """A DataLoader ``worker_init_fn`` ignoring the signals ``names`` (None for none)."""
    sigs = tuple(int(parse_signal(n)) for n in names)
    return functools.partial(_ignore, sigs) if sigs else None
