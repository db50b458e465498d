"""The daemon's block cache: memory tier and single-flight fetches from the lower mount.

The concurrency protocol is written down in docs/design.md.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from fusecache.config import CacheConfig
from fusecache.errors import LowerError
from fusecache.lru import BlockKey, ScanResistantLRU
from fusecache.source import LowerSource

log = logging.getLogger(__name__)

Block = bytes | bytearray


class CachedFile(Protocol):
    """What the cache needs to know of an open lower file."""

    key: Hashable
    size: int
    fd: int
    display: str

    def pin(self) -> None: ...
    def unpin(self) -> None: ...


@dataclass(frozen=True)
class CacheStatistics:
    """Counters of the kernel-miss path; bytes are what readers were served."""

    served_memory: int
    served_lower: int
    lower_reads: int
    lower_bytes: int
    lower_errors: int
    evictions: int
    memory_used: int
    memory_capacity: int


@dataclass
class _Flight:
    """One block on its way from the lower mount; waiters share its result."""

    done: trio.Event = field(default_factory=trio.Event)
    data: Block | None = None
    error: str | None = None


class BlockCache:
    """Blocks of lower files, fetched once however many readers want them."""

    def __init__(
        self, config: CacheConfig, source: LowerSource, nursery: trio.Nursery
    ) -> None:
        self.block_size = config.block_size
        self.fetch_blocks = max(1, config.fetch_size // config.block_size)
        self._source = source
        self._nursery = nursery
        self._memory: ScanResistantLRU[Block] = ScanResistantLRU(config.mem_bytes)
        self._inflight: dict[BlockKey, _Flight] = {}
        self._served_memory = 0
        self._served_lower = 0
        self._lower_reads = 0
        self._lower_bytes = 0
        self._lower_errors = 0

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            served_memory=self._served_memory,
            served_lower=self._served_lower,
            lower_reads=self._lower_reads,
            lower_bytes=self._lower_bytes,
            lower_errors=self._lower_errors,
            evictions=self._memory.evictions,
            memory_used=self._memory.used,
            memory_capacity=self._memory.capacity,
        )

    def forget_file(self, key: Hashable) -> None:
        """Drop a file's cached blocks (its content changed)."""
        self._memory.discard_file(key)

    async def read(self, f: CachedFile, offset: int, size: int) -> Block | memoryview:
        """Bytes [offset, offset+size) of *f*, short at EOF; zero-copy within one block."""
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if first == last:
            block = await self._block(f, first)
            return memoryview(block)[offset - first * bs : end - first * bs]
        out = bytearray(end - offset)
        pos = 0
        for idx in range(first, last + 1):
            block = await self._block(f, idx)
            lo = max(offset - idx * bs, 0)
            hi = min(end - idx * bs, len(block))
            out[pos : pos + hi - lo] = memoryview(block)[lo:hi]
            pos += hi - lo
        return out

    async def _block(self, f: CachedFile, idx: int) -> Block:
        key = (f.key, idx)
        block = self._memory.get(key)
        if block is not None:
            self._served_memory += len(block)
            return block
        flight = self._inflight.get(key)
        if flight is None:
            self.start_fetch(f, idx, self.fetch_blocks)
            flight = self._inflight[key]
        await flight.done.wait()
        if flight.error is not None:
            raise LowerError(flight.error)
        assert flight.data is not None
        self._served_lower += len(flight.data)
        return flight.data

    async def wait_idle(self) -> None:
        """Return once no fetch is in flight."""
        while self._inflight:
            await next(iter(self._inflight.values())).done.wait()

    @property
    def capacity(self) -> int:
        return self._memory.capacity

    def prefetch(self, f: CachedFile, start: int, end: int) -> None:
        """Start fetching the blocks of bytes [start, end) that are neither cached nor coming."""
        bs = self.block_size
        idx, last = start // bs, (min(end, f.size) - 1) // bs
        while idx <= last:
            started = self.start_fetch(f, idx, min(self.fetch_blocks, last - idx + 1),
                                       readahead=True)
            idx += max(started, 1)

    def start_fetch(self, f: CachedFile, first: int, count: int, readahead: bool = False) -> int:
        """Start fetching the missing blocks in [first, first+count); return how many.

        The fetch covers the run of missing blocks that starts at *first*; it stops
        at the first block that is cached or already on its way. No await falls
        between the checks and the registration, so a block is fetched once.
        """
        nblocks = -(-f.size // self.block_size)
        keys: list[BlockKey] = []
        for idx in range(first, min(first + count, nblocks)):
            key = (f.key, idx)
            if key in self._memory or key in self._inflight:
                break
            keys.append(key)
        if not keys:
            return 0
        flights = [_Flight() for _ in keys]
        self._inflight.update(zip(keys, flights, strict=True))
        f.pin()
        self._nursery.start_soon(self._fetch, f, first, keys, flights, readahead)
        return len(keys)

    async def _fetch(
        self, f: CachedFile, first: int, keys: list[BlockKey], flights: list[_Flight],
        readahead: bool,
    ) -> None:
        bs = self.block_size
        sizes = [min(bs, f.size - (first + i) * bs) for i in range(len(keys))]
        error: str | None = None
        blocks: list[bytearray] = []
        try:
            blocks = await self._source.read_blocks(f.fd, first * bs, sizes, readahead)
            self._lower_reads += 1
            self._lower_bytes += sum(len(b) for b in blocks)
            if [len(b) for b in blocks] != sizes:
                error = f"{f.display}: lower file is shorter than its size said (changed?)"
        except OSError as exc:
            error = f"{f.display}: lower read at {first * bs} failed: {exc}"
        except trio.Cancelled:
            error = f"{f.display}: read cancelled (unmounting)"
            raise
        finally:
            if error is None and len(blocks) != len(keys):
                error = f"{f.display}: lower read at {first * bs} did not complete"
            if error is not None:
                self._lower_errors += 1
                log.error("%s", error)
            for i, (key, flight) in enumerate(zip(keys, flights, strict=True)):
                if error is None:
                    flight.data = blocks[i]
                    self._memory.put(key, blocks[i])
                flight.error = error
                del self._inflight[key]
                flight.done.set()
            f.unpin()
