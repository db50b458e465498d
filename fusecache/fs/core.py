"""The read-only filesystem the kernel talks to: inodes, attributes, listings, opens and reads.

Imports no pyfuse3: tests call it directly. It builds its own rooms (the
known answers, the page cache, the versions, read-once) over the source and the
cache it is given.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from itertools import count

import trio

from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache
from fusecache.config import ReadaheadConfig, SourceConfig
from fusecache.errors import FsError
from fusecache.fs.answers import KnownAnswers
from fusecache.fs.keptfds import KeptFds
from fusecache.fs.lowerfile import LowerFile, Pin
from fusecache.fs.opening import Opener
from fusecache.fs.pagecache import PageCache
from fusecache.fs.readonce import SHA256_XATTR, ReadOnce
from fusecache.fs.stats import daemon_counters
from fusecache.fs.versions import Versions
from fusecache.fs.warming import WARM_XATTR, Warming
from fusecache.readahead import SequentialStream
from fusecache.source_api import Source, version_of

ROOT_INODE = 1  # the FUSE protocol's fixed root inode
# `getfattr -n user.fusecache.stats MOUNTPOINT` prints the daemon's counters as JSON.
STATS_XATTR = b"user.fusecache.stats"


@dataclass(frozen=True)
class Attr:
    """The attributes the kernel is given for one inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass
class Handle:
    """One open() of a file by the kernel; it holds its pin on the file until release()."""

    ino: int
    pin: Pin
    stream: SequentialStream
    # The kernel keeps what it reads for this handle in its page cache (all
    # but O_DIRECT opens), so the cache need not keep a copy in memory.
    kernel_keeps: bool = True
    last_read: float = float("-inf")  # trio.current_time() of its last read

    @property
    def file(self) -> LowerFile:
        return self.pin.file


class FilesystemCore:
    """Lookups, attributes, directory listings and reads, all read-only.

    *invalidate* is called (in a worker thread) with an inode number whose
    kernel page cache must be dropped because the lower file changed.
    *store* (inode, offset, data), called in a worker thread, puts data in the
    kernel's page cache of an inode (FUSE notify_store); None: never. *lower*
    gives the fills' parallel fetches and how lower fds are kept open.

    Every question to the lower mount goes through the known answers
    (fs/answers.py), and every open through the opener (fs/opening.py), so
    cached files stay readable while the lower mount hangs or is gone.
    """

    def __init__(
        self,
        source: Source,
        cache: BlockCache,
        nursery: trio.Nursery,
        invalidate: Callable[[int], None] = lambda ino: None,
        readahead: ReadaheadConfig | None = None,
        store: Callable[[int, int, Block], None] | None = None,
        lower: SourceConfig | None = None,
    ) -> None:
        lower = lower or SourceConfig()
        self.readahead = readahead or ReadaheadConfig()
        self.source = source
        self.cache = cache
        self.versions = Versions()
        self.answers = KnownAnswers(source, nursery)
        self.pagecache = PageCache(nursery, cache.block_size, invalidate,
                                   store if self.readahead.feed_page_cache else None,
                                   self.versions.is_current, self._followed)
        self.readonce = ReadOnce(self.readahead, cache, lower.readahead_threads, nursery,
                                 self.pagecache, cache.disk)
        self.opener = Opener(source, nursery, self.answers, self.pagecache, self.versions,
                             forget=(cache.forget_file, self.readonce.forget),
                             kept=KeptFds(nursery, source, lower.keep_open,
                                          lower.keep_open_files, lower.keep_open_max,
                                          cache.holds_all))
        self.warming = Warming(self.opener, self.versions, self.readonce, cache, nursery,
                               source.timeout)
        self._path_of: dict[int, bytes] = {ROOT_INODE: b""}
        self._ino_of: dict[bytes, int] = {b"": ROOT_INODE}
        # Inode numbers stay fixed for a path for the life of the mount; the
        # table is never trimmed (a model tree has thousands of names, not billions).
        self._next_ino = count(ROOT_INODE + 1)
        self._handles: dict[int, Handle] = {}
        self._dir_listings: dict[int, list[tuple[bytes, Attr]]] = {}
        self._next_fh = count(1)
        self.read_requests = 0  # reads that reached the daemon (kernel page-cache misses)

    # --- names and attributes -------------------------------------------

    def path_of(self, ino: int) -> bytes:
        try:
            return self._path_of[ino]
        except KeyError:
            raise FsError(errno.ESTALE, f"unknown inode {ino}") from None

    def _ino_for(self, path: bytes) -> int:
        ino = self._ino_of.get(path)
        if ino is None:
            ino = next(self._next_ino)
            self._ino_of[path] = ino
            self._path_of[ino] = path
        return ino

    def _attr(self, ino: int, st: os.stat_result) -> Attr:
        return Attr(
            ino=ino,
            # Read-only: the kernel then refuses writes before they reach us.
            mode=st.st_mode & ~0o222,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=st.st_size,
            blksize=self.cache.block_size,
            blocks=st.st_blocks,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    async def _stat(self, path: bytes) -> os.stat_result:
        return await self.answers.answer(("stat", path), lambda: self._fresh_stat(path))

    async def _fresh_stat(self, path: bytes) -> os.stat_result:
        st = await self.source.lstat(path)
        if stat.S_ISREG(st.st_mode):
            self.opener.note_version(self._ino_for(path), path, version_of(st))
        return st

    async def end_page_cache_calls(self, grace: float) -> None:
        """Store into or invalidate the kernel's page cache no more: the session closes."""
        await self.pagecache.end_calls(grace)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        parent_path = self.path_of(parent)
        path = parent_path + b"/" + name if parent_path else name
        st = await self._stat(path)
        return self._attr(self._ino_for(path), st)

    async def getattr(self, ino: int) -> Attr:
        return self._attr(ino, await self._stat(self.path_of(ino)))

    async def readlink(self, ino: int) -> bytes:
        path = self.path_of(ino)
        return await self.answers.answer(("readlink", path), lambda: self.source.readlink(path))

    async def opendir(self, ino: int) -> int:
        """Snapshot a directory's entries with attributes; return a handle for readdir."""
        path = self.path_of(ino)
        names = sorted(await self.answers.answer(("listdir", path),
                                                 lambda: self.source.listdir(path)))
        entries = []
        for name in names:
            child = path + b"/" + name if path else name
            try:
                st = await self._stat(child)
            except FileNotFoundError:
                continue  # removed between listing and stat
            entries.append((name, self._attr(self._ino_for(child), st)))
        fh = next(self._next_fh)
        self._dir_listings[fh] = entries
        return fh

    def readdir(self, fh: int, start: int) -> list[tuple[bytes, Attr]]:
        """Entries from position *start* of an opened directory."""
        return self._dir_listings[fh][start:]

    def releasedir(self, fh: int) -> None:
        self._dir_listings.pop(fh, None)

    async def statfs(self) -> os.statvfs_result:
        return await self.answers.answer(("statfs",), self.source.statvfs)

    async def close_kept_fds(self) -> None:
        """Close the lower fds kept open after their last reader (fs/keptfds.py), and wait."""
        await self.opener.kept.close_all()

    async def wait_idle(self) -> None:
        """Return once no block is on its way and no whole-file fill or hash is under way."""
        await self.readonce.passes.wait_idle()

    def statistics(self) -> dict[str, int]:
        """Every counter of the daemon, flat, for stats output."""
        return daemon_counters(self.read_requests, self.source, self.cache,
                               self.readonce.passes, self.answers,
                               fed_bytes=self.pagecache.fed_bytes)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self.statistics()).encode()
        if name == SHA256_XATTR:
            return (await self._sha256_of(ino)).encode()
        if name == WARM_XATTR:  # `fusecache warm`: starts a whole-file fetch, says how far
            return await self.warming.progress(ino, self.path_of(ino))
        path = self.path_of(ino)
        return await self.answers.answer(("xattr", path, name),
                                         lambda: self.source.getxattr(path, name))

    async def listxattr(self, ino: int) -> list[bytes]:
        path = self.path_of(ino)
        names = list(await self.answers.answer(("xattrs", path),
                                               lambda: self.source.listxattr(path)))
        if await self._known_sha256(ino) is not None:
            names.append(SHA256_XATTR)
        if ino == ROOT_INODE:  # so `getfattr -d MOUNTPOINT` finds the stats
            names.append(STATS_XATTR)
        return names

    async def _known_sha256(self, ino: int) -> str | None:
        """The file's sha256 if it was computed for the version the lower mount has now."""
        lower = self.versions.opened(ino)
        digest = None if lower is None else self.readonce.digest(lower.key)
        if lower is None or digest is None:
            return None
        st = await self._stat(self.path_of(ino))
        return digest if version_of(st) == lower.ident.version else None

    async def _sha256_of(self, ino: int) -> str:
        """The sha256 of the file as the lower mount has it now, hashing it if nobody has."""
        if self.versions.shown(ino) is None:  # only regular files have their version noted
            raise FsError(errno.ENODATA)
        pin, _ = await self.opener.open(ino, self.path_of(ino))
        with pin as f:
            return await self.readonce.sha256(ino, f)

    # --- files ------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file for reading; return (fh, keep_cache).

        keep_cache is False when the lower file changed since the kernel cached
        its pages: the kernel then drops them itself.
        """
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        pin, changed = await self.opener.open(ino, self.path_of(ino))
        fh = next(self._next_fh)
        # Read-ahead reaches only as far as the cache can hold blocks for a reader
        # that has not come yet, even when the file is bigger than the cache.
        stream = SequentialStream(self.readahead, self.cache.config.readahead_reach,
                                  unit=self.cache.config.fetch_bytes)
        self._handles[fh] = Handle(ino, pin, stream, kernel_keeps=not flags & os.O_DIRECT)
        return fh, not changed

    async def read(self, fh: int, offset: int, size: int) -> Block:
        handle = self._handle(fh)
        handle.last_read = trio.current_time()
        self.read_requests += 1
        f = handle.file
        opened = self.versions.opened(handle.ino)
        if (self.versions.shown(handle.ino) != f.ident.version
                or (opened is not None and opened.key != f.key)):
            # The file changed on the lower mount since this handle opened it. Our
            # answer would be the old version's, and the kernel keeps it in the
            # inode's page cache, which newer handles read too; past the old end it
            # would fill the rest with zeros. So the reader gets EIO and opens again.
            # A newer open may see a change the version does not show (an ETag).
            raise FsError(errno.EIO, f"{f.display} changed on the lower mount since this "
                          "handle opened it")
        ahead = handle.stream.on_read(offset, size)
        if ahead is not None:
            self.cache.prefetch(f, *ahead, kernel_keeps=handle.kernel_keeps)
        # An O_DIRECT reader would not look in the page cache for what is fed.
        self.readonce.on_read(handle.ino, f, offset, size, feed=handle.kernel_keeps)
        # A random reader's reads move their pages only. From an object store a
        # GET moves what it asks for; from s3fs a block's 1 MiB took longer than
        # its pages (random 4 KiB reads, 512 MiB, 400 MB/s: 0.77x the plain
        # mount's rate with whole blocks, 0.95x with pages).
        return await self.cache.read(f, offset, size, kept=handle.kernel_keeps,
                                     pages_only=handle.stream.random)

    def _followed(self, file_key: Hashable, offset: int) -> bool:
        """Whether a reader streams through the file version and will ask for *offset* itself.

        Only a handle that read lately: one left open after its last read asks for nothing.
        """
        lately = trio.current_time() - self.readahead.streaming_idle
        return any(h.last_read >= lately and h.kernel_keeps and h.file.key == file_key
                   and h.stream.heading_for(offset) for h in self._handles.values())

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.pin.release()

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

