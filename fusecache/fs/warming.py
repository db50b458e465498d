"""Warming: the whole-file fetches `fusecache warm` asks for, and how far each has come.

`fusecache warm` reads the xattr user.fusecache.warm of each file. The first
ask starts the file's whole-file fill, the one read-once uses (fs/readonce.py
`ReadOnce.fill`), so each block comes from below once, into the cache and the
kernel's page cache, and nothing crosses into the asking process. Every ask
answers at once, with the progress as JSON, so the asker polls and no request
waits on a fill. A fill always ends: each of its reads from below is bounded by
--source-timeout (source.py), and a fill stops at its first error.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass

import trio

from fusecache.cache.blocks import BlockCache
from fusecache.errors import FsError
from fusecache.fs.lowerfile import LowerFile, Pin
from fusecache.fs.opening import Opener
from fusecache.fs.readonce import ReadOnce
from fusecache.fs.versions import Versions

log = logging.getLogger(__name__)

WARM_XATTR = b"user.fusecache.warm"
# A fill that ends with blocks missing lost them to the cache (its disk writers
# fell behind and dropped them, or memory was full); once more brings back what
# was dropped, a second loss means the cache cannot keep the file.
FILLS = 2
# An ended warm answers as such for this long, then is forgotten: os.getxattr asks
# twice (the size, then the value), and the asker's next poll comes within 0.2 s.
# The next `fusecache warm` after that looks at the cache again.
ENDED_KEPT = 2.0


@dataclass
class _Warm:
    """One file version being warmed."""

    size: int
    blocks: int
    counted: int = 0  # blocks [0, counted) were found here; fills go in file order
    error: str | None = None
    ended: float | None = None  # when it ended (trio.current_time)


class Warming:
    """The warms under way, by file version, each a task that owns a pin on its file."""

    def __init__(self, opener: Opener, versions: Versions, readonce: ReadOnce,
                 cache: BlockCache, nursery: trio.Nursery, timeout: float) -> None:
        self._opener = opener
        self._versions = versions
        self._readonce = readonce
        self._cache = cache
        self._nursery = nursery
        self._timeout = timeout
        self._warms: dict[Hashable, _Warm] = {}
        self._forgotten_at = -math.inf

    async def progress(self, ino: int, path: bytes) -> bytes:
        """Start warming the file *ino* unless it is under way; its progress as JSON.

        An ended warm is reported for ENDED_KEPT seconds, then forgotten: a later
        ask (the next `fusecache warm`) looks at the cache again, and fills what
        is missing.
        """
        if self._versions.shown(ino) is None:  # only regular files have their version noted
            raise FsError(errno.ENODATA)
        self._forget_ended()
        pin, _ = await self._opener.open(ino, path)
        f = pin.file
        warm = self._warms.get(f.key)
        if warm is None:
            warm = self._warms[f.key] = _Warm(f.size, self._cache.block_count(f))
            # The task takes the pin; it counts as under way (stats, wait_idle).
            self._readonce.passes.start_soon(self._nursery, self._warm, ino, pin, warm)
        else:
            pin.release()
        self._count(f, warm)
        state = "failed" if warm.error else "warming" if warm.ended is None else "cached"
        return json.dumps({"state": state, "size": warm.size,
                           "cached": min(warm.counted * self._cache.block_size, warm.size),
                           "error": warm.error, "timeout": self._timeout}).encode()

    def _forget_ended(self) -> None:
        """Forget the warms that ended over ENDED_KEPT s ago (a look each ENDED_KEPT s)."""
        now = trio.current_time()
        if now - self._forgotten_at < ENDED_KEPT:
            return
        self._forgotten_at = now
        for key, warm in list(self._warms.items()):
            if warm.ended is not None and now - warm.ended > ENDED_KEPT:
                del self._warms[key]

    def _count(self, f: LowerFile, warm: _Warm) -> None:
        """Move the count over the blocks now here, from where it stopped."""
        while warm.counted < warm.blocks and self._cache.holds(f, warm.counted):
            warm.counted += 1

    async def _warm(self, ino: int, pin: Pin, warm: _Warm) -> None:
        """Fill the pinned file until every block is here, or say why not; releases the pin."""
        with pin as f:
            try:
                for _ in range(FILLS):
                    if self._missing(f) == 0:
                        return
                    log.info("%s: warming %.0f MB", f.display, f.size / 1e6)
                    warm.error = await self._readonce.fill(ino, Pin(f), feed=True)
                    if warm.error is not None:
                        log.warning("%s: not warmed: %s", f.display, warm.error)
                        return
                missing = self._missing(f)
                if missing:
                    warm.error = (f"the cache did not keep {missing} of its {warm.blocks} "
                                  "blocks: it is too small, or its disk writes fell behind")
            except Exception as exc:  # a bug: this file fails, the daemon serves on
                log.exception("%s: warming failed", f.display)
                warm.error = f"warming failed: {exc!r}"
            finally:
                warm.ended = trio.current_time()
                if warm.error is None:
                    warm.counted = warm.blocks

    def _missing(self, f: LowerFile) -> int:
        return sum(not self._cache.holds(f, idx) for idx in range(self._cache.block_count(f)))
