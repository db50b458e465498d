"""One version of a lower file: its fd, opened again on demand, and the pins that keep it open."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Hashable
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from fusecache.cache.underway import Underway
from fusecache.errors import LowerError
from fusecache.source_api import Identity, Source

if TYPE_CHECKING:
    from fusecache.fs.keptfds import KeptFds


class LowerFile:
    """One version of a lower file, shared by every handle on it.

    Its fd stays open while a handle or a fetch holds a pin, and then as long as
    *kept* keeps it (fs/keptfds.py), and is closed in a worker thread, as the
    lower mount may block on close. A version served from what was last known,
    while the lower mount is slow or gone, has no fd until a fetch needs one:
    `lower_fd` opens the file again and refuses a file that is no longer this
    version. A version replaced below is `retire`d: it reads nothing below any
    more, and its fd closes once the reads under way end, handles or not.

    The filesystem holds its pins as `Pin` objects; the block cache, which takes
    any `CachedFile`, calls `pin`/`unpin` itself.
    """

    def __init__(self, ident: Identity, source: Source, nursery: trio.Nursery,
                 kept: KeptFds):
        self.fd: int | None = None
        self.opened_at = 0.0  # trio.current_time() when the fd was attached
        self.ident = ident
        self.key: Hashable = ident.key()
        self.size = ident.size
        self.display = os.fsdecode(ident.path)
        self._pins = 0
        self._source = source
        self._nursery = nursery
        self._opening = trio.Lock()
        self._kept = kept
        # Every fd of this version is closed in the background (`close_counted`), counted
        # until the lower mount answered, and when the last ended (trio time): an
        # open made before then may have been handed what the fd had loaded below
        # (fs/keptfds.py).
        self._closes = Underway()
        self.closed_at = float("-inf")
        self.retired = False  # replaced below: nothing more is read there
        self._reads = Underway()  # reads on the fd under way (`reading`)

    def pin(self) -> None:
        self._pins += 1
        if self._pins == 1:
            self._kept.busy(self)

    def unpin(self) -> None:
        self._pins -= 1
        assert self._pins >= 0, "unpin without a pin"
        if self._pins == 0 and self.fd is not None:
            if self.retired:
                self.close_idle()
            else:
                self._kept.idle(self)

    def take_idle_fd(self) -> int | None:
        """The fd, which the caller closes, if nobody holds a pin; this file has none after."""
        if self._pins > 0 or self.fd is None:
            return None
        fd, self.fd = self.fd, None
        return fd

    def close_idle(self) -> None:
        """Close the fd in the background if nobody holds a pin (KeptFds' call)."""
        fd = self.take_idle_fd()
        if fd is not None:
            self.close_counted(fd)

    def close_counted(self, fd: int) -> None:
        """Close an fd of this version (or one that shares its state below) in the
        background, counted until the lower mount answered (`closed_since`)."""
        self._closes.start()
        self._nursery.start_soon(self._close_counted, fd)

    async def _close_counted(self, fd: int) -> None:
        try:
            await self._source.close(fd)
        finally:
            self.closed_at = trio.current_time()
            self._closes.end()

    async def closed_since(self, since: float) -> bool:
        """Whether an fd of this version was closed at or after *since* (trio time), or is
        being closed (then waited for)."""
        if self._closes.count:
            await self._closes.wait_none()
            return True
        return self.closed_at >= since

    def attach(self, fd: int) -> None:
        """Take *fd*, open on this version, unless it has one, nobody holds a pin, or the
        version is retired."""
        if self.fd is None and self._pins > 0 and not self.retired:
            self.fd = fd
            self.opened_at = trio.current_time()
        else:
            self.close_counted(fd)

    async def lower_fd(self) -> int:
        """An fd open on this version, for a caller holding a pin; opens one if need be."""
        async with self._opening:
            self._refuse_if_retired()
            if self.fd is None:
                fd, ident = await self._source.open(self.ident.path)
                if ident.key() != self.key:
                    self.close_counted(fd)
                    raise LowerError(f"{self.display} changed on the lower mount since it "
                                     "was opened")
                self.attach(fd)
        self._refuse_if_retired()
        assert self.fd is not None, "lower_fd without a pin"
        return self.fd

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[int]:
        """The fd (`lower_fd`), counted as in use by a read until the block ends (`retire`
        waits for it)."""
        fd = await self.lower_fd()
        self._reads.start()
        try:
            yield fd
        finally:
            self._reads.end()

    async def retire(self) -> None:
        """This version was replaced below: read nothing there any more, and close the fd
        once the reads under way end, pins or not (`closed_since` waits for the close).

        s3fs and ossfs hand every open of a path what an fd still open on it loaded,
        while the open's stat is already the new version's: a handle still on the
        old version (a mapped model) would have the new version read as the old.
        Its later cache misses fail (LowerError): the old bytes are gone below.
        A read the source gave up on (its timeout) may still be in its thread, and
        keep the file open below after the close; the source is unhealthy then,
        and refuses opens until it answers again.
        """
        self.retired = True
        async with self._opening:  # an open under way in lower_fd attaches first
            await self._reads.wait_none()  # and no read starts now: lower_fd refuses
            if self.fd is not None:
                fd, self.fd = self.fd, None
                self.close_counted(fd)

    def _refuse_if_retired(self) -> None:
        if self.retired:
            raise LowerError(f"{self.display} was replaced on the lower mount; this version "
                             "is no longer there to read")


class Pin:
    """One pin on a LowerFile, taken when this is made; whoever holds this object releases it.

    `with pin as f:` releases it when the block ends; `give()` hands it to a
    callee that unpins the file itself when it is done (`BlockCache.fill`).
    """

    __slots__ = ("file", "_held")

    def __init__(self, file: LowerFile) -> None:
        file.pin()
        self.file = file
        self._held = True

    def release(self) -> None:
        assert self._held, "a pin released twice, or after it was given away"
        self._held = False
        self.file.unpin()

    def give(self) -> LowerFile:
        """The file, whose pin the caller hands to a callee that unpins it; held no more here."""
        assert self._held, "a pin given away twice, or after it was released"
        self._held = False
        return self.file

    def __enter__(self) -> LowerFile:
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
