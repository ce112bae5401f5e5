"""Errors a user can act on, grouped by who must fix them; the CLI maps each group to an exit code.

| class | exit code | meaning |
|---|---|---|
| :class:`ConfigError` | 2 | a config value, an override, a path in the config, or the run folder |
| :class:`DataError` | 3 | the data: an empty or unusable split, a manifest that cannot be read |
| :class:`TrainingError` | 4 | the run itself: non-finite loss or gradients, no valid batch, damaged checkpoints |

Any other exception reaching the CLI is a runtime failure (exit code 4, or 1
for an internal error: see :mod:`mmt_fast.cli`). ``ConfigError`` and
``DataError`` are ``ValueError`` s and ``TrainingError`` a ``RuntimeError``, so
code that catches the builtin types keeps working.
"""

from __future__ import annotations


class MMTError(Exception):
    """Base of the errors that end a command with a one-line message."""

    exit_code = 1
    kind = "error"


class ConfigError(MMTError, ValueError):
    """A config value, override, configured path or run folder is unusable."""

    exit_code = 2
    kind = "config"


class DataError(MMTError, ValueError):
    """The data cannot be used: an empty split, too many unusable clips, a bad manifest."""

    exit_code = 3
    kind = "data"


class TrainingError(MMTError, RuntimeError):
    """The run cannot continue: non-finite values, no valid batch, no loadable checkpoint."""

    exit_code = 4
    kind = "runtime"


class CheckpointError(TrainingError):
    """A checkpoint folder is incomplete or damaged (the message names the file)."""
