"""The memory tier: blocks in a scan-resistant LRU, and which of their pages the kernel holds."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from fusecache.blockio import Block
from fusecache.lru import BlockKey, ScanResistantLRU

# The kernel's page size: it caches, and asks for, whole pages.
PAGE = 4096


class MemoryTier:
    """Blocks in memory, bounded by bytes, and a per-block mask of pages served to the kernel.

    *lru* bytes of the LRU, and *passing* bytes for blocks the scan rule turns
    away (a file bigger than the cache) until their reader comes (see
    CacheConfig.passing_bytes). *on_evict(key, block)* is called for every block
    that leaves other than by `discard`.
    """

    def __init__(self, lru: int, passing: int,
                 on_evict: Callable[[BlockKey, Block], None]) -> None:
        self._on_evict = on_evict
        self._lru: ScanResistantLRU[Block] = ScanResistantLRU(lru, self._evicted,
                                                              passing=passing)
        # Per block in memory: a bit mask of the pages a reader that keeps them (the
        # kernel page cache) has been served. See `serve`.
        self._kernel_pages: dict[BlockKey, int] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def get(self, key: BlockKey) -> Block | None:
        return self._lru.get(key)

    def put(self, key: BlockKey, block: Block) -> bool:
        return self._lru.put(key, block)

    def discard(self, key: BlockKey) -> Block | None:
        """Take a block out without calling on_evict; None if it was not here."""
        self._kernel_pages.pop(key, None)
        return self._lru.discard(key)

    def discard_file(self, file_key: Hashable) -> None:
        for gone in self._lru.discard_file(file_key):
            self._kernel_pages.pop(gone, None)

    def items_recent_first(self) -> list[tuple[BlockKey, Block]]:
        return self._lru.items_recent_first()

    def _evicted(self, key: BlockKey, block: Block) -> None:
        self._kernel_pages.pop(key, None)
        self._on_evict(key, block)

    def serve(self, key: BlockKey, lo: int, hi: int, length: int) -> bool:
        """Note that the kernel now holds bytes [lo, hi) of a block of *length* bytes.

        Returns whether it now holds every page of the block. Whole pages only: a
        reply that covers part of a page marks nothing of it.
        """
        if key not in self._lru:
            return False
        first = -(-lo // PAGE)  # pages wholly inside [lo, hi); the block's last may be short
        stop = (hi if hi < length else length + PAGE - 1) // PAGE
        if stop <= first:
            return False
        self._kernel_pages[key] = self._kernel_pages.get(key, 0) | (
            ((1 << (stop - first)) - 1) << first)
        return self.kernel_holds(key, length)

    def kernel_lacks(self, key: BlockKey, length: int) -> list[tuple[int, int]]:
        """The byte ranges [lo, hi) of a block of *length* bytes whose pages the kernel lacks."""
        mask = self._kernel_pages.get(key, 0)
        pages = -(-length // PAGE)
        runs: list[tuple[int, int]] = []
        page = 0
        while page < pages:
            if mask >> page & 1:
                page += 1
                continue
            start = page
            while page < pages and not mask >> page & 1:
                page += 1
            runs.append((start * PAGE, min(page * PAGE, length)))
        return runs

    def kernel_holds(self, key: BlockKey, length: int) -> bool:
        """Whether the kernel was handed every page of a block of *length* bytes."""
        return self._kernel_pages.get(key) == (1 << -(-length // PAGE)) - 1

    @property
    def used(self) -> int:
        return self._lru.used + self._lru.passing_used

    @property
    def budget(self) -> int:
        return self._lru.capacity + self._lru.passing_capacity

    @property
    def capacity(self) -> int:
        """What the LRU holds, without passing: what a file must fit in to stay whole."""
        return self._lru.capacity

    @property
    def evictions(self) -> int:
        return self._lru.evictions
