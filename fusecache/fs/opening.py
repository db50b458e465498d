"""Opening the current version of a file, served from the version opened last when late."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Hashable, Sequence
from functools import partial

import trio

from fusecache.fs.answers import Asking, KnownAnswers, log_no_answer, unavailable
from fusecache.fs.keptfds import KeptFds
from fusecache.fs.lowerfile import LowerFile, Pin
from fusecache.fs.pagecache import PageCache
from fusecache.fs.versions import Versions
from fusecache.source_api import Identity, Source, SourceUnavailable, Version

log = logging.getLogger(__name__)


class Opener:
    """Opens the current version of each file, and notes each version the lower mount shows.

    When the lower mount has no answer in time (see KnownAnswers), the version
    opened last is served, unless a stat has shown a newer one since. A file
    found changed has its old version dropped: the kernel's pages through
    *pagecache*, and through each of *forget* (called with the old version's
    key) what else is kept by version: the cache's blocks, read-once state.
    A lower fd nobody holds stays open as long as *kept* keeps it (fs/keptfds.py).
    """

    def __init__(
        self,
        source: Source,
        nursery: trio.Nursery,
        answers: KnownAnswers,
        pagecache: PageCache,
        versions: Versions,
        forget: Sequence[Callable[[Hashable], None]],
        kept: KeptFds,
    ) -> None:
        self._source = source
        self._nursery = nursery
        self._answers = answers
        self._pagecache = pagecache
        self._versions = versions
        self._forget = tuple(forget)
        self.kept = kept
        self._opening: dict[int, trio.Lock] = {}  # one open below per inode at a time

    def note_version(self, ino: int, path: bytes, version: Version) -> None:
        """Record the lower file's version; on a change drop the kernel's pages of it.

        Our own blocks are keyed by identity, so a changed file never matches
        them; open() deletes the old version's blocks.
        """
        old = self._versions.show(ino, version)
        if old is None or old == version:
            return
        log.info("%s changed on the lower mount; dropping cached data", os.fsdecode(path))
        self._pagecache.invalidate_soon(ino)

    async def open(self, ino: int, path: bytes) -> tuple[Pin, bool]:
        """The file *ino* (at *path*) as the lower mount has it now, and a pin on it for the caller.

        Also says whether it changed since it was last opened; the old
        version's blocks, interest and digest are dropped then.
        """
        known = self._versions.opened(ino)
        if known is None or self._versions.shown(ino) != known.ident.version:
            fd, ident = await self._open_lower(ino, path)
            return await self._adopt(ino, fd, ident)
        asking = self._answers.asking(("open", ino), partial(self._reopen, ino, path))
        if await self._answers.wait_fresh(asking):  # a pin was reserved for us, if it went well
            if asking.error is None:
                pins, changed = asking.result
                return pins.pop(), changed
            if not unavailable(asking.error):
                err = asking.error
                raise OSError(getattr(err, "errno", errno.EIO), str(err))
        self._answers.served_stale()
        return Pin(known), False

    async def _reopen(self, ino: int, path: bytes, asking: Asking) -> None:
        """Open the lower file for open()'s askers: one pin for each still waiting."""
        try:
            fd, ident = await self._open_lower(ino, path)
            pin, changed = await self._adopt(ino, fd, ident)
            with pin as lower:
                asking.result = ([Pin(lower) for _ in range(asking.waiters)], changed)
        except Exception as exc:  # a background task: nothing may escape into the nursery
            asking.error = exc
            log_no_answer(f"{os.fsdecode(path)}: no fresh open", exc)

    async def _open_lower(self, ino: int, path: bytes) -> tuple[int, Identity]:
        """Open the lower file, never on what an older version's kept fd left loaded below.

        s3fs and ossfs hand an open the state they hold for a path still open, pages
        and all, while its stat may already be the new version's: those pages would
        be cached as the new version's. So when the open shows a new version and the
        old one's fd is open below (kept, fs/keptfds.py, or held by a handle still on
        the old version, which then reads nothing more below: `LowerFile.retire`),
        or was closed while this open was under way, that fd and the fresh one are
        closed, within the source's timeout, and the file opened again on a clean
        slate. Opens of one inode take turns here, so no fresh fd of another open of
        it can be open below while it is opened again.
        """
        if not self._source.shares_open_state:
            return await self._source.open(path)
        lock = self._opening.setdefault(ino, trio.Lock())
        try:
            async with lock:
                return await self._open_lower_alone(ino, path)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._opening.pop(ino, None)

    async def _open_lower_alone(self, ino: int, path: bytes) -> tuple[int, Identity]:
        started = trio.current_time()
        fd, ident = await self._source.open(path)
        current = self._versions.opened(ino)
        if current is None or current.key == ident.key():
            return fd, ident
        handed = False  # *fd* is the old version's to close
        with trio.move_on_after(self._source.timeout) as waiting:
            if not await self.kept.drop(current, since=started):
                return fd, ident
            # It shares the old version's state below: closed as one of the old
            # version's fds, so an open that comes after this one gave up waits too.
            current.close_counted(fd)
            handed = True
            await current.closed_since(started)
        if waiting.cancelled_caught:
            if not handed:
                current.close_counted(fd)
            raise SourceUnavailable(f"{os.fsdecode(path)}: closing the old version took "
                                    f"longer than {self._source.timeout:g} s")
        return await self._source.open(path)

    async def _adopt(self, ino: int, fd: int, ident: Identity) -> tuple[Pin, bool]:
        """Make *ident*, just opened as *fd*, the current version of *ino*; return a pin on it.

        Compared with the version last opened, whose pages the kernel may hold
        and whose blocks we hold; this also catches a change of etag alone.
        """
        self.note_version(ino, ident.path, ident.version)
        current = self._versions.opened(ino)
        changed = current is not None and current.key != ident.key()
        if changed:
            assert current is not None
            for forget in self._forget:
                forget(current.key)
        if current is not None and not changed:
            lower = current
        else:
            lower = LowerFile(ident, self._source, self._nursery, self.kept)
            # From here on, no store of an older version starts.
            self._versions.set_opened(ino, lower)
        pin = Pin(lower)
        lower.attach(fd)
        if changed:  # and none is still under way when the kernel, told, drops its pages
            await self._pagecache.wait_stores()
        return pin, changed
