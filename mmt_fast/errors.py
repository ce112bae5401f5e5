"""The project's one error hierarchy: errors a user can act on, grouped by who must fix them.

Every command's failures reach :func:`mmt_fast.cli.main`, which maps them by
class (never by name) to one line on stderr and an exit code:

| class | exit code | meaning |
|---|---|---|
| :class:`ConfigError` | 2 | a config value, an override, a command-line argument, a path, the run folder |
| :class:`DataError` | 3 | the data: an empty or unusable split, a manifest that cannot be read |
| :class:`~mmt_fast.data.errors.BadClipError` | 3 | one clip (a ``DataError``; raised under ``data.on_error: raise``) |
| :class:`TrainingError` | 4 | the run itself: non-finite loss or gradients, no valid batch |
| :class:`CheckpointError` | 4 | a checkpoint that cannot be read or does not fit the model |
| :class:`StorageError` | 5 | an output that cannot be written: no space, read-only, no permission, a file where a folder should be |

Any other exception reaching the CLI is a runtime failure (exit code 4, the
message prefixed with the exception's type); an interrupt exits with 130.
``ConfigError`` and ``DataError`` are ``ValueError`` s, ``TrainingError`` a
``RuntimeError`` and ``CheckpointError`` both (the converters in
:mod:`mmt_fast.pretrained` raised a ``ValueError`` before), so code that
catches the builtin types keeps working.

A command that reads a checkpoint the user named (``mmt-fast convert
--checkpoint``) reports an unusable file as the argument's problem: it raises
a ``ConfigError`` from the ``CheckpointError``.
"""

from __future__ import annotations


class MMTError(Exception):
    """Base of the errors that end a command with a one-line message.

    ``exit_code`` and ``category`` (the word in ``mmt-fast: <category> error: ...``) are
    class attributes, read by the CLI. (:class:`~mmt_fast.data.errors.BadClipError` has an
    instance attribute ``kind``, the bad-clip kind: a different thing.)
    """

    exit_code = 1
    category = "error"


class ConfigError(MMTError, ValueError):
    """A config value, override, argument, configured path or run folder is unusable."""

    exit_code = 2
    category = "config"


class DataError(MMTError, ValueError):
    """The data cannot be used: an empty split, too many unusable clips, a bad manifest."""

    exit_code = 3
    category = "data"


class TrainingError(MMTError, RuntimeError):
    """The run cannot continue: non-finite values, no valid batch, no loadable checkpoint."""

    exit_code = 4
    category = "runtime"


class CheckpointError(TrainingError, ValueError):
    """A checkpoint cannot be read, is incomplete or damaged, or does not fit the model
    (the message names the file)."""


class StorageError(MMTError):
    """An output cannot be written (no space left, a read-only filesystem, no permission, a
    file where a folder should be); the message names the path. Not the data's fault: a
    command stops at once rather than count the clips it could not write as bad."""

    exit_code = 5
    category = "I/O"


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MMTError",
    "StorageError",
    "TrainingError",
]
