"""The block cache: reads, read-ahead, and where each block lives as readers are served.

The concurrency protocol is written down in docs/design.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Hashable
from dataclasses import dataclass, field

import trio

from fusecache.blockio import Block, BlockPool, new_pool
from fusecache.cache.budget import MemoryBudget
from fusecache.cache.disk import DiskTier
from fusecache.cache.flights import CachedFile, Flight, Flights
from fusecache.cache.memory import MemoryTier
from fusecache.cache.spill import SpillQueue
from fusecache.config import CacheConfig, SourceConfig, memory_shares
from fusecache.errors import LowerError
from fusecache.lru import BlockKey
from fusecache.source_api import Source
from fusecache.threads import ThreadPolicy

log = logging.getLogger(__name__)

# A piece of a block: (block index, offset in the block, bytes).
Piece = tuple[int, int, Block]
# Hands pieces to the kernel's page cache in one call; returns those that went in
# (fs/pagecache.py).
Feed = Callable[[list[Piece]], Awaitable[list[Piece]]]


@dataclass(frozen=True)
class CacheStatistics:
    """Counters of the kernel-miss path; bytes are what readers were served."""

    served_memory: int
    served_disk: int
    served_lower: int
    lower_reads: int
    lower_bytes: int
    lower_errors: int
    readahead_bytes: int  # fetched from below ahead of readers (read-ahead, whole-file fills)
    readahead_used_bytes: int  # of those, what a reader or the page cache took
    evictions: int
    memory_used: int
    memory_capacity: int
    memory_mapped: int  # block memory the process holds, cached or not (C pool only)
    memory_spilling: int  # blocks waiting for a disk writer
    memory_limit: int  # what all block memory stays within (cache/budget.py)
    disk_writes_dropped: int
    handed_to_kernel: int  # blocks memory let go to disk once the kernel held all their pages
    fetches_in_flight: int  # blocks on their way from below or from disk, now


@dataclass
class _Fills:
    """The whole-file fills of one file version running now, and the blocks memory handed
    on to disk meanwhile because the kernel held them whole (see BlockCache.prefetch)."""

    running: int = 0
    handed: set[int] = field(default_factory=set)


class BlockCache:
    """Blocks of lower files, fetched once however many readers want them.

    A block lives in exactly one of: memory (`MemoryTier`), the spill queue on
    its way to disk (`SpillQueue`), a flight on its way here (`Flights`), the disk
    tier, or nowhere. This class moves blocks between them as readers are served.
    """

    def __init__(
        self, config: CacheConfig, source: Source, nursery: trio.Nursery,
        disk: DiskTier | None = None, pool: BlockPool | None = None,
        threads: ThreadPolicy | None = None, budget: MemoryBudget | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.fetch_blocks = config.fetch_blocks
        self.budget = budget or MemoryBudget(memory_shares(config, SourceConfig()))
        self._pool = pool or new_pool(config.block_size)
        self._spill = (SpillQueue(disk, self.budget, self._pool.page_aligned)
                       if disk is not None else None)
        self._memory = MemoryTier(config.lru_bytes, config.passing_bytes, self._evicted)
        self._disk = disk
        self._nursery = nursery
        threads = threads or ThreadPolicy()
        self._flights = Flights(config.block_size, source, self._pool, self._memory,
                                self._spill, disk, nursery, threads.disk_read)
        self._served_memory = 0
        self._served_lower = 0
        self._served_disk = 0
        self._walks: dict[Hashable, int] = {}  # file key -> the block a walk waits for
        self._handed_to_kernel = 0
        # By file version, while whole-file fills of it run (see prefetch).
        self._fills: dict[Hashable, _Fills] = {}

    def statistics(self) -> CacheStatistics:
        flights = self._flights
        return CacheStatistics(
            served_memory=self._served_memory,
            served_disk=self._served_disk,
            served_lower=self._served_lower,
            lower_reads=flights.lower_reads,
            lower_bytes=flights.lower_bytes,
            lower_errors=flights.lower_errors,
            readahead_bytes=flights.readahead_bytes,
            readahead_used_bytes=flights.readahead_used,
            evictions=self._memory.evictions,
            memory_used=self._memory.used,
            memory_capacity=self._memory.budget,
            memory_mapped=self._pool.statistics()["mapped_bytes"],
            memory_spilling=self.budget.spilling,
            memory_limit=self.budget.limit,
            disk_writes_dropped=self._spill.dropped if self._spill else 0,
            handed_to_kernel=self._handed_to_kernel,
            fetches_in_flight=len(flights),
        )

    @property
    def capacity(self) -> int:
        return self._memory.capacity

    @property
    def disk(self) -> DiskTier | None:
        return self._disk

    def _in_memory(self, key: BlockKey) -> bool:
        """In the memory tier, or waiting there for a disk writer."""
        return key in self._memory or (self._spill is not None and key in self._spill)

    def holds(self, f: CachedFile, idx: int) -> bool:
        """Whether block *idx* of *f* is here: in memory, on its way to disk, or on disk."""
        return (self._in_memory((f.key, idx))
                or (self._disk is not None and self._disk.contains(f.key, idx)))

    def holds_all(self, f: CachedFile) -> bool:
        """Whether every block of *f* is here (see `holds`); stops at the first that is not."""
        rest = (idx for idx in range(self.block_count(f)) if not self._in_memory((f.key, idx)))
        if self._disk is None:
            return next(rest, None) is None
        return self._disk.contains_all(f.key, rest)

    def forget_file(self, key: Hashable) -> None:
        """Drop a file's cached blocks (its content changed)."""
        self._memory.discard_file(key)
        self._flights.forget_file(key)
        if self._spill is not None:
            self._spill.forget_file(key)
        if self._disk is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self._disk.discard_file, key)

    # --- reads -----------------------------------------------------------

    async def read(self, f: CachedFile, offset: int, size: int, kept: bool = True,
                   pages_only: bool = False) -> Block:
        """Bytes [offset, offset+size) of *f*, short at EOF; zero-copy within one block.

        The bytes returned count as served, by the tier each block came from.
        *kept* says the reader keeps what it is served (the kernel page cache
        does, unless the file was opened with O_DIRECT): see _served.
        *pages_only*: a random read within one block that is nowhere here reads
        just its pages from below, and caches nothing: a 4 KiB read would
        otherwise move the whole 1 MiB block, and wait for it.
        """
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if (pages_only and first == last and not self.holds(f, first)
                and self._flights.get((f.key, first)) is None):
            data = await self._flights.read_pages(f, offset, end)
            self._served_lower += len(data)
            return data
        spans = [(idx, max(offset - idx * bs, 0), min(end - idx * bs, bs))
                 for idx in range(first, last + 1)]
        parts = []
        for idx, lo, hi in spans:
            block = await self.block(f, idx, hi - lo)
            parts.append(memoryview(block)[lo:hi])
        if kept:
            for idx, lo, hi in spans:
                self._served((f.key, idx), lo, hi, self.block_length(f, idx))
        return parts[0] if len(parts) == 1 else self._pool.join(parts)

    def _served(self, key: BlockKey, lo: int, hi: int, length: int) -> None:
        """Note that the kernel now holds bytes [lo, hi) of a block of *length* bytes.

        Once it holds every page of a block, memory lets the block go to the disk
        tier (exclusive caching): the page cache answers the next read of it, and
        a copy in our memory would take memory the page cache needs to keep it.
        Without a disk tier, memory is the only copy below the kernel's and stays.
        A block a walk (the sha256 pass) has yet to reach stays until it has.
        """
        if self._memory.serve(key, lo, hi, length) and not self._walk_needs(key):
            self._to_disk(key)

    def _walk_needs(self, key: BlockKey) -> bool:
        """Whether a walk over the block's file has yet to reach it."""
        return key[0] in self._walks and key[1] >= self._walks[key[0]]

    def _to_disk(self, key: BlockKey) -> None:
        """Move a block the kernel holds whole from memory to the disk tier, if there is one."""
        if self._disk is None or self._spill is None:
            return  # memory is the only copy below the kernel's, and stays
        if self._disk.contains(*key):
            self._memory.discard(key)
        elif self._spill.has_room:
            block = self._memory.discard(key)
            if block is None:
                return
            self._spill.offer(key, block)
        else:
            return  # the writers are behind, or the disk is full: it stays until evicted
        self._handed_to_kernel += 1
        fills = self._fills.get(key[0])
        if fills is not None:
            fills.handed.add(key[1])

    def _evicted(self, key: BlockKey, block: Block) -> None:
        """A block leaves memory (evicted, or kept out by the scan rule): to the disk tier."""
        self._flights.unused(key)
        if self._spill is not None:
            self._spill.offer(key, block)

    async def block(self, f: CachedFile, idx: int, served: int) -> Block:
        """Block *idx* of *f*; *served* bytes of it count for the tier it came from."""
        key = (f.key, idx)
        block = self._memory.get(key)
        if block is None and self._spill is not None:
            block = self._spill.get(key)
        if block is not None:
            self._served_memory += served
            self._flights.used(key)
            return block
        flight = self._flights.get(key)
        if flight is None:
            self._flights.start(f, idx, 1)  # only what the reader waits for
            flight = self._flights.get(key)
            assert flight is not None
        await flight.done.wait()
        if flight.error is not None:
            raise LowerError(flight.error)
        assert flight.data is not None
        self._flights.used(key)
        if flight.from_disk:
            self._served_disk += served
        else:
            self._served_lower += served
        return flight.data

    def block_count(self, f: CachedFile) -> int:
        return -(-f.size // self.block_size)

    def block_length(self, f: CachedFile, idx: int) -> int:
        """Bytes in block *idx* of *f*: a whole block but the file's last."""
        return min(self.block_size, f.size - idx * self.block_size)

    def prefetch(self, f: CachedFile, start: int, end: int, from_disk: bool = True,
                 kernel_keeps: bool = False) -> None:
        """Start fetching the blocks of bytes [start, end) that are neither cached nor coming.

        Without *from_disk*, blocks on disk are left there. *kernel_keeps*: the
        reader looks in the page cache, so the blocks a fill running now saw go to
        disk because the kernel held them whole are left there too: read back,
        they would only come to memory as copies (a mapped loader's read-ahead
        read 120 of a cold 512 MiB model's 512 blocks back from disk this way).
        """
        bs = self.block_size
        idx, last = start // bs, (min(end, f.size) - 1) // bs
        fills = self._fills.get(f.key) if kernel_keeps else None
        handed: Collection[int] = fills.handed if fills is not None else ()
        while idx <= last:
            if idx in handed:
                idx += 1
                continue
            started = self._flights.start(f, idx, min(self.fetch_blocks, last - idx + 1),
                                          readahead=True, from_disk=from_disk)
            idx += max(started, 1)

    def fill_started(self, key: Hashable) -> None:
        """A whole-file fill of file version *key* begins (see prefetch)."""
        self._fills.setdefault(key, _Fills()).running += 1

    def fill_ended(self, key: Hashable) -> None:
        fills = self._fills[key]
        fills.running -= 1
        if not fills.running:
            del self._fills[key]

    # --- what the daemon's own passes (cache/passes.py) ask ------------------

    @property
    def fetching(self) -> int:
        """Blocks on their way from below or from disk, now."""
        return len(self._flights)

    async def wait_fetched(self) -> None:
        """Return once no block is on its way."""
        while (flight := self._flights.any()) is not None:
            await flight.done.wait()

    def flight(self, key: BlockKey) -> Flight | None:
        """The fetch bringing a block, if one is under way."""
        return self._flights.get(key)

    def fetch_from_below(self, f: CachedFile, idx: int) -> tuple[int, Flight | None]:
        """Start fetching up to a fetch's worth of blocks from *idx* from below.

        Returns how many it started and the flight of block *idx*; (0, None) when
        that block is held, on its way, or on disk.
        """
        started = self._flights.start(f, idx, self.fetch_blocks, readahead=True,
                                      from_disk=False)
        return started, self._flights.get((f.key, idx)) if started else None

    def on_disk_only(self, key: BlockKey) -> bool:
        """Whether a block is on disk and neither in memory nor on its way there."""
        return (self._disk is not None and not self._flights.held(key)
                and self._disk.contains(*key))

    def walk_at(self, file_key: Hashable, idx: int) -> None:
        """A walk over the file waits for block *idx*: keep it and those after in memory."""
        self._walks[file_key] = idx

    def walk_ended(self, file_key: Hashable) -> None:
        self._walks.pop(file_key, None)

    def walked_past(self, key: BlockKey, length: int, disk_only: bool) -> None:
        """A walk is done with a block: let it go where a reader's block would have gone.

        One that was on disk alone when the walk reached it (it left memory before
        the walk began) is not cached again; one the kernel holds whole goes to disk.
        """
        if disk_only and self._disk is not None and self._disk.contains(*key):
            self._memory.discard(key)
        elif key in self._memory and self._memory.kernel_holds(key, length):
            self._to_disk(key)

    async def feed(self, f: CachedFile, first: int, count: int, feed: Feed) -> None:
        """Hand blocks [first, first+count) of *f* to the kernel's page cache through *feed*.

        In one call, and of each block in memory only the pages the kernel lacks:
        a reader's requests need not line up with blocks, so a block is often half
        read when its fetch lands, and a store of the rest copies no page twice.
        What the kernel took counts as served to it (see _served).
        """
        pieces: list[Piece] = []
        for idx in range(first, first + count):
            key = (f.key, idx)
            block = self._memory.get(key)
            if block is None:
                continue  # gone already (evicted, handed on)
            pieces += [(idx, lo, memoryview(block)[lo:hi])
                       for lo, hi in self._memory.kernel_lacks(key, len(block))]
        if not pieces:
            return
        for idx, lo, data in await feed(pieces):
            key = (f.key, idx)
            self._flights.used(key)
            self._served(key, lo, lo + len(data), self.block_length(f, idx))

    # --- the disk tier -----------------------------------------------------

    async def wait_spilled(self) -> None:
        """Return once every block that left memory is written (or failed to be)."""
        if self._spill is not None:
            await self._spill.wait_spilled()

    async def flush_to_disk(self) -> None:
        """Write every block held in memory but not on disk, most recently used first.

        For a clean unmount, so the next mount starts warm; the caller bounds the time.
        """
        if self._spill is not None:
            await self._spill.flush(self._memory.items_recent_first())
