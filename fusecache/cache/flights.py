"""Single-flight fetches: each missing block is read once, from the disk tier or from below.

The protocol is written down in docs/design.md ("Single-flight protocol").
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from fusecache.blockio import Block, BlockPool
from fusecache.cache.disk import DiskTier
from fusecache.cache.memory import PAGE, MemoryTier
from fusecache.cache.spill import SpillQueue
from fusecache.errors import LowerError
from fusecache.logrepeats import RepeatedLog
from fusecache.lru import BlockKey
from fusecache.source_api import Identity, Source, SourceUnavailable

log = logging.getLogger(__name__)
repeats = RepeatedLog(log)  # a broken file fails every read of it


class CachedFile(Protocol):
    """What the cache needs to know of an open lower file."""

    key: Hashable
    ident: Identity
    size: int
    display: str

    def pin(self) -> None: ...
    def unpin(self) -> None: ...
    def reading(self) -> AbstractAsyncContextManager[int]: ...


@dataclass
class Flight:
    """One block on its way from the lower mount or the disk; waiters share its result."""

    done: trio.Event = field(default_factory=trio.Event)
    data: Block | None = None
    error: str | None = None
    from_disk: bool = False


class Flights:
    """The blocks on their way, and the tasks that bring them.

    A fetch task, not a reader, owns its flights: a reader whose request is
    interrupted does not strand other waiters. Each fetch holds a pin on its
    file, taken when the fetch is registered and released when it ends, so the
    lower fd stays open for it.
    """

    def __init__(self, block_size: int, source: Source, pool: BlockPool,
                 memory: MemoryTier, spill: SpillQueue | None, disk: DiskTier | None,
                 nursery: trio.Nursery, disk_readers: trio.CapacityLimiter) -> None:
        self._block_size = block_size
        self._source = source
        self._pool = pool
        self._memory = memory
        self._spill = spill
        self._disk = disk
        self._nursery = nursery
        self._disk_readers = disk_readers
        self._inflight: dict[BlockKey, Flight] = {}
        self.lower_reads = 0
        self.lower_bytes = 0
        self.lower_errors = 0
        # Read-ahead's blocks from below, and those a reader (or the kernel's page
        # cache, fed) took before they left memory: the stats' fetched against used.
        self.readahead_bytes = 0
        self.readahead_used = 0
        self._unused_ahead: dict[BlockKey, int] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def get(self, key: BlockKey) -> Flight | None:
        return self._inflight.get(key)

    def used(self, key: BlockKey) -> None:
        """A block was taken (read, fed or hashed): count it as used if read-ahead brought it."""
        self.readahead_used += self._unused_ahead.pop(key, 0)

    def unused(self, key: BlockKey) -> None:
        """A block left memory: if read-ahead brought it and nobody took it, it never will be."""
        self._unused_ahead.pop(key, None)

    def forget_file(self, file_key: Hashable) -> None:
        """A file's blocks are dropped: none of its read-ahead will be used now."""
        for key in [k for k in self._unused_ahead if k[0] == file_key]:
            del self._unused_ahead[key]

    def any(self) -> Flight | None:
        """Some flight under way, or None."""
        return next(iter(self._inflight.values()), None)

    def held(self, key: BlockKey) -> bool:
        """In memory, on its way to a writer, or on its way here."""
        return (key in self._memory or (self._spill is not None and key in self._spill)
                or key in self._inflight)

    def start(self, f: CachedFile, first: int, count: int, readahead: bool = False,
              from_disk: bool = True) -> int:
        """Start fetching the missing blocks in [first, first+count); return how many.

        The fetch covers the run of missing blocks that starts at *first*; it stops
        at the first block that is held or on disk. No await falls between the
        checks and the registration, so a block is fetched once. A block on disk
        is read from there, or, without *from_disk*, not at all.
        """
        nblocks = -(-f.size // self._block_size)
        disk = self._disk
        first_key = (f.key, first)
        if first >= nblocks or self.held(first_key):
            return 0
        if disk is not None and disk.contains(f.key, first):
            if not from_disk:
                return 0
            flight = self._inflight[first_key] = Flight(from_disk=True)
            f.pin()  # released by _fetch_from_disk, or by the _fetch it hands over to
            self._nursery.start_soon(self._fetch_from_disk, f, first, flight, readahead)
            return 1
        keys: list[BlockKey] = [first_key]
        for idx in range(first + 1, min(first + count, nblocks)):
            key = (f.key, idx)
            if self.held(key) or (disk is not None and disk.contains(f.key, idx)):
                break
            keys.append(key)
        flights = [Flight() for _ in keys]
        self._inflight.update(zip(keys, flights, strict=True))
        f.pin()  # released by _fetch
        self._nursery.start_soon(self._fetch, f, first, keys, flights, readahead)
        return len(keys)

    async def _fetch_from_disk(self, f: CachedFile, idx: int, flight: Flight,
                               readahead: bool) -> None:
        """Serve one block from disk; a block that fails its checks is fetched from below."""
        assert self._disk is not None
        length = min(self._block_size, f.size - idx * self._block_size)
        try:
            data = await trio.to_thread.run_sync(
                self._disk.read, f.key, idx, length, self._pool, limiter=self._disk_readers,
                abandon_on_cancel=True,
            )
        except trio.Cancelled:
            self._release([(f.key, idx)], [flight], None, "disk read cancelled")
            f.unpin()
            raise
        except Exception:  # a bug or an odd file system: a miss, never a dead daemon
            repeats.log(logging.ERROR, "%s: reading block %d from the disk cache failed",
                        f.display, idx, exc_info=True)
            data = None
        if data is None:  # the pin passes to _fetch, which releases it
            flight.from_disk = False
            await self._fetch(f, idx, [(f.key, idx)], [flight], readahead)
            return
        self._release([(f.key, idx)], [flight], [data], None)
        f.unpin()

    async def _fetch(self, f: CachedFile, first: int, keys: list[BlockKey],
                     flights: list[Flight], readahead: bool) -> None:
        """Read a run of blocks from below in one call; releases the caller's pin on *f*."""
        bs = self._block_size
        sizes = [min(bs, f.size - (first + i) * bs) for i in range(len(keys))]
        error: str | None = None
        quiet = False  # the source logs its own outage once, not once per fetch
        blocks: list[Block] = []
        try:
            async with f.reading() as fd:
                blocks = await self._source.read_blocks(self._pool, fd, first * bs, sizes,
                                                        f.ident, readahead)
            self.lower_reads += 1
            self.lower_bytes += sum(len(b) for b in blocks)
            if readahead:
                self.readahead_bytes += sum(len(b) for b in blocks)
                self._unused_ahead.update((k, len(b)) for k, b in zip(keys, blocks,
                                                                    strict=False))
            if [len(b) for b in blocks] != sizes:
                error = f"{f.display}: lower file is shorter than its size said (changed?)"
        except (OSError, LowerError) as exc:
            error = f"{f.display}: lower read at {first * bs} failed: {exc}"
            quiet = isinstance(exc, SourceUnavailable)
        except Exception as exc:  # a bug or an odd source: this read fails, the daemon stays
            error = f"{f.display}: lower read at {first * bs} failed: {exc!r}"
            log.exception("%s", error)
        except trio.Cancelled:
            error = f"{f.display}: read cancelled (unmounting)"
            raise
        finally:
            if error is None and len(blocks) != len(keys):
                error = f"{f.display}: lower read at {first * bs} did not complete"
            if error is not None:
                self.lower_errors += 1
                if quiet:
                    log.debug("%s", error)
                else:
                    repeats.log(logging.ERROR, "%s", error)
            self._release(keys, flights, blocks if error is None else None, error)
            f.unpin()

    async def read_pages(self, f: CachedFile, offset: int, end: int) -> Block:
        """The whole pages around bytes [offset, end) of one block, from below, not cached.

        For a random read: see BlockCache.read. The caller checked that the block
        is nowhere local; the block's own fetch, if one starts, is unaffected.
        """
        start, stop = offset - offset % PAGE, min(-(-end // PAGE) * PAGE, f.size)
        f.pin()
        try:
            async with f.reading() as fd:
                blocks = await self._source.read_blocks(self._pool, fd, start, [stop - start],
                                                        f.ident)
        except SourceUnavailable:
            self.lower_errors += 1
            raise  # the source logs its outage once
        except (OSError, LowerError) as exc:
            self.lower_errors += 1
            raise LowerError(f"{f.display}: lower read at {start} failed: {exc}") from None
        finally:
            f.unpin()
        if len(blocks) != 1 or len(blocks[0]) != stop - start:
            self.lower_errors += 1
            raise LowerError(f"{f.display}: lower file is shorter than its size said (changed?)")
        self.lower_reads += 1
        self.lower_bytes += stop - start
        return memoryview(blocks[0])[offset - start:end - start]

    def _release(self, keys: list[BlockKey], flights: list[Flight],
                 blocks: list[Block] | None, error: str | None) -> None:
        """Publish a fetch's outcome to its waiters; no await, so nobody sees half of it.

        Waiters take the bytes from the flight, not from memory, so a block the
        memory tier refuses or evicts at once is still delivered.
        """
        for i, (key, flight) in enumerate(zip(keys, flights, strict=True)):
            if blocks is not None:
                flight.data = blocks[i]
                self._memory.put(key, blocks[i])
            flight.error = error
            del self._inflight[key]
            flight.done.set()
