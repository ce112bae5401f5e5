"""Seeds derived from integers, and functions run under seeded RNGs.

The data layer's augmentation (per-clip transforms, shard order, device transforms) and
the trainer's samplers draw from these, so that a clip's randomness depends only on
``(seed, epoch, clip, ...)``: not on the worker that loads it nor where a run resumed.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def run_seeded(seed: int, fn, *args):
    """``fn(*args)`` under torch, numpy and python RNGs seeded with ``seed``; the
    caller's RNG states are restored afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            return fn(*args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
