"""What the filesystem asks of the block cache: reads, read-ahead, whole-file fills and walks.

The concurrency protocol is written down in docs/design.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import trio

from fusecache.blockio import Block, BlockPool, new_pool
from fusecache.cache.disk import DiskTier
from fusecache.cache.flights import CachedFile, Flight, Flights
from fusecache.cache.memory import MemoryTier
from fusecache.cache.spill import SpillQueue
from fusecache.cache.underway import Underway
from fusecache.config import CacheConfig
from fusecache.errors import LowerError
from fusecache.lru import BlockKey
from fusecache.source_api import Source
from fusecache.threads import ThreadPolicy

log = logging.getLogger(__name__)

Feed = Callable[[int, Block], Awaitable[bool]]  # (block index, block) -> taken


@dataclass(frozen=True)
class CacheStatistics:
    """Counters of the kernel-miss path; bytes are what readers were served."""

    served_memory: int
    served_disk: int
    served_lower: int
    lower_reads: int
    lower_bytes: int
    lower_errors: int
    evictions: int
    memory_used: int
    memory_capacity: int
    memory_mapped: int  # block memory the process holds, cached or not (C pool only)
    disk_used: int
    disk_capacity: int
    disk_writes_dropped: int
    validation_failures: int
    handed_to_kernel: int  # blocks memory let go to disk once the kernel held all their pages
    fetches_in_flight: int  # blocks on their way from below or from disk, now
    background_jobs: int  # whole-file fetches and hashes under way, now


class BlockCache:
    """Blocks of lower files, fetched once however many readers want them.

    A block lives in exactly one of: memory (`MemoryTier`), the spill queue on
    its way to disk (`SpillQueue`), a flight on its way here (`Flights`), the disk
    tier, or nowhere. This class moves blocks between them as readers are served.
    """

    def __init__(
        self, config: CacheConfig, source: Source, nursery: trio.Nursery,
        disk: DiskTier | None = None, pool: BlockPool | None = None,
        threads: ThreadPolicy | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.fetch_blocks = config.fetch_blocks
        self._spill = SpillQueue(disk, nursery) if disk is not None else None
        self._memory = MemoryTier(config.lru_bytes, config.passing_bytes, self._evicted)
        self._pool = pool or new_pool(config.block_size)
        self._disk = disk
        self._nursery = nursery
        threads = threads or ThreadPolicy()
        self._flights = Flights(config.block_size, source, self._pool, self._memory,
                                self._spill, disk, nursery, threads.disk_read)
        self._served_memory = 0
        self._served_lower = 0
        self._served_disk = 0
        self._walks: dict[Hashable, int] = {}  # file key -> the block a walk waits for
        self._background = Underway()  # walks and fills
        self._handed_to_kernel = 0

    def statistics(self) -> CacheStatistics:
        flights, disk = self._flights, self._disk
        return CacheStatistics(
            served_memory=self._served_memory,
            served_disk=self._served_disk,
            served_lower=self._served_lower,
            lower_reads=flights.lower_reads,
            lower_bytes=flights.lower_bytes,
            lower_errors=flights.lower_errors,
            evictions=self._memory.evictions,
            memory_used=self._memory.used,
            memory_capacity=self._memory.budget,
            memory_mapped=self._pool.statistics()["mapped_bytes"],
            disk_used=disk.used if disk else 0,
            disk_capacity=disk.capacity if disk else 0,
            disk_writes_dropped=self._spill.dropped if self._spill else 0,
            validation_failures=disk.validation_failures if disk else 0,
            handed_to_kernel=self._handed_to_kernel,
            fetches_in_flight=len(flights),
            background_jobs=self._background.count,
        )

    @property
    def capacity(self) -> int:
        return self._memory.capacity

    @property
    def disk(self) -> DiskTier | None:
        return self._disk

    def forget_file(self, key: Hashable) -> None:
        """Drop a file's cached blocks (its content changed)."""
        self._memory.discard_file(key)
        if self._spill is not None:
            self._spill.forget_file(key)
        if self._disk is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self._disk.discard_file, key)

    # --- reads -----------------------------------------------------------

    async def read(self, f: CachedFile, offset: int, size: int, kept: bool = True) -> Block:
        """Bytes [offset, offset+size) of *f*, short at EOF; zero-copy within one block.

        The bytes returned count as served, by the tier each block came from.
        *kept* says the reader keeps what it is served (the kernel page cache
        does, unless the file was opened with O_DIRECT): see _served.
        """
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        spans = [(idx, max(offset - idx * bs, 0), min(end - idx * bs, bs))
                 for idx in range(first, last + 1)]
        parts = []
        for idx, lo, hi in spans:
            block = await self._block(f, idx, hi - lo)
            parts.append(memoryview(block)[lo:hi])
        if kept and self._disk is not None:
            for idx, lo, hi in spans:
                self._served((f.key, idx), lo, hi, min(bs, f.size - idx * bs))
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
        """Move a block the kernel holds whole from memory to the disk tier."""
        assert self._disk is not None and self._spill is not None
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

    def _evicted(self, key: BlockKey, block: Block) -> None:
        """A block leaves memory (evicted, or kept out by the scan rule): to the disk tier."""
        if self._spill is not None:
            self._spill.offer(key, block)

    async def _block(self, f: CachedFile, idx: int, served: int) -> Block:
        """Block *idx* of *f*; *served* bytes of it count for the tier it came from."""
        key = (f.key, idx)
        block = self._memory.get(key)
        if block is None and self._spill is not None:
            block = self._spill.get(key)
        if block is not None:
            self._served_memory += served
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
        if flight.from_disk:
            self._served_disk += served
        else:
            self._served_lower += served
        return flight.data

    def block_count(self, f: CachedFile) -> int:
        return -(-f.size // self.block_size)

    def prefetch(self, f: CachedFile, start: int, end: int, from_disk: bool = True) -> None:
        """Start fetching the blocks of bytes [start, end) that are neither cached nor coming.

        Without *from_disk*, blocks on disk are left there.
        """
        bs = self.block_size
        idx, last = start // bs, (min(end, f.size) - 1) // bs
        while idx <= last:
            started = self._flights.start(f, idx, min(self.fetch_blocks, last - idx + 1),
                                          readahead=True, from_disk=from_disk)
            idx += max(started, 1)

    # --- the daemon's own passes over a file -------------------------------

    async def walk(self, f: CachedFile, consume: Callable[[Block], Awaitable[object]],
                   ahead: int = 0) -> None:
        """Hand every block of *f* to *consume*, in file order, for the daemon's own use.

        Not counted as served: only replies to readers are. A walk behind the
        kernel's reader keeps the blocks it has yet to reach in memory, so it does
        not read back from disk what the kernel was handed moments ago.
        With *ahead*, the walk keeps fetches from below going that many blocks
        ahead of itself (when nothing else, such as a fill, fetches the file).
        """
        key = f.key
        self._background.start()
        try:
            for idx in range(self.block_count(f)):
                self._walks[key] = idx
                if ahead:
                    bs = self.block_size
                    self.prefetch(f, (idx + 1) * bs, (idx + 1 + ahead) * bs, from_disk=False)
                # On disk alone: it left memory before the walk began (the kernel
                # had it, or memory was full). Read it, but do not cache it again.
                disk_only = (self._disk is not None and not self._flights.held((key, idx))
                             and self._disk.contains(key, idx))
                block = await self._block(f, idx, 0)
                await consume(block)
                self._walks[key] = idx + 1
                if disk_only and self._disk is not None and self._disk.contains(key, idx):
                    self._memory.discard((key, idx))
                elif (key, idx) in self._memory and self._memory.kernel_holds((key, idx),
                                                                             len(block)):
                    self._to_disk((key, idx))
        finally:
            self._walks.pop(key, None)  # never set for an empty file
            self._background.end()

    async def fill(self, f: CachedFile, parallel: int, feed: Feed | None = None) -> None:
        """Fetch from below every block of *f* that is neither held nor coming, in file order.

        Blocks on disk are left there: they are local already, and one the
        kernel was handed moments ago would only come back to memory as a copy.

        At most *parallel* fetches are registered at a time, so a reader that
        wants a block the fill has not reached fetches it on its own (demand)
        path instead of queueing behind the fill. Stops at the first error.
        The caller pins *f* for the fill, which releases the pin when it ends.

        *feed* (block index, block) hands each block of the file the kernel does
        not hold yet to its page cache, whether the fill fetched it or found it
        in memory (or on its way), and says whether it did; a block it took
        counts as served to the kernel (see _served).
        """
        nblocks = self.block_count(f)
        window = trio.Semaphore(parallel)
        failed = False
        self._background.start()

        async def settle(flight: Flight, first: int, count: int) -> None:
            nonlocal failed
            await flight.done.wait()
            failed = failed or flight.error is not None
            window.release()
            if feed is not None and flight.error is None:
                for idx in range(first, first + count):
                    await self._feed(f, idx, feed)

        try:
            async with trio.open_nursery() as nursery:
                idx = 0
                while idx < nblocks and not failed:
                    await window.acquire()
                    started = self._flights.start(f, idx, self.fetch_blocks, readahead=True,
                                                  from_disk=False)
                    if started == 0:  # held, on its way, or on disk
                        window.release()
                        if feed is not None:  # fetched before the fill began: fed all the same
                            nursery.start_soon(self._feed_when_here, f, idx, feed)
                        idx += 1
                        continue
                    flight = self._flights.get((f.key, idx))
                    assert flight is not None
                    nursery.start_soon(settle, flight, idx, started)
                    idx += started
        finally:
            f.unpin()
            self._background.end()

    async def _feed_when_here(self, f: CachedFile, idx: int, feed: Feed) -> None:
        """Feed block *idx* once a fetch that is bringing it has landed."""
        flight = self._flights.get((f.key, idx))
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                return
        await self._feed(f, idx, feed)

    async def _feed(self, f: CachedFile, idx: int, feed: Feed) -> None:
        """Hand block *idx* of *f* to the kernel's page cache through *feed*, unless it holds it."""
        key = (f.key, idx)
        block = self._memory.get(key)
        if block is None or self._memory.kernel_holds(key, len(block)):
            return  # gone already (evicted, handed on), or the kernel read all of it
        if await feed(idx, block) and self._disk is not None:
            self._served(key, 0, len(block), len(block))

    async def wait_idle(self) -> None:
        """Return once no fetch is in flight and no walk or fill is under way."""
        while len(self._flights) or self._background.count:
            flight = self._flights.any()
            if flight is not None:
                await flight.done.wait()
            else:
                await self._background.wait_none()

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
