"""Decoded samples kept in memory by index (``dataset.cache``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
