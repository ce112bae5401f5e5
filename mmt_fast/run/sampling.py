"""Resumable, reproducible sampling.

- :class:`ResumableSampler`: ``DistributedSampler``'s partition (a permutation
  seeded by ``(seed, epoch)``, padded to a multiple of the world size, rank ``r``
  takes positions ``r, r + W, ...``) that can start part-way through an epoch:
  ``set_epoch(e, skip=n)`` drops this rank's first ``n`` indices, so a resumed
  run sees exactly the batches the interrupted run had not yet seen.
- :class:`SeededDataset`: runs the wrapped ``__getitem__`` under RNGs (torch,
  numpy, python) seeded from ``(seed, epoch, index)``. Augmentation therefore
  depends only on the clip and the epoch: not on the worker count, the worker
  that loads it, nor where a run was resumed. The caller's RNG state is restored
  afterwards, so loading with ``num_workers=0`` does not disturb training RNGs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from mmt_fast.data.seeding import derive_seed, run_seeded


class ResumableSampler(Sampler[int]):
    """Indices of one rank for one epoch (see module docstring).

    Args:
        length: dataset size.
        num_replicas, rank: the process group's size and this process's rank.
        shuffle: permute per epoch (training) or keep order (evaluation).
        seed: base seed of the permutation.
        pad: repeat indices so every rank gets the same count (training); with
            ``pad=False`` ranks may differ by one (evaluation, no duplicates).
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation and drop this rank's first ``skip`` indices."""
        self.epoch, self.skip = epoch, skip

    def epoch_indices(self) -> list[int]:
        """This rank's full list for the current epoch (before ``skip``)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.pad and self.length % self.num_replicas:
            extra = self.num_replicas - self.length % self.num_replicas
            order += (order * (extra // max(len(order), 1) + 1))[:extra]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.skip :])

    def __len__(self) -> int:
        return max(len(self.epoch_indices()) - self.skip, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "skip": self.skip, "seed": self.seed}


class CachedDataset(Dataset):
    """Keeps each item of ``dataset`` after its first load (the dataset must be
    deterministic, e.g. test-mode transforms); bad items are cached too."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._items: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededDataset(Dataset):
    """``dataset[i]`` under RNGs seeded by ``(seed, epoch, i)``; ``epoch`` is set by the trainer."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return run_seeded(
            derive_seed(self.seed, self.epoch, index), self.dataset.__getitem__, index
        )

    def __getattr__(self, name: str):
        # dataset attributes (records, class_index, skip_counts...) pass through
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
