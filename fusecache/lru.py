"""A byte-bounded LRU of file blocks that resists sequential scans."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sized
from typing import Generic, TypeVar

V = TypeVar("V", bound=Sized)

BlockKey = tuple[Hashable, int]  # (file identity key, block index)


class ScanResistantLRU(Generic[V]):
    """LRU by bytes, with one exception that keeps a file's head through a scan.

    Plain LRU fails the commonest model access: a file larger than the cache read
    twice in order (hash, then load). The first pass evicts the file's head just
    before the second pass needs it, and the second pass hits nothing. So when the
    block that would be evicted belongs to the same file as the incoming block and
    lies before it, the incoming block is not admitted instead: the cache keeps the
    part of the file the next pass reads first. cachetools' LRUCache does not let us
    look at the eviction victim before evicting, which is why this is our own.
    """

    def __init__(
        self, capacity: int, on_evict: Callable[[BlockKey, V], None] | None = None
    ) -> None:
        self.capacity = capacity
        self._on_evict = on_evict
        self.used = 0
        self.evictions = 0
        self._data: OrderedDict[BlockKey, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: BlockKey) -> V | None:
        """The block, marked as most recently used, or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def peek(self, key: BlockKey) -> V | None:
        """The block, or None; its place in the LRU order does not change."""
        return self._data.get(key)

    def put(self, key: BlockKey, value: V) -> bool:
        """Admit a block; return False if the scan rule or its size kept it out."""
        size = len(value)
        if size > self.capacity:
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.used -= len(old)
        while self.used + size > self.capacity:
            victim_key = next(iter(self._data))
            if victim_key[0] == key[0] and victim_key[1] < key[1]:
                return False
            victim = self._data.pop(victim_key)
            self.used -= len(victim)
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(victim_key, victim)
        self._data[key] = value
        self.used += size
        return True

    def discard(self, key: BlockKey) -> V | None:
        """Drop one block; return it, or None if it was not there."""
        value = self._data.pop(key, None)
        if value is not None:
            self.used -= len(value)
        return value

    def discard_file(self, file_key: Hashable) -> list[BlockKey]:
        """Drop every block of one file; return their keys."""
        doomed = [k for k in self._data if k[0] == file_key]
        for k in doomed:
            self.discard(k)
        return doomed
