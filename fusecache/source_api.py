"""What the filesystem core needs of a source: the `Source` protocol and the types it speaks.

Two sources provide it: the directory source (source.py, usually over an
object-store FUSE mount) and the object-store source (objectstore/), which reads
a bucket directly. Both run their blocking calls through `TimedCalls`
(timedcalls.py), so a hung store is EIO within the source timeout for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from fusecache.blockio import Block, BlockPool
from fusecache.errors import LowerError


class SourceUnavailable(LowerError):
    """The source did not answer in time, or is known not to be answering."""


Version = tuple[int, int, int]  # (size, mtime_ns, ctime_ns) as a stat shows them


def version_of(st: os.stat_result) -> Version:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Identity:
    """What makes cached bytes of a source file valid: any change means new content."""

    path: bytes
    size: int
    mtime_ns: int
    ctime_ns: int
    etag: bytes | None

    def key(self) -> tuple[object, ...]:
        # The inode number is not part of it: s3fs and ossfs (high-level libfuse)
        # hand out a new one whenever the kernel forgets the node, e.g. after
        # drop_caches (measured: 2 -> 3 for an unchanged object), which would make
        # every cached block unreachable. A rewritten object gets a new mtime; a
        # file rewritten in place with its old mtime put back still gets a new
        # ctime, which nobody can set back; a replaced object gets a new ETag.
        return (self.path, self.size, self.mtime_ns, self.ctime_ns, self.etag)

    @property
    def version(self) -> Version:
        return (self.size, self.mtime_ns, self.ctime_ns)


@dataclass(frozen=True)
class SourceStatistics:
    healthy: bool
    timeouts: int  # calls that got no answer in time
    failed_fast: int  # calls refused at once while the source was unhealthy
    abandoned_threads: int  # threads still stuck in the source after their caller left


class Source(Protocol):
    """A read-only tree the core serves: paths are bytes relative to its root, b"" the root.

    Every call is bounded by the source timeout (SourceUnavailable after it);
    `run()` must be running in the owner's nursery for an unhealthy source to
    become healthy again. Files are opened to an fd-like handle and an Identity;
    `read_blocks` refuses (LowerError) bytes that are no longer *expect*'s.
    """

    timeout: float
    stale_after: float
    # Whether an open of a path is handed what an fd still open on it loaded, under
    # the path's current stat (s3fs and ossfs: fs/opening.py must close the old
    # version's fds before it reads a new one), or not (the object store).
    shares_open_state: bool

    @property
    def healthy(self) -> bool: ...
    def answering(self, within: float) -> bool: ...
    def statistics(self) -> SourceStatistics: ...
    async def run(self) -> None: ...
    async def lstat(self, path: bytes) -> os.stat_result: ...
    async def listdir(self, path: bytes) -> list[bytes]: ...
    async def readlink(self, path: bytes) -> bytes: ...
    async def statvfs(self) -> os.statvfs_result: ...
    async def getxattr(self, path: bytes, name: bytes) -> bytes: ...
    async def listxattr(self, path: bytes) -> list[bytes]: ...
    async def open(self, path: bytes) -> tuple[int, Identity]: ...
    async def close(self, fd: int) -> None: ...
    async def read_blocks(self, pool: BlockPool, fd: int, offset: int, sizes: list[int],
                          expect: Identity, readahead: bool = False) -> list[Block]: ...
