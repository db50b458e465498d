"""The daemon's block cache: memory and disk tiers, single-flight fetches from the lower mount.

The concurrency protocol is written down in docs/design.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from fusecache.blockio import Block, BlockPool, new_pool
from fusecache.config import CacheConfig
from fusecache.disktier import DiskTier
from fusecache.errors import LowerError
from fusecache.lru import BlockKey, ScanResistantLRU
from fusecache.source import Identity, LowerSource, SourceUnavailable

log = logging.getLogger(__name__)


class CachedFile(Protocol):
    """What the cache needs to know of an open lower file."""

    key: Hashable
    ident: Identity
    size: int
    display: str

    def pin(self) -> None: ...
    def unpin(self) -> None: ...
    async def lower_fd(self) -> int: ...


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


@dataclass
class _Flight:
    """One block on its way from the lower mount; waiters share its result."""

    done: trio.Event = field(default_factory=trio.Event)
    data: Block | None = None
    error: str | None = None
    from_disk: bool = False


class _Underway:
    """How many jobs of one kind are under way, and a wait for there to be none."""

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()
        self._none.set()

    def start(self) -> None:
        if self.count == 0:
            self._none = trio.Event()
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._none.set()

    async def wait_none(self) -> None:
        await self._none.wait()


class BlockCache:
    """Blocks of lower files, fetched once however many readers want them."""

    # The disk tier holds what memory lets go (evicted, or kept out by the scan
    # rule): a block is written when it leaves memory, not when it arrives, so a
    # model that fits in memory costs no disk writes at all (they cost 0.8 CPU-s
    # per GB on this machine, a tenth of a cold read). Blocks waiting for a writer
    # are held outside the memory budget, at most this many (256 MiB, part of the
    # daemon's overhead above --mem-cache in docs/design.md); beyond that a block
    # that leaves is not written rather than growing memory without bound.
    SPILL_HELD = 256
    # One writer fell behind a 240 MB/s reader (117 of 400 blocks dropped); four
    # keep up.
    DISK_WRITERS = 4
    # The kernel's page size: it caches, and asks for, whole pages.
    PAGE = 4096

    def __init__(
        self, config: CacheConfig, source: LowerSource, nursery: trio.Nursery,
        disk: DiskTier | None = None, pool: BlockPool | None = None,
    ) -> None:
        self.block_size = config.block_size
        # An eighth of the budget holds blocks the scan rule turns away (a file
        # bigger than the cache) until their reader comes: `passing`. The LRU gets
        # the rest, so a second pass over a file 1.5x the budget still hits 58%.
        # Both stay within mem_bytes: in a container, more is an OOM kill.
        passing = config.mem_bytes // 8
        self._memory: ScanResistantLRU[Block] = ScanResistantLRU(
            config.mem_bytes - passing, self._spill, passing=passing)
        # A fetch's blocks must all fit in passing until their readers come.
        fetch = min(config.fetch_size, passing // 2)
        self.fetch_blocks = max(1, fetch // config.block_size)
        # Read-ahead may reach this far past the reader: a fetch unit on top of
        # it still fits in passing (see FilesystemCore.open).
        self.readahead_reach = max(config.block_size, passing - fetch)
        self._source = source
        self._pool = pool or new_pool(config.block_size)
        self._nursery = nursery
        self._inflight: dict[BlockKey, _Flight] = {}
        self._served_memory = 0
        self._served_lower = 0
        self._lower_reads = 0
        self._lower_bytes = 0
        self._lower_errors = 0
        self._served_disk = 0
        self._disk_writes_dropped = 0
        self._disk = disk
        # Disk reads only: writers are bounded by their own count and must never
        # take the threads a reader waiting on a disk block needs.
        self._disk_read_limiter = trio.CapacityLimiter(4)
        # Blocks that left memory and wait for a writer; still served from here.
        self._spilling: dict[BlockKey, Block] = {}
        self._writes = _Underway()  # keys queued for the writers
        # Per block in memory: a bit mask of the pages a reader that keeps them
        # (the kernel page cache) has been served. See _served.
        self._kernel_pages: dict[BlockKey, int] = {}
        self._walks: dict[Hashable, int] = {}  # file key -> the block a walk waits for
        self._background = _Underway()  # walks and fills
        self._handed_to_kernel = 0
        send, receive = trio.open_memory_channel[BlockKey](self.SPILL_HELD)
        self._spill_queue = send
        if disk is not None:
            for _ in range(self.DISK_WRITERS):
                nursery.start_soon(self._write_to_disk, receive)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            served_memory=self._served_memory,
            served_disk=self._served_disk,
            served_lower=self._served_lower,
            lower_reads=self._lower_reads,
            lower_bytes=self._lower_bytes,
            lower_errors=self._lower_errors,
            evictions=self._memory.evictions,
            memory_used=self._memory.used + self._memory.passing_used,
            memory_capacity=self._memory.capacity + self._memory.passing_capacity,
            memory_mapped=self._pool.statistics()["mapped_bytes"],
            disk_used=self._disk.used if self._disk else 0,
            disk_capacity=self._disk.capacity if self._disk else 0,
            disk_writes_dropped=self._disk_writes_dropped,
            validation_failures=self._disk.validation_failures if self._disk else 0,
            handed_to_kernel=self._handed_to_kernel,
            fetches_in_flight=len(self._inflight),
            background_jobs=self._background.count,
        )

    def forget_file(self, key: Hashable) -> None:
        """Drop a file's cached blocks (its content changed)."""
        for gone in self._memory.discard_file(key):
            self._kernel_pages.pop(gone, None)
        for doomed in [k for k in self._spilling if k[0] == key]:
            del self._spilling[doomed]  # its writer finds nothing and moves on
        if self._disk is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self._disk.discard_file, key)

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
        if key not in self._memory:
            return
        page = self.PAGE
        first = -(-lo // page)  # pages wholly inside [lo, hi); the block's last may be short
        stop = (hi if hi < length else length + page - 1) // page
        if stop <= first:
            return
        self._kernel_pages[key] = self._kernel_pages.get(key, 0) | (
            ((1 << (stop - first)) - 1) << first)
        if self._kernel_holds(key, length) and not self._walk_needs(key):
            self._to_disk(key)

    def _kernel_holds(self, key: BlockKey, length: int) -> bool:
        """Whether the kernel was handed every page of a block of *length* bytes."""
        return self._kernel_pages.get(key) == (1 << -(-length // self.PAGE)) - 1

    def _walk_needs(self, key: BlockKey) -> bool:
        """Whether a walk over the block's file has yet to reach it."""
        return key[0] in self._walks and key[1] >= self._walks[key[0]]

    def _to_disk(self, key: BlockKey) -> None:
        """Move a block the kernel holds whole from memory to the disk tier."""
        assert self._disk is not None
        if not self._disk.accepting_writes:
            return  # the disk is full: it stays in memory until evicted
        self._kernel_pages.pop(key, None)
        if self._disk.contains(*key):
            self._memory.discard(key)
        elif len(self._spilling) < self.SPILL_HELD:
            block = self._memory.discard(key)
            if block is None:
                return
            self._spill(key, block)
        else:
            return  # the writers are behind: it stays until memory evicts it
        self._handed_to_kernel += 1

    async def _block(self, f: CachedFile, idx: int, served: int) -> Block:
        """Block *idx* of *f*; *served* bytes of it count for the tier it came from."""
        key = (f.key, idx)
        block = self._memory.get(key)
        if block is None:
            block = self._spilling.get(key)
        if block is not None:
            self._served_memory += served
            return block
        flight = self._inflight.get(key)
        if flight is None:
            self.start_fetch(f, idx, 1)  # only what the reader waits for; read-ahead does the rest
            flight = self._inflight[key]
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
                disk_only = (self._disk is not None and not self._held((key, idx))
                             and self._disk.contains(key, idx))
                block = await self._block(f, idx, 0)
                await consume(block)
                self._walks[key] = idx + 1
                if disk_only and self._disk is not None and self._disk.contains(key, idx):
                    self._memory.discard((key, idx))
                    self._kernel_pages.pop((key, idx), None)
                elif (key, idx) in self._memory and self._kernel_holds((key, idx), len(block)):
                    self._to_disk((key, idx))
        finally:
            self._walks.pop(key, None)  # never set for an empty file
            self._background.end()

    async def fill(self, f: CachedFile, parallel: int,
                   feed: Callable[[int, Block], Awaitable[bool]] | None = None) -> None:
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

        async def settle(flight: _Flight, first: int, count: int) -> None:
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
                    started = self.start_fetch(f, idx, self.fetch_blocks, readahead=True,
                                               from_disk=False)
                    if started == 0:  # held, on its way, or on disk
                        window.release()
                        if feed is not None:  # fetched before the fill began: fed all the same
                            nursery.start_soon(self._feed_when_here, f, idx, feed)
                        idx += 1
                        continue
                    nursery.start_soon(settle, self._inflight[(f.key, idx)], idx, started)
                    idx += started
        finally:
            f.unpin()
            self._background.end()

    async def _feed_when_here(self, f: CachedFile, idx: int,
                              feed: Callable[[int, Block], Awaitable[bool]]) -> None:
        """Feed block *idx* once a fetch that is bringing it has landed."""
        flight = self._inflight.get((f.key, idx))
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                return
        await self._feed(f, idx, feed)

    async def _feed(self, f: CachedFile, idx: int,
                    feed: Callable[[int, Block], Awaitable[bool]]) -> None:
        """Hand block *idx* of *f* to the kernel's page cache through *feed*, unless it holds it."""
        key = (f.key, idx)
        block = self._memory.get(key)
        if block is None or self._kernel_holds(key, len(block)):
            return  # gone already (evicted, handed on), or the kernel read all of it
        if await feed(idx, block) and self._disk is not None:
            self._served(key, 0, len(block), len(block))

    async def wait_idle(self) -> None:
        """Return once no fetch is in flight and no walk or fill is under way."""
        while self._inflight or self._background.count:
            if self._inflight:
                await next(iter(self._inflight.values())).done.wait()
            else:
                await self._background.wait_none()

    @property
    def capacity(self) -> int:
        return self._memory.capacity

    @property
    def disk(self) -> DiskTier | None:
        return self._disk

    def prefetch(self, f: CachedFile, start: int, end: int, from_disk: bool = True) -> None:
        """Start fetching the blocks of bytes [start, end) that are neither cached nor coming.

        Without *from_disk*, blocks on disk are left there.
        """
        bs = self.block_size
        idx, last = start // bs, (min(end, f.size) - 1) // bs
        while idx <= last:
            started = self.start_fetch(f, idx, min(self.fetch_blocks, last - idx + 1),
                                       readahead=True, from_disk=from_disk)
            idx += max(started, 1)

    def start_fetch(self, f: CachedFile, first: int, count: int, readahead: bool = False,
                    from_disk: bool = True) -> int:
        """Start fetching the missing blocks in [first, first+count); return how many.

        The fetch covers the run of missing blocks that starts at *first*; it stops
        at the first block that is cached or already on its way. No await falls
        between the checks and the registration, so a block is fetched once.
        A block on disk is read from there, or, without *from_disk*, not at all.
        """
        nblocks = self.block_count(f)
        disk = self._disk
        first_key = (f.key, first)
        if first >= nblocks or self._held(first_key):
            return 0
        if disk is not None and disk.contains(f.key, first):
            if not from_disk:
                return 0
            flight = self._inflight[first_key] = _Flight(from_disk=True)
            f.pin()
            self._nursery.start_soon(self._fetch_from_disk, f, first, flight, readahead)
            return 1
        keys: list[BlockKey] = [first_key]
        for idx in range(first + 1, min(first + count, nblocks)):
            key = (f.key, idx)
            if self._held(key):
                break
            if disk is not None and disk.contains(f.key, idx):
                break
            keys.append(key)
        flights = [_Flight() for _ in keys]
        self._inflight.update(zip(keys, flights, strict=True))
        f.pin()
        self._nursery.start_soon(self._fetch, f, first, keys, flights, readahead)
        return len(keys)

    def _held(self, key: BlockKey) -> bool:
        """In memory, on its way to a writer, or on its way from below."""
        return key in self._memory or key in self._spilling or key in self._inflight

    async def _fetch_from_disk(
        self, f: CachedFile, idx: int, flight: _Flight, readahead: bool
    ) -> None:
        """Serve one block from disk; a block that fails its checks is fetched from below."""
        assert self._disk is not None
        length = min(self.block_size, f.size - idx * self.block_size)
        try:
            data = await trio.to_thread.run_sync(
                self._disk.read, f.key, idx, length, self._pool, limiter=self._disk_read_limiter,
                abandon_on_cancel=True,
            )
        except trio.Cancelled:
            self._release([(f.key, idx)], [flight], None, "disk read cancelled")
            f.unpin()
            raise
        except Exception:  # a bug or an odd file system: a miss, never a dead daemon
            log.exception("%s: reading block %d from the disk cache failed", f.display, idx)
            data = None
        if data is None:  # the pin passes to _fetch, which releases it
            flight.from_disk = False
            await self._fetch(f, idx, [(f.key, idx)], [flight], readahead)
            return
        self._release([(f.key, idx)], [flight], [data], None)
        f.unpin()

    def _spill(self, key: BlockKey, block: Block) -> None:
        """A block leaves memory (the LRU's on_evict): queue it for the disk tier."""
        self._kernel_pages.pop(key, None)
        if self._disk is None or key in self._spilling or self._disk.contains(*key):
            return
        if len(self._spilling) >= self.SPILL_HELD or not self._disk.accepting_writes:
            self._disk_writes_dropped += 1
            return
        try:
            self._spill_queue.send_nowait(key)
        except trio.WouldBlock:  # full of keys whose file changed meanwhile
            self._disk_writes_dropped += 1
            return
        self._spilling[key] = block
        self._writes.start()

    async def _write_to_disk(self, receive: trio.MemoryReceiveChannel[BlockKey]) -> None:
        assert self._disk is not None
        async for key in receive:
            block = self._spilling.get(key)  # None: its file changed meanwhile
            try:
                if block is not None:
                    await trio.to_thread.run_sync(self._disk.write, *key, block)
            except Exception:
                log.exception("writing a block to the disk cache failed")
            finally:
                self._spilling.pop(key, None)
                self._writes.end()

    async def wait_spilled(self) -> None:
        """Return once every block that left memory is written (or failed to be)."""
        await self._writes.wait_none()

    async def flush_to_disk(self) -> None:
        """Write every block held in memory but not on disk, most recently used first.

        For a clean unmount, so the next mount starts warm. The caller bounds
        the time; what is written by then stays, the log says how much.
        """
        if self._disk is None:
            return
        disk = self._disk
        todo = [(k, b) for k, b in self._memory.items_recent_first() if not disk.contains(*k)]
        pending = iter(todo)
        written = [0, 0]
        start = trio.current_time()

        async def writer() -> None:
            for key, block in pending:
                if await trio.to_thread.run_sync(disk.write, *key, block):
                    written[0] += 1
                    written[1] += len(block)

        try:
            await self.wait_spilled()
            async with trio.open_nursery() as nursery:
                for _ in range(self.DISK_WRITERS):
                    nursery.start_soon(writer)
        finally:
            log.info("wrote %d of %d blocks (%.0f MB) held in memory to the disk cache in %.1f s",
                     written[0], len(todo), written[1] / 1e6, trio.current_time() - start)

    async def _fetch(
        self, f: CachedFile, first: int, keys: list[BlockKey], flights: list[_Flight],
        readahead: bool,
    ) -> None:
        bs = self.block_size
        sizes = [min(bs, f.size - (first + i) * bs) for i in range(len(keys))]
        error: str | None = None
        quiet = False  # the source logs its own outage once, not once per fetch
        blocks: list[Block] = []
        try:
            fd = await f.lower_fd()
            blocks = await self._source.read_blocks(self._pool, fd, first * bs, sizes, f.ident,
                                                    readahead)
            self._lower_reads += 1
            self._lower_bytes += sum(len(b) for b in blocks)
            if [len(b) for b in blocks] != sizes:
                error = f"{f.display}: lower file is shorter than its size said (changed?)"
        except (OSError, LowerError) as exc:
            error = f"{f.display}: lower read at {first * bs} failed: {exc}"
            quiet = isinstance(exc, SourceUnavailable)
        except trio.Cancelled:
            error = f"{f.display}: read cancelled (unmounting)"
            raise
        finally:
            if error is None and len(blocks) != len(keys):
                error = f"{f.display}: lower read at {first * bs} did not complete"
            if error is not None:
                self._lower_errors += 1
                log.log(logging.DEBUG if quiet else logging.ERROR, "%s", error)
            self._release(keys, flights, blocks if error is None else None, error)
            f.unpin()

    def _release(self, keys: list[BlockKey], flights: list[_Flight],
                 blocks: list[Block] | None, error: str | None) -> None:
        """Publish a fetch's outcome to its waiters; no await, so nobody sees half of it."""
        for i, (key, flight) in enumerate(zip(keys, flights, strict=True)):
            if blocks is not None:
                flight.data = blocks[i]
                self._memory.put(key, blocks[i])
            flight.error = error
            del self._inflight[key]
            flight.done.set()
