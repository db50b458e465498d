"""The lower mount: every blocking call on it runs in a worker thread."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from fusecache.blockio import Block, BlockPool
from fusecache.config import SourceConfig

T = TypeVar("T")

ETAG_XATTRS = (b"user.etag", b"user.s3.etag", b"user.oss.etag")


@dataclass(frozen=True)
class Identity:
    """What makes cached bytes of a lower file valid: any change means new content."""

    path: bytes
    size: int
    mtime_ns: int
    etag: bytes | None

    def key(self) -> tuple[object, ...]:
        # The inode number is not part of it: s3fs and ossfs (high-level libfuse)
        # hand out a new one whenever the kernel forgets the node, e.g. after
        # drop_caches (measured: 2 -> 3 for an unchanged object), which would make
        # every cached block unreachable. A rewritten object gets a new mtime.
        return (self.path, self.size, self.mtime_ns, self.etag)


class LowerSource:
    """A directory tree (usually an object-store FUSE mount) read in worker threads.

    Paths are bytes relative to the root, b"" being the root itself, so names
    with any bytes work.
    """

    def __init__(self, root: os.PathLike[str] | str, config: SourceConfig | None = None):
        config = config or SourceConfig()
        self.root = os.fsencode(os.path.abspath(root))
        self._demand = trio.CapacityLimiter(config.demand_threads)
        self._metadata = trio.CapacityLimiter(config.metadata_threads)
        self._readahead = trio.CapacityLimiter(config.readahead_threads)
        self.read_timeout = config.read_timeout

    @property
    def readahead_parallel(self) -> int:
        """How many read-ahead reads of the lower mount may run at once."""
        return int(self._readahead.total_tokens)

    def full(self, path: bytes) -> bytes:
        return self.root + b"/" + path if path else self.root

    async def _meta(self, fn: Callable[..., T], *args: object) -> T:
        # abandon_on_cancel: a hung lower mount must not hold up unmounting.
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._metadata, abandon_on_cancel=True
        )

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
        return await self._meta(self._open_sync, path)

    def _open_sync(self, path: bytes) -> tuple[int, Identity]:
        fd = os.open(self.full(path), os.O_RDONLY | os.O_CLOEXEC)
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
        ident = Identity(path, st.st_size, st.st_mtime_ns, etag)
        return fd, ident

    async def close(self, fd: int) -> None:
        await self._meta(os.close, fd)

    async def read_blocks(
        self, pool: BlockPool, fd: int, offset: int, sizes: list[int], readahead: bool = False
    ) -> list[Block]:
        """Consecutive blocks at *offset*, filled by *pool*; short files give short blocks.

        Read-ahead has its own limiter, so it can never take the threads a
        reader who is waiting needs.
        """
        limiter = self._readahead if readahead else self._demand
        with trio.move_on_after(self.read_timeout):
            return await trio.to_thread.run_sync(
                pool.read, fd, offset, sizes, limiter=limiter, abandon_on_cancel=True
            )
        # The thread is abandoned; it ends whenever the lower mount answers.
        raise TimeoutError(errno.ETIMEDOUT, f"no answer from the lower mount in "
                           f"{self.read_timeout:.0f} s")


def _getxattr(path: bytes, name: bytes) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def _listxattr(path: bytes) -> list[bytes]:
    return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]
