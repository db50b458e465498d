"""Lower fds kept open a while after their last reader, for the lower mount's sake.

s3fs and ossfs keep what they fetched for a file only while it is open, and
fetch far more than asked: a 1 MiB read at a new place loads 50 MiB there
(multipart_size x parallel_count), and the last close drops it. A loader opens a
model once for its header and again to map it, within milliseconds; closing the
lower fd in between made the store send those 50 MiB again (docs/design.md,
"Lower fds kept open a while").

The protocol, with LowerFile (fs/lowerfile.py):
- A file is in `_since` exactly while it has no pin and an open fd. Its last
  unpin calls `idle()`; a pin taken again calls `busy()` before anything uses the
  fd (`Pin` pins in its constructor, before `attach` or `lower_fd`).
- An idle fd closes *linger* seconds after its last unpin; at once when more
  than *most* are idle (the one idle longest first: the daemon's fd limit), when
  it has been open *max_age* already, so a file reopened every few seconds
  does not keep one fd, and the lower mount's view of it, forever (s3fs answers
  stat from its cache while the file is open), and when the cache holds every
  block of the file: nothing more is wanted from below, and what s3fs and ossfs
  keep for an open file grows to the file's size, in a temporary file whose pages
  stay dirty (seven 800 MB models hashed in a row left 2.2 GB of them, and the
  kernel began writing them to disk). A block lost after that (evicted with no
  room on disk, a failed write or checksum) makes the next fetch open the file
  again (`LowerFile.lower_fd`).
- A new version must not inherit the old one's loaded pages: s3fs and ossfs hand
  an open the state already held for that path, whose pages then pass for the
  new version's. `drop()` closes the old version's fd, kept or still in use by a
  handle (`LowerFile.retire`), and waits, before the opener trusts an open of the
  new one (fs/opening.py); it also tells the opener when that fd was closed in
  the background while the open was under way.
- At unmount `close_all()` closes what is left; a cancelled wait leaves the fds
  to the process's exit.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from fusecache.fs.lowerfile import LowerFile
from fusecache.source_api import Source


class KeptFds:
    """The idle lower fds, oldest first, and the task that closes them when their time is up.

    *linger* 0 closes each at its last unpin (the object-store source: its fds
    hold no connection and nothing loaded). *held_whole* says whether the cache
    holds every block of a file, which then closes at its last unpin too.
    """

    def __init__(self, nursery: trio.Nursery, source: Source, linger: float, most: int,
                 max_age: float, held_whole: Callable[[LowerFile], bool] = lambda f: False
                 ) -> None:
        self._nursery = nursery
        self._source = source
        self._linger = linger
        self._most = most
        self._max_age = max_age
        self._held_whole = held_whole
        self._since: dict[LowerFile, float] = {}  # idle since (trio time), oldest first
        self._closing = False  # _close_when_due runs

    def __len__(self) -> int:
        return len(self._since)

    def idle(self, f: LowerFile) -> None:
        """*f* lost its last pin, with its fd open."""
        now = trio.current_time()
        if self._linger <= 0 or now - f.opened_at >= self._max_age or self._held_whole(f):
            f.close_idle()
            return
        self._since[f] = now
        while len(self._since) > self._most:
            oldest = next(iter(self._since))
            del self._since[oldest]
            oldest.close_idle()
        if not self._closing:
            self._closing = True
            self._nursery.start_soon(self._close_when_due)

    def busy(self, f: LowerFile) -> None:
        """*f* is pinned again: its fd is in use, not idle."""
        self._since.pop(f, None)

    async def drop(self, f: LowerFile, since: float) -> bool:
        """*f* was replaced below: close its fd, kept or in use (`LowerFile.retire`), and
        wait for the lower mount; whether an fd of *f* was open below at any time since
        *since* (trio time, when the caller's open began), so that open may share what
        it had loaded.

        True too for a close already under way in the background (waited for) or one
        that ended after *since*: at its last release, an fd that is not kept closes
        in the background, and a loader opens again within milliseconds.
        """
        self._since.pop(f, None)
        await f.retire()
        return await f.closed_since(since)

    async def close_all(self) -> None:
        """Close every kept fd and wait (at unmount)."""
        while self._since:
            f = next(iter(self._since))
            del self._since[f]
            fd = f.take_idle_fd()
            if fd is not None:
                await self._source.close(fd)

    async def _close_when_due(self) -> None:
        # The first entry is the oldest, so its time is up first.
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
