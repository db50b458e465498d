"""The kernel's page cache of our inodes: stores into it and invalidations of it, in turn.

A store puts a block in the kernel's page cache of an inode (FUSE
notify_store); an invalidation drops an inode's pages (the lower file changed).
The bytes stored must belong to the version the kernel's inode stands for, so
a store checks, under the lock, that its file is still that inode's current
version, and stores and invalidations take turns under that lock: no store of
an old version's bytes lands after the kernel was told to drop that version's
pages. Both run in worker threads, never inline in a handler.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Hashable

import trio

from fusecache.blockio import Block
from fusecache.cache.blocks import Feed, Piece
from fusecache.fs.lowerfile import LowerFile

log = logging.getLogger(__name__)


class PageCache:
    """Calls into the kernel's page cache, ordered by one lock.

    *invalidate* (inode) drops an inode's pages; *store* (inode, offset, data)
    puts data in them, None: never. Both are called in a worker thread.
    *is_current* (inode, file) says whether *file* is still the version the
    inode stands for. *followed* (file key, offset) says whether a reader streams
    through that file version towards *offset*: it will ask for those pages
    itself, and a store of them would race its requests and copy them twice.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        block_size: int,
        invalidate: Callable[[int], None],
        store: Callable[[int, int, Block], None] | None,
        is_current: Callable[[int, LowerFile], bool],
        followed: Callable[[Hashable, int], bool],
    ) -> None:
        self._nursery = nursery
        self._block_size = block_size
        self._invalidate = invalidate
        self._store = store
        self._is_current = is_current
        self._followed = followed
        # Held around each store into the page cache and each invalidation of it,
        # so a store of an old version's bytes cannot land after the kernel was
        # told to drop that version's pages (see feeder).
        self._lock = trio.Lock()
        self.fed_bytes = 0  # put into the kernel's page cache by whole-file fetches

    @property
    def feeding(self) -> bool:
        """Whether blocks are put into the kernel's page cache at all."""
        return self._store is not None

    def invalidate_soon(self, ino: int) -> None:
        """Drop the kernel's pages of *ino*, in the background: its lower file changed."""
        self._nursery.start_soon(self._invalidate_page_cache, ino)

    async def _invalidate_page_cache(self, ino: int) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._invalidate_quietly, ino)

    def _invalidate_quietly(self, ino: int) -> None:
        try:
            self._invalidate(ino)
        except OSError as exc:  # the kernel may already have forgotten the inode
            log.debug("invalidating inode %d: %s", ino, exc)

    async def wait_stores(self) -> None:
        """Return once no store is under way (one that starts later checks the version)."""
        async with self._lock:
            pass

    def feeder(self, ino: int, f: LowerFile) -> Feed | None:
        """What puts blocks of *f* in the kernel's page cache of *ino* for a fill, if anything.

        A block goes in only while *f* is the version the lower mount has, as
        last seen: a store of an old version's bytes would be served as the new
        one's.
        """
        if self._store is None:
            return None

        async def feed(pieces: list[Piece]) -> list[Piece]:
            bs = self._block_size
            pieces = [p for p in pieces if not self._followed(f.key, p[0] * bs + p[1])]
            if not pieces:
                return []
            async with self._lock:
                store = self._store
                if store is None or not self._is_current(ino, f):
                    return []
                # One thread hop for them all: a hop costs the loop more than the
                # stores' bookkeeping (84 us of its time, measured).
                taken, error = await trio.to_thread.run_sync(self._store_all, store, ino,
                                                             pieces)
            if error is not None and error.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                log.warning("the kernel takes no data into its page cache (%s); "
                            "not feeding it", error)
                self._store = None
            elif error is not None:  # e.g. the kernel forgot the inode: its pages went with it
                log.debug("%s: page cache store of block %d: %s", f.display,
                          pieces[taken][0], error)
            self.fed_bytes += sum(len(data) for _, _, data in pieces[:taken])
            return pieces[:taken]

        return feed

    def _store_all(self, store: Callable[[int, int, Block], None], ino: int,
                   pieces: list[Piece]) -> tuple[int, OSError | None]:
        """Store pieces in order (in a worker thread): how many went in, and the error that
        stopped the rest."""
        for done, (idx, lo, data) in enumerate(pieces):
            if self._store is None:  # the session closes: no call may outlive it
                return done, None
            try:
                store(ino, idx * self._block_size + lo, data)
            except OSError as exc:
                return done, exc
        return len(pieces), None

    async def end_calls(self, grace: float) -> None:
        """Store into or invalidate the kernel's page cache no more: the session closes.

        Waits, at most *grace* seconds, for a call under way; one that goes on
        (it would be stuck on a page the kernel holds locked) is logged.
        """
        self._store = None
        self._invalidate = lambda ino: None
        with trio.move_on_after(grace) as waited:
            async with self._lock:
                pass
        if waited.cancelled_caught:
            log.warning("a page-cache store or invalidation was still under way after %.1f s",
                        grace)
