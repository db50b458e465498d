"""The read-only filesystem over the lower mount. Imports no pyfuse3: tests call it directly."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, TypeVar

import trio

from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache
from fusecache.config import ReadaheadConfig
from fusecache.errors import PASSTHROUGH_ERRNOS, FsError, LowerError
from fusecache.readahead import FileInterest, SequentialStream
from fusecache.source import Identity, LowerSource, Version, version_of

log = logging.getLogger(__name__)

T = TypeVar("T")

ROOT_INODE = 1  # the FUSE protocol's fixed root inode
# `getfattr -n user.fusecache.stats MOUNTPOINT` prints the daemon's counters as JSON.
STATS_XATTR = b"user.fusecache.stats"
# The hex sha256 of a file, on the file, once a whole-file fetch has streamed it;
# a tool that asks for it can skip its own hash pass.
SHA256_XATTR = b"user.fusecache.sha256"


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


class LowerFile:
    """One version of a lower file, shared by every handle on it.

    Its fd stays open while a handle or a fetch holds a pin, and is closed (in a
    worker thread, as the lower mount may block on close) after the last. A
    version served from what was last known, while the lower mount is slow or
    gone, has no fd until a fetch needs one: `lower_fd` opens the file again and
    refuses a file that is no longer this version.
    """

    def __init__(self, ident: Identity, source: LowerSource, nursery: trio.Nursery):
        self.fd: int | None = None
        self.ident = ident
        self.key: Hashable = ident.key()
        self.size = ident.size
        self.display = os.fsdecode(ident.path)
        self._pins = 0
        self._source = source
        self._nursery = nursery
        self._opening = trio.Lock()

    def pin(self) -> None:
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1
        assert self._pins >= 0, "unpin without a pin"
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


@dataclass
class _Asking:
    """A question to the lower mount under way; later askers wait for the same answer."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    waiters: int = 0  # open(): pins reserved for askers still waiting
    result: Any = None


@dataclass(frozen=True)
class _Refusal:
    """A known answer that is an error (ENOENT, ENODATA...): served by raising it again."""

    errno: int
    strerror: str


def _unavailable(exc: BaseException) -> bool:
    """Whether *exc* says the lower mount could not answer, rather than what it answered."""
    if isinstance(exc, LowerError):
        return True
    return isinstance(exc, OSError) and exc.errno not in PASSTHROUGH_ERRNOS


def _log_no_answer(what: str, exc: Exception) -> None:
    """Log a background question's failure: the lower mount's are expected, others are bugs."""
    if isinstance(exc, (OSError, FsError)):
        log.debug("%s: %s", what, exc)
    else:
        log.error("%s", what, exc_info=exc)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Handle:
    """One open() of a file by the kernel."""

    ino: int
    file: LowerFile
    stream: SequentialStream
    # The kernel keeps what it reads for this handle in its page cache (all
    # but O_DIRECT opens), so the cache need not keep a copy in memory.
    kernel_keeps: bool = True


class FilesystemCore:
    """Lookups, attributes, directory listings and reads, all read-only.

    *invalidate* is called (in a worker thread) with an inode number whose
    kernel page cache must be dropped because the lower file changed.
    *store* (inode, offset, data), called in a worker thread, puts data in the
    kernel's page cache of an inode (FUSE notify_store); None: never.

    The lower mount's answers (stat, listings, links, xattrs, statfs, which
    version of a file is current) are kept. When the lower mount has no answer
    within `stale_after` seconds, or is known not to be answering, a question
    asked before gets the last answer, and the fresh one, once it comes,
    replaces it: a file found changed then is dropped from every cache, as on
    any change. So cached files stay readable while the lower mount hangs or is
    gone, and nothing waits on it that has been answered before.
    """

    def __init__(
        self,
        source: LowerSource,
        cache: BlockCache,
        nursery: trio.Nursery,
        invalidate: Callable[[int], None] = lambda ino: None,
        readahead: ReadaheadConfig | None = None,
        store: Callable[[int, int, Block], None] | None = None,
    ) -> None:
        self.readahead = readahead or ReadaheadConfig()
        self.source = source
        self.cache = cache
        self._nursery = nursery
        self._invalidate = invalidate
        self._store = store if self.readahead.feed_page_cache else None
        self._stale_after = source.stale_after
        # Held around each store into the page cache and each invalidation of it,
        # so a store of an old version's bytes cannot land after the kernel was
        # told to drop that version's pages (see _feeder).
        self._page_cache_lock = trio.Lock()
        self._path_of: dict[int, bytes] = {ROOT_INODE: b""}
        self._ino_of: dict[bytes, int] = {b"": ROOT_INODE}
        # Inode numbers stay fixed for a path for the life of the mount; the
        # table is never trimmed (a model tree has thousands of names, not billions).
        self._next_ino = count(ROOT_INODE + 1)
        self._version: dict[int, Version] = {}  # ino -> as the lower mount last showed it
        self._open_files: dict[int, LowerFile] = {}  # ino -> newest version opened
        # The lower mount's last answer to each question, and the questions under way.
        self._known: dict[Hashable, Any] = {}
        self._asking: dict[Hashable, _Asking] = {}
        self._stale_answers = 0
        self._interest: dict[Hashable, FileInterest] = {}  # by file version
        self._sha256: dict[Hashable, str] = {}  # by file version
        self._hashing: dict[Hashable, trio.Event] = {}  # by file version: set when it ends
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

    def _note_version(self, ino: int, version: Version) -> None:
        """Record the lower file's version; on a change drop the kernel's pages of it.

        Our own blocks are keyed by identity, so a changed file never matches
        them; open() deletes the old version's blocks.
        """
        old = self._version.get(ino)
        self._version[ino] = version
        if old is None or old == version:
            return
        log.info("%s changed on the lower mount; dropping cached data",
                 os.fsdecode(self._path_of.get(ino, b"?")))
        self._nursery.start_soon(self._invalidate_page_cache, ino)

    async def _answer(self, key: Hashable, ask: Callable[[], Awaitable[T]]) -> T:
        """The lower mount's answer to *ask*, or the last one if it has none in time.

        A question never answered before waits for the lower mount (within its
        timeout). One answered before waits at most `stale_after` seconds, and not
        at all while the lower mount is slow or not answering; the question goes
        on in the background and its answer replaces the known one. A known
        answer may be an error (ENOENT, ENODATA), raised again.
        """
        if key not in self._known:
            try:
                result = await ask()
            except OSError as exc:
                if not _unavailable(exc):
                    self._known[key] = _Refusal(exc.errno or errno.EIO, exc.strerror or "")
                raise
            self._known[key] = result
            return result
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = _Asking()
            self._nursery.start_soon(self._ask, key, ask, asking)
        if self.source.answering(self._stale_after):
            with trio.move_on_after(self._stale_after):
                await asking.done.wait()
        if not asking.done.is_set() or (asking.error is not None
                                        and _unavailable(asking.error)):
            self._stale_answers += 1
        known = self._known[key]
        if isinstance(known, _Refusal):
            raise OSError(known.errno, known.strerror)
        return known  # type: ignore[no-any-return]

    async def _ask(self, key: Hashable, ask: Callable[[], Awaitable[object]],
                   asking: _Asking) -> None:
        try:
            self._known[key] = await ask()
        except Exception as exc:  # a background task: nothing may escape into the nursery
            asking.error = exc
            if isinstance(exc, OSError) and not _unavailable(exc):
                self._known[key] = _Refusal(exc.errno or errno.EIO, exc.strerror or "")
            else:
                _log_no_answer(f"no fresh answer to {key!r}", exc)
        finally:
            del self._asking[key]
            asking.done.set()

    async def _stat(self, path: bytes) -> os.stat_result:
        return await self._answer(("stat", path), lambda: self._fresh_stat(path))

    async def _fresh_stat(self, path: bytes) -> os.stat_result:
        st = await self.source.lstat(path)
        if stat.S_ISREG(st.st_mode):
            self._note_version(self._ino_for(path), version_of(st))
        return st

    async def end_page_cache_calls(self, grace: float) -> None:
        """Store into or invalidate the kernel's page cache no more: the session closes.

        Waits, at most *grace* seconds, for a call under way; one that goes on
        (it would be stuck on a page the kernel holds locked) is logged.
        """
        self._store = None
        self._invalidate = lambda ino: None
        with trio.move_on_after(grace) as waited:
            async with self._page_cache_lock:
                pass
        if waited.cancelled_caught:
            log.warning("a page-cache store or invalidation was still under way after %.1f s",
                        grace)

    async def _invalidate_page_cache(self, ino: int) -> None:
        async with self._page_cache_lock:
            await trio.to_thread.run_sync(self._invalidate_quietly, ino)

    def _invalidate_quietly(self, ino: int) -> None:
        try:
            self._invalidate(ino)
        except OSError as exc:  # the kernel may already have forgotten the inode
            log.debug("invalidating inode %d: %s", ino, exc)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        parent_path = self.path_of(parent)
        path = parent_path + b"/" + name if parent_path else name
        st = await self._stat(path)
        return self._attr(self._ino_for(path), st)

    async def getattr(self, ino: int) -> Attr:
        return self._attr(ino, await self._stat(self.path_of(ino)))

    async def readlink(self, ino: int) -> bytes:
        path = self.path_of(ino)
        return await self._answer(("readlink", path), lambda: self.source.readlink(path))

    async def opendir(self, ino: int) -> int:
        """Snapshot a directory's entries with attributes; return a handle for readdir."""
        path = self.path_of(ino)
        names = sorted(await self._answer(("listdir", path), lambda: self.source.listdir(path)))
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
        return await self._answer(("statfs",), self.source.statvfs)

    def statistics(self) -> dict[str, int]:
        """Every counter of the daemon, flat, for stats output."""
        src = self.source.statistics()
        return {"read_requests": self.read_requests,
                **dataclasses.asdict(self.cache.statistics()),
                "source_healthy": int(src.healthy),
                "source_timeouts": src.timeouts,
                "source_failed_fast": src.failed_fast,
                "abandoned_threads": src.abandoned_threads,
                "stale_answers": self._stale_answers,
                "rss_bytes": _rss_bytes(),
                **self._disk_statistics()}

    def _disk_statistics(self) -> dict[str, int]:
        disk = self.cache.disk
        if disk is None:
            return {}
        d = disk.statistics()
        return {"disk_write_errors": d.write_errors,
                "disk_writes_refused_full": d.writes_refused_full,
                "disk_full_episodes": d.full_episodes,
                "disk_full_now": int(d.full_now)}

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self.statistics()).encode()
        if name == SHA256_XATTR:
            return (await self._sha256_of(ino)).encode()
        path = self.path_of(ino)
        return await self._answer(("xattr", path, name),
                                  lambda: self.source.getxattr(path, name))

    async def listxattr(self, ino: int) -> list[bytes]:
        path = self.path_of(ino)
        names = list(await self._answer(("xattrs", path), lambda: self.source.listxattr(path)))
        if await self._known_sha256(ino) is not None:
            names.append(SHA256_XATTR)
        return names

    async def _known_sha256(self, ino: int) -> str | None:
        """The file's sha256 if it was computed for the version the lower mount has now."""
        lower = self._open_files.get(ino)
        if lower is None or lower.key not in self._sha256:
            return None
        st = await self._stat(self.path_of(ino))
        if version_of(st) != lower.ident.version:
            return None
        return self._sha256[lower.key]

    async def _sha256_of(self, ino: int) -> str:
        """The sha256 of the file as the lower mount has it now, hashing it if nobody has.

        The hash reads the file through the cache, so what it fetches from below
        is fetched once and stays for the readers that follow.
        """
        if ino not in self._version:  # only regular files have their version noted
            raise FsError(errno.ENODATA)
        f, _ = await self._open_lower(ino)
        try:
            if f.key not in self._sha256 and self.cache.disk is not None:
                kept = await trio.to_thread.run_sync(self.cache.disk.note, f.key, "sha256")
                if kept is not None and re.fullmatch(rb"[0-9a-f]{64}", kept):
                    self._sha256[f.key] = kept.decode()
            if f.key not in self._sha256:
                hashing = self._hashing.get(f.key)
                if hashing is None:
                    hashing = self._start_hash(ino, f, fill=True)
                await hashing.wait()
            digest = self._sha256.get(f.key)
            if digest is None:
                raise FsError(errno.EIO, f"{f.display}: could not be read to hash it")
            return digest
        finally:
            f.unpin()

    # --- files ------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file for reading; return (fh, keep_cache).

        keep_cache is False when the lower file changed since the kernel cached
        its pages: the kernel then drops them itself.
        """
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        lower, changed = await self._open_lower(ino)
        fh = next(self._next_fh)
        # Read-ahead reaches only as far as the cache can hold blocks for a reader
        # that has not come yet, even when the file is bigger than the cache.
        stream = SequentialStream(self.readahead, self.cache.config.readahead_reach,
                                  unit=self.cache.config.fetch_bytes)
        self._handles[fh] = Handle(ino, lower, stream, kernel_keeps=not flags & os.O_DIRECT)
        return fh, not changed

    async def _open_lower(self, ino: int) -> tuple[LowerFile, bool]:
        """The lower file as the lower mount has it now, pinned for the caller.

        Also says whether it changed since it was last opened; the old
        version's blocks, interest and digest are dropped then. When the lower
        mount has no answer in time (see _answer), the version opened last is
        served, unless a stat has shown a newer one since.
        """
        path = self.path_of(ino)
        known = self._open_files.get(ino)
        if known is None or self._version.get(ino) != known.ident.version:
            fd, ident = await self.source.open(path)
            return await self._adopt(ino, fd, ident)
        asking = self._asking.get(("open", ino))
        if asking is None:
            asking = self._asking[("open", ino)] = _Asking()
            self._nursery.start_soon(self._reopen, ino, path, asking)
        if self.source.answering(self._stale_after):
            asking.waiters += 1
            with trio.move_on_after(self._stale_after):
                await asking.done.wait()
            if asking.done.is_set():  # a pin was reserved for us, if it went well
                if asking.error is None:
                    return asking.result  # type: ignore[no-any-return]
                if not _unavailable(asking.error):
                    err = asking.error
                    raise OSError(getattr(err, "errno", errno.EIO), str(err))
            else:
                asking.waiters -= 1
        self._stale_answers += 1
        known.pin()
        return known, False

    async def _reopen(self, ino: int, path: bytes, asking: _Asking) -> None:
        """Open the lower file for _open_lower's askers, pinning it once for each still waiting."""
        try:
            fd, ident = await self.source.open(path)
            lower, changed = await self._adopt(ino, fd, ident)
            for _ in range(asking.waiters):
                lower.pin()
            asking.result = (lower, changed)
            lower.unpin()
        except Exception as exc:  # a background task: nothing may escape into the nursery
            asking.error = exc
            _log_no_answer(f"{os.fsdecode(path)}: no fresh open", exc)
        finally:
            del self._asking[("open", ino)]
            asking.done.set()

    async def _adopt(self, ino: int, fd: int, ident: Identity) -> tuple[LowerFile, bool]:
        """Make *ident*, just opened as *fd*, the current version of *ino*; return it pinned.

        Compared with the version last opened, whose pages the kernel may hold
        and whose blocks we hold; this also catches a change of etag alone.
        """
        self._note_version(ino, ident.version)
        current = self._open_files.get(ino)
        changed = current is not None and current.key != ident.key()
        if changed:
            assert current is not None
            self.cache.forget_file(current.key)
            self._interest.pop(current.key, None)
            self._sha256.pop(current.key, None)
        if current is not None and not changed:
            lower = current
        else:
            lower = LowerFile(ident, self.source, self._nursery)
            self._open_files[ino] = lower  # from here on, no store of an older version starts
        lower.pin()
        lower.attach(fd)
        if changed:  # and none is still under way when the kernel, told, drops its pages
            async with self._page_cache_lock:
                pass
        return lower, changed

    async def read(self, fh: int, offset: int, size: int) -> Block:
        handle = self._handle(fh)
        self.read_requests += 1
        ahead = handle.stream.on_read(offset, size)
        if ahead is not None:
            self.cache.prefetch(handle.file, *ahead)
        f = handle.file
        interest = self._interest.get(f.key)
        if interest is None:
            interest = self._interest[f.key] = FileInterest(self.readahead)
        if interest.on_read(offset, size):
            # An O_DIRECT reader would not look in the page cache for what is fed.
            self._fetch_whole(handle.ino, f, feed=handle.kernel_keeps)
        return await self.cache.read(f, offset, size, kept=handle.kernel_keeps)

    def _fetch_whole(self, ino: int, f: LowerFile, feed: bool) -> None:
        """The read-once rule: fetch the rest of a wanted file now (and hash it, if so set).

        Only files the cache can keep until their reader comes (see _fits_whole);
        *feed*: hand what comes to the kernel's page cache.
        """
        if not self._fits_whole(f, feed):
            log.debug("%s: too big to fetch whole (%d bytes)", f.display, f.size)
            return
        log.debug("%s: fetching the whole file", f.display)
        self._start_fill(ino, f, feed)
        if self.readahead.sha256 and f.key not in self._sha256 and f.key not in self._hashing:
            self._start_hash(ino, f, fill=False)

    def _start_fill(self, ino: int, f: LowerFile, feed: bool) -> None:
        """Fetch the rest of *f* in the background; *feed*: into the kernel's page cache too."""
        f.pin()  # released by the fill
        self._nursery.start_soon(self.cache.fill, f, self.source.readahead_parallel,
                                 self._feeder(ino, f) if feed else None)

    def _fits_whole(self, f: LowerFile, feed: bool) -> bool:
        """Whether a whole-file fetch of *f* keeps what it fetches until a reader wants it.

        In memory, a file up to half the memory cache: a bigger one would evict
        its own head (or other files) before the next pass reads it. A fed block
        leaves memory for the disk tier as it lands, so then the disk tier bounds it.
        """
        if f.size <= self.cache.config.whole_file_in_memory:
            return True
        disk = self.cache.disk
        return (feed and self._store is not None and disk is not None
                and f.size <= disk.capacity // 2)

    def _feeder(self, ino: int, f: LowerFile) -> Callable[[int, Block], Awaitable[bool]] | None:
        """What puts blocks of *f* in the kernel's page cache of *ino* for a fill, if anything.

        A block goes in only while *f* is the version the lower mount has, as
        last seen: a store of an old version's bytes would be served as the new
        one's. Stores and invalidations take turns (_page_cache_lock), so none
        lands after the kernel was told to drop the old version's pages.
        """
        if self._store is None:
            return None

        async def feed(idx: int, block: Block) -> bool:
            async with self._page_cache_lock:
                store = self._store
                if (store is None or self._open_files.get(ino) is not f
                        or self._version.get(ino) != f.ident.version):
                    return False
                try:
                    await trio.to_thread.run_sync(store, ino, idx * self.cache.block_size, block)
                except OSError as exc:
                    if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                        log.warning("the kernel takes no data into its page cache (%s); "
                                    "not feeding it", exc)
                        self._store = None
                    else:  # e.g. the kernel forgot the inode: its pages went with it
                        log.debug("%s: page cache store of block %d: %s", f.display, idx, exc)
                    return False
            return True

        return feed

    def _start_hash(self, ino: int, f: LowerFile, fill: bool) -> trio.Event:
        """Start hashing *f* for SHA256_XATTR; the event is set when it ends, well or not.

        With *fill*, a file that fits is also fetched whole, in parallel, for the
        hash to follow; a bigger one is read ahead of the hash as it goes.
        """
        done = self._hashing[f.key] = trio.Event()
        if fill:  # asked for: the asker waits, so say what it waits for
            log.info("%s: hashing %.0f MB for %s", f.display, f.size / 1e6,
                     SHA256_XATTR.decode())
        ahead = 0
        if fill and self._fits_whole(f, feed=True):
            self._start_fill(ino, f, feed=True)
        elif fill:
            ahead = self.cache.fetch_blocks * self.source.readahead_parallel
        f.pin()  # released by the hash
        self._nursery.start_soon(self._hash, f, ahead, done)
        return done

    async def _hash(self, f: LowerFile, ahead: int, done: trio.Event) -> None:
        """sha256 of *f* from its cached blocks, in file order, for SHA256_XATTR.

        Releases the pin the caller took for it, and sets *done* at the end.
        """
        h = hashlib.sha256()

        async def update(block: Block) -> None:
            await trio.to_thread.run_sync(h.update, block)

        try:
            await self.cache.walk(f, update, ahead=ahead)
        except LowerError as exc:
            log.warning("%s: no sha256: %s", f.display, exc)
            return
        else:
            digest = self._sha256[f.key] = h.hexdigest()
            log.info("%s: sha256 %s", f.display, digest)
            if self.cache.disk is not None:  # for the next mount over the same cache
                await trio.to_thread.run_sync(self.cache.disk.set_note, f.key, "sha256",
                                              digest.encode())
        finally:
            f.unpin()
            del self._hashing[f.key]
            done.set()

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.file.unpin()

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None
