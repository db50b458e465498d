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

    A block kept out that way is still on its way to a reader (read-ahead fetched
    it), so it waits in a small FIFO, *passing*, until newer ones push it out;
    without it, read-ahead past the cache's size would be fetched twice.

    *on_evict(key, value)* is called for every block that leaves: evicted from
    the LRU, pushed out of passing, or kept out with no room in passing. Not for
    blocks dropped by `discard` or `discard_file`, whose content is no longer wanted.
    """

    def __init__(
        self, capacity: int, on_evict: Callable[[BlockKey, V], None] | None = None,
        passing: int = 0,
    ) -> None:
        self.capacity = capacity
        self._on_evict = on_evict
        self.used = 0
        self.evictions = 0
        self._data: OrderedDict[BlockKey, V] = OrderedDict()
        self.passing_capacity = passing
        self.passing_used = 0
        self._passing: OrderedDict[BlockKey, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data or key in self._passing

    def get(self, key: BlockKey) -> V | None:
        """The block, marked as most recently used, or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
            return value
        return self._passing.get(key)

    def put(self, key: BlockKey, value: V) -> bool:
        """Admit a block; return False if the scan rule or its size kept it out.

        A block the scan rule keeps out still goes to *passing* if that has room,
        but counts as kept out: it may leave at any moment.
        """
        size = len(value)
        if size > self.capacity:
            self._left(key, value)
            return False
        self.discard(key)
        while self.used + size > self.capacity:
            victim_key = next(iter(self._data))
            if victim_key[0] == key[0] and victim_key[1] < key[1]:
                self._pass(key, value)
                return False
            victim = self._data.pop(victim_key)
            self.used -= len(victim)
            self.evictions += 1
            self._left(victim_key, victim)
        self._data[key] = value
        self.used += size
        return True

    def _pass(self, key: BlockKey, value: V) -> None:
        size = len(value)
        if size > self.passing_capacity:
            self._left(key, value)
            return
        self.discard(key)
        while self.passing_used + size > self.passing_capacity:
            old_key, old = self._passing.popitem(last=False)
            self.passing_used -= len(old)
            self._left(old_key, old)
        self._passing[key] = value
        self.passing_used += size

    def _left(self, key: BlockKey, value: V) -> None:
        if self._on_evict is not None:
            self._on_evict(key, value)

    def items_recent_first(self) -> list[tuple[BlockKey, V]]:
        """Every block held, the most recently used first, passing blocks last."""
        return [*reversed(self._data.items()), *reversed(self._passing.items())]

    def discard(self, key: BlockKey) -> V | None:
        """Drop one block; return it, or None if it was not there."""
        value = self._data.pop(key, None)
        if value is not None:
            self.used -= len(value)
            return value
        value = self._passing.pop(key, None)
        if value is not None:
            self.passing_used -= len(value)
        return value

    def discard_file(self, file_key: Hashable) -> list[BlockKey]:
        """Drop every block of one file; return their keys."""
        doomed = [k for k in (*self._data, *self._passing) if k[0] == file_key]
        for k in doomed:
            self.discard(k)
        return doomed
