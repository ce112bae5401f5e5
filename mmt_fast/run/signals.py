"""Signal names in a config (``train.preempt_signals``): parsed and checked when the config
is read, so that a bad name is a ConfigError before any run starts. The handlers that act on
the signals are the trainer's (:mod:`mmt_fast.train.preemption`)."""

from __future__ import annotations

import signal

from mmt_fast.errors import ConfigError


def parse_signal(name: str) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"`` or ``"15"`` -> ``signal.SIGTERM`` (ConfigError otherwise)."""
    s = str(name).strip().upper()
    try:
        if s.isdigit():
            return signal.Signals(int(s))
        return signal.Signals[s if s.startswith("SIG") else f"SIG{s}"]
    except (KeyError, ValueError):
        raise ConfigError(
            f"train.preempt_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)"
        ) from None


def check_signals(names) -> None:
    for n in names:
        sig = parse_signal(n)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"train.preempt_signals: {sig.name} cannot be caught")
        if sig == signal.SIGINT:
            raise ConfigError("train.preempt_signals: SIGINT (Ctrl-C) stays an interruption")
