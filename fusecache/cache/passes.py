"""The daemon's own passes over whole files: fills (read-once) and walks (the sha256).

They go through the block cache like a reader would, so what they fetch from
below is fetched once and stays for the readers that follow; unlike a reader's,
what they take is not counted as served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache, Feed
from fusecache.cache.flights import CachedFile, Flight
from fusecache.cache.underway import Underway


class FilePasses:
    """Whole-file fills and walks over one block cache, and a count of those under way."""

    def __init__(self, cache: BlockCache) -> None:
        self._cache = cache
        self._underway = Underway()

    @property
    def underway(self) -> int:
        """Jobs under way (fills, hashes, warms), now."""
        return self._underway.count

    def start_soon(self, nursery: trio.Nursery, job: Callable[..., Awaitable[object]],
                   *args: object) -> None:
        """Start *job* (a fill, a hash, a warm) in *nursery*, under way from now.

        Every fill and walk runs in a job started here. It is counted before its
        task first runs, so `wait_idle` right after a read that starts one waits
        for it.
        """
        self._underway.start()

        async def counted() -> None:
            try:
                await job(*args)
            finally:
                self._underway.end()

        nursery.start_soon(counted)

    async def wait_idle(self) -> None:
        """Return once no fetch is in flight and no fill or walk is under way."""
        while self._cache.fetching or self._underway.count:
            if self._cache.fetching:
                await self._cache.wait_fetched()
            else:
                await self._underway.wait_none()

    async def walk(self, f: CachedFile, consume: Callable[[Block], Awaitable[object]],
                   ahead: int = 0) -> None:
        """Hand every block of *f* to *consume*, in file order, for the daemon's own use.

        A walk behind the kernel's reader keeps the blocks it has yet to reach
        in memory (BlockCache.walk_at), so it does not read back from disk what
        the kernel was handed moments ago. With *ahead*, the walk keeps fetches
        from below going that many blocks ahead of itself (when nothing else,
        such as a fill, fetches the file).
        """
        cache, bs = self._cache, self._cache.block_size
        try:
            for idx in range(cache.block_count(f)):
                cache.walk_at(f.key, idx)
                if ahead:
                    cache.prefetch(f, (idx + 1) * bs, (idx + 1 + ahead) * bs, from_disk=False)
                disk_only = cache.on_disk_only((f.key, idx))
                block = await cache.block(f, idx, served=0)
                await consume(block)
                cache.walk_at(f.key, idx + 1)
                cache.walked_past((f.key, idx), len(block), disk_only)
        finally:
            cache.walk_ended(f.key)

    async def fill(self, f: CachedFile, parallel: int, feed: Feed | None = None) -> str | None:
        """Fetch from below every block of *f* that is neither held nor coming, in file order.

        Blocks on disk are left there: they are local already, and one the
        kernel was handed moments ago would only come back to memory as a copy.

        At most *parallel* fetches are registered at a time, so a reader that
        wants a block the fill has not reached fetches it on its own (demand)
        path instead of queueing behind the fill. Stops at the first error, and
        returns it (None: every block was fetched or found here). The caller
        pins *f* for the fill, which releases the pin when it ends.

        *feed* hands the blocks of the file the kernel does not hold yet to its
        page cache, a fetch's run at a time, whether the fill fetched them or found
        them in memory (or on their way), and says which it took (BlockCache.feed).
        """
        cache = self._cache
        window = trio.Semaphore(parallel)
        failed: str | None = None

        async def settle(flight: Flight, first: int, count: int) -> None:
            nonlocal failed
            await flight.done.wait()
            failed = failed or flight.error
            window.release()
            if feed is not None and flight.error is None:
                await cache.feed(f, first, count, feed)

        cache.fill_started(f.key)
        try:
            async with trio.open_nursery() as nursery:
                idx, nblocks = 0, cache.block_count(f)
                while idx < nblocks and not failed:
                    await window.acquire()
                    started, flight = cache.fetch_from_below(f, idx)
                    if flight is None:  # held, on its way, or on disk
                        window.release()
                        if feed is not None:  # fetched before the fill began: fed all the same
                            nursery.start_soon(self._feed_when_here, f, idx, feed)
                        idx += 1
                        continue
                    nursery.start_soon(settle, flight, idx, started)
                    idx += started
        finally:
            cache.fill_ended(f.key)
            f.unpin()
        return failed

    async def _feed_when_here(self, f: CachedFile, idx: int, feed: Feed) -> None:
        """Feed block *idx* once a fetch that is bringing it has landed."""
        flight = self._cache.flight((f.key, idx))
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                return
        await self._cache.feed(f, idx, 1, feed)
