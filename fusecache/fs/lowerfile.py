"""One version of a lower file: its fd, opened again on demand, and the pins that keep it open.

An fd nobody holds stays open a little while (IdleFds): an object-store mount
keeps what it fetched for a file only while the file is open.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from types import TracebackType

import trio

from fusecache.errors import LowerError
from fusecache.source_api import Identity, Source


class LowerFile:
    """One version of a lower file, shared by every handle on it.

    Its fd stays open while a handle or a fetch holds a pin, and a while after
    the last (*idle*, see IdleFds; None: it closes at once), then is closed in a
    worker thread, as the lower mount may block on close. A
    version served from what was last known, while the lower mount is slow or
    gone, has no fd until a fetch needs one: `lower_fd` opens the file again and
    refuses a file that is no longer this version.

    The filesystem holds its pins as `Pin` objects; the block cache, which takes
    any `CachedFile`, calls `pin`/`unpin` itself.
    """

    def __init__(self, ident: Identity, source: Source, nursery: trio.Nursery,
                 idle: IdleFds | None = None):
        self.fd: int | None = None
        self.ident = ident
        self.key: Hashable = ident.key()
        self.size = ident.size
        self.display = os.fsdecode(ident.path)
        self._pins = 0
        self._source = source
        self._nursery = nursery
        self._opening = trio.Lock()
        self._idle = idle

    def pin(self) -> None:
        self._pins += 1
        if self._pins == 1 and self._idle is not None:
            self._idle.busy(self)

    def unpin(self) -> None:
        self._pins -= 1
        assert self._pins >= 0, "unpin without a pin"
        if self._pins == 0 and self.fd is not None:
            if self._idle is None:
                self.close_idle()
            else:
                self._idle.idle(self)

    def close_idle(self) -> None:
        """Close the fd, in the background, if nobody holds a pin (IdleFds' call)."""
        if self._pins == 0 and self.fd is not None:
            fd, self.fd = self.fd, None
            self._nursery.start_soon(self._source.close, fd)

    def attach(self, fd: int) -> None:
        """Take *fd*, open on this version, unless it has one or nobody holds a pin."""
        if self.fd is None and self._pins > 0:
            self.fd = fd
        else:
            self._nursery.start_soon(self._source.close, fd)

    async def lower_fd(self) -> int:
        """An fd open on this version, for a caller holding a pin; opens one if need be."""
        async with self._opening:
            if self.fd is None:
                fd, ident = await self._source.open(self.ident.path)
                if ident.key() != self.key:
                    self._nursery.start_soon(self._source.close, fd)
                    raise LowerError(f"{self.display} changed on the lower mount since it "
                                     "was opened")
                self.attach(fd)
        assert self.fd is not None, "lower_fd without a pin"
        return self.fd


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


class IdleFds:
    """Keeps the fds of lower files nobody holds open for *linger* seconds, at most *most*.

    s3fs and ossfs keep what they fetched for a file only while it is open, and
    fetch far more than asked: a 1 MiB read at a new place loads 50 MiB there
    (multipart_size x parallel_count), dropped at the last close. A loader opens
    a model once for its header and again to map it, so closing at once threw
    away what the header's read had loaded, and the store sent it again (mmap
    of a 512 MiB model: 1.10 file sizes from the server, 1.00 with the fd kept).
    Past *most*, the fd idle longest is closed first (the daemon's fd limit).
    """

    def __init__(self, nursery: trio.Nursery, linger: float, most: int = 64) -> None:
        self._nursery = nursery
        self._linger = linger
        self._most = most
        self._since: dict[LowerFile, float] = {}  # idle since (trio time), oldest first
        self._closing = False  # the task that closes them when their time is up runs

    def __len__(self) -> int:
        return len(self._since)

    def idle(self, f: LowerFile) -> None:
        """*f* lost its last pin, with its fd open."""
        if self._linger <= 0:
            f.close_idle()
            return
        self._since[f] = trio.current_time()
        while len(self._since) > self._most:
            oldest = next(iter(self._since))
            del self._since[oldest]
            oldest.close_idle()
        if not self._closing:
            self._closing = True
            self._nursery.start_soon(self._close_when_due)

    def busy(self, f: LowerFile) -> None:
        """*f* is pinned again: its fd is used, not closed."""
        self._since.pop(f, None)

    async def _close_when_due(self) -> None:
        # The first entry is the oldest: its time is up first. At exit the
        # nursery cancels this, and the process's exit closes what is left.
        try:
            while self._since:
                f, since = next(iter(self._since.items()))
                wait = since + self._linger - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    continue
                del self._since[f]
                f.close_idle()
        finally:
            self._closing = False
