"""Data pipeline: manifests, decoding, the audio-video dataset, synthetic data."""

from .audio import AUDIOSET_MEAN, AUDIOSET_STD, fbank, window_fbank, window_start
from .dataset import (
    DATA_PRESETS,
    AVClipDataset,
    BadItem,
    DataConfig,
    collate_clips,
    data_config,
)
from .errors import BAD_KINDS, BadClipError
from .manifests import (
    EPIC_NUM_NOUNS,
    EPIC_NUM_VERBS,
    KINETICS_SOUNDS_CLASSES,
    ClassIndex,
    ClipRecord,
    parse_timestamp,
    read_epic_kitchens,
    read_kinetics_sounds,
    read_manifest,
    read_vggsound,
)

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "BAD_KINDS",
    "DATA_PRESETS",
    "EPIC_NUM_NOUNS",
    "EPIC_NUM_VERBS",
    "KINETICS_SOUNDS_CLASSES",
    "AVClipDataset",
    "BadClipError",
    "BadItem",
    "ClassIndex",
    "ClipRecord",
    "DataConfig",
    "collate_clips",
    "data_config",
    "fbank",
    "parse_timestamp",
    "read_epic_kitchens",
    "read_kinetics_sounds",
    "read_manifest",
    "read_vggsound",
    "window_fbank",
    "window_start",
]
