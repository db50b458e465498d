"""The lower mount: a directory tree whose every call runs in a worker thread, within a time limit.

The timeout, the unhealthy state and the probe are TimedCalls' (timedcalls.py).
"""

from __future__ import annotations

import logging
import os
from functools import partial

import trio

from fusecache.blockio import Block, BlockPool
from fusecache.config import SourceConfig
from fusecache.errors import LowerError
from fusecache.source_api import (
    Identity,
    SourceStatistics,
    SourceUnavailable,
    Version,
    version_of,
)
from fusecache.threads import ThreadPolicy
from fusecache.timedcalls import TimedCalls

log = logging.getLogger(__name__)

ETAG_XATTRS = (b"user.etag", b"user.s3.etag", b"user.oss.etag")

# The types the core speaks, here too for those who import them from the source.
__all__ = ["ETAG_XATTRS", "Identity", "LowerSource", "SourceStatistics", "SourceUnavailable",
           "Version", "version_of"]


class LowerSource(TimedCalls):
    """A directory tree (usually an object-store FUSE mount) read in worker threads.

    Paths are bytes relative to the root, b"" being the root itself, so names
    with any bytes work. `run()` must be running (in the owner's nursery) for
    an unhealthy source to become healthy again.
    """

    # s3fs and ossfs share one state per path among its open fds (source_api.Source).
    shares_open_state = True

    def __init__(self, root: os.PathLike[str] | str, config: SourceConfig | None = None,
                 threads: ThreadPolicy | None = None):
        config = config or SourceConfig()
        super().__init__(config, threads or ThreadPolicy(config), "the lower mount")
        self.root = os.fsencode(os.path.abspath(root))

    def full(self, path: bytes) -> bytes:
        return self.root + b"/" + path if path else self.root

    async def lstat(self, path: bytes) -> os.stat_result:
        return await self._meta(os.lstat, self.full(path))

    async def listdir(self, path: bytes) -> list[bytes]:
        return await self._meta(os.listdir, self.full(path))

    async def readlink(self, path: bytes) -> bytes:
        return await self._meta(os.readlink, self.full(path))

    async def statvfs(self) -> os.statvfs_result:
        return await self._meta(os.statvfs, self.root)

    async def getxattr(self, path: bytes, name: bytes) -> bytes:
        return await self._meta(_getxattr, self.full(path), name)

    async def listxattr(self, path: bytes) -> list[bytes]:
        return await self._meta(_listxattr, self.full(path))

    async def open(self, path: bytes) -> tuple[int, Identity]:
        """Open a lower file for reading; return its fd and current identity."""
        full = self.full(path)
        return await self._call(self._metadata, partial(_open_and_close, full),
                                _open_file, full, path, discard=_close_opened)

    async def close(self, fd: int) -> None:
        """Close a lower fd, however long the lower mount takes (never fails fast)."""
        await trio.to_thread.run_sync(_close_fd, fd, limiter=self._closer,
                                      abandon_on_cancel=True)

    async def read_blocks(
        self, pool: BlockPool, fd: int, offset: int, sizes: list[int], expect: Identity,
        readahead: bool = False,
    ) -> list[Block]:
        """Consecutive blocks at *offset*, filled by *pool*; short files give short blocks.

        Raises LowerError if the file, after the read, is no longer the version
        *expect*: the bytes may be the new version's, and must not be cached as
        the old one's. Read-ahead has its own limiter, so it can never take the
        threads a reader who is waiting needs.
        """
        limiter = self._readahead if readahead else self._demand
        probe = partial(_read_one_byte, self.full(expect.path), offset)
        blocks, version = await self._call(limiter, probe, _read_checked, pool, fd, offset, sizes)
        if version != expect.version:
            raise LowerError(f"{os.fsdecode(expect.path)} changed on the lower mount while it "
                             f"was read")
        return blocks


def _read_checked(pool: BlockPool, fd: int, offset: int, sizes: list[int]
                  ) -> tuple[list[Block], Version]:
    blocks = pool.read(fd, offset, sizes)
    return blocks, version_of(os.fstat(fd))


def _open_file(full: bytes, path: bytes) -> tuple[int, Identity]:
    fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        etag = None
        for name in ETAG_XATTRS:
            try:
                etag = os.getxattr(fd, name)
                break
            except OSError:
                continue
    except BaseException:
        os.close(fd)
        raise
    return fd, Identity(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, etag)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # the fd is gone all the same; only the flush failed
        log.debug("closing a lower fd: %s", exc)


def _close_opened(opened: tuple[int, Identity]) -> None:
    """Close what an open gave after its caller left: never a leaked fd below."""
    _close_fd(opened[0])


def _open_and_close(full: bytes) -> None:
    os.close(os.open(full, os.O_RDONLY | os.O_CLOEXEC))


def _read_one_byte(full: bytes, offset: int) -> None:
    fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.pread(fd, 1, offset)
    finally:
        os.close(fd)


def _getxattr(path: bytes, name: bytes) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def _listxattr(path: bytes) -> list[bytes]:
    return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
