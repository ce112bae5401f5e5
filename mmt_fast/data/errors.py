"""Bad-data errors shared by the manifest readers, the decoders and the dataset.

Every problem with one clip raises :class:`BadClipError`, a
:class:`mmt_fast.errors.DataError`, which names the file and a short
machine-readable ``kind`` (the key of the skip counters):

| kind | cause |
|---|---|
| ``missing_file`` | no file at the resolved path (or a folder there) |
| ``corrupt_file`` | the container cannot be opened or decoded (truncated, damaged, not a video) |
| ``no_video`` | the clip needs video and the file has no video stream (e.g. an audio-only .m4a) |
| ``unsupported_format`` | a container decord cannot decode frame-accurately (MPEG-TS/PS): remux it |
| ``no_audio`` | the clip needs audio and has neither an audio track nor a ``.wav`` beside it |
| ``short_clip`` | fewer frames than the sampling window (only when ``short_clip="error"``) |
| ``bad_segment`` | start/end times outside the file or end <= start |
| ``unknown_label`` | the label is not in the class list |
| ``decode_error`` | any other exception while loading the clip |
"""

from __future__ import annotations

from mmt_fast.errors import DataError

BAD_KINDS = (
    "missing_file",
    "corrupt_file",
    "no_video",
    "unsupported_format",
    "no_audio",
    "short_clip",
    "bad_segment",
    "unknown_label",
    "decode_error",
)


class BadClipError(DataError):
    """One clip cannot be used (a :class:`~mmt_fast.errors.DataError`: exit code 3 at the CLI).

    Attributes:
        path: the clip's file (as given in the record).
        reason: a human-readable sentence saying what is wrong.
        kind: one of :data:`BAD_KINDS`.
    """

    def __init__(self, path: str, reason: str, kind: str = "decode_error") -> None:
        if kind not in BAD_KINDS:
            raise ValueError(f"unknown bad-clip kind {kind!r}; expected one of {BAD_KINDS}")
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason} [{kind}]")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason, self.kind))


class ShardError(DataError):
    """A shard that does not match its index: missing, of another size, damaged, or holding
    another set's samples (the message names the shard file).

    Raised in a DataLoader worker, it reaches the main process re-raised by PyTorch as
    ``ShardError("Caught ShardError in DataLoader worker process 0.\\nOriginal Traceback
    ...")``; the message is then cut back to the original one line.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)
