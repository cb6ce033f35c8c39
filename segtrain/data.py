"""Sampling that makes the data order a function of (seed, epoch), so runs resume exactly."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (order from ``seed + epoch``; one shard per process) that can
    skip the batches of an epoch already trained on, to resume mid-epoch with no batch
    repeated and none skipped.

    Works without ``torch.distributed``: ``num_replicas=1, rank=0`` is a seeded shuffle.
    """

    def __init__(self, dataset: Sized, batch_size: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class SampleCache:
    """Samples kept by index, for datasets whose sample ``i`` never changes (generated, or decoded
    before augmentation). Each DataLoader worker process holds its own copy."""

    def __init__(self, enabled: bool) -> None:
        self.entries: dict[int, Any] | None = {} if enabled else None

    def get(self, index: int, make: Callable[[int], Any]) -> Any:
        if self.entries is None:
            return make(index)
        if index not in self.entries:
            self.entries[index] = make(index)
        return self.entries[index]
