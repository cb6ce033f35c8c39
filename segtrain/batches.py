"""How batches are drawn and checked: sampling that makes the data order a function of
(seed, epoch), so runs resume exactly, and the check of every batch's mask values."""
from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

from torch.utils.data import DistributedSampler, default_collate

from segtrain.errors import MaskValueError
from segtrain.losses.target import bad_target_values, target_value_message


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


class MaskCheck:
    """The loaders' ``collate_fn``: stacks the samples, then checks the batch's mask values on
    the CPU, before the transfer to the device (in the DataLoader's worker processes when
    ``dataset.num_workers > 0``).

    Values must be classes of the model (``[0, C)``, 0/1 for a one-channel binary model) or
    ``dataset.ignore_index``. Checking here, once per batch for every dataset, turns a bad mask
    into an error that names the values and the config keys, without the losses reading values
    back from the device in each training step (a CPU-GPU sync between forward and backward).
    """

    def __init__(self, dataset: str, split: str, channels: int, ignore_index: int | None) -> None:
        self.where = f"dataset={dataset} ({split} split)"
        self.channels, self.ignore_index = channels, ignore_index

    def __call__(self, samples: Sequence[Any]) -> Any:
        batch = default_collate(samples)
        bad = bad_target_values(batch[1], self.channels, self.ignore_index)
        if bad:
            raise MaskValueError(target_value_message(self.where, bad, self.channels, self.ignore_index))
        return batch
