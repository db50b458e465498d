"""The lower mount: every call on it runs in a worker thread, within a time limit.

A call that gets no answer within `SourceConfig.timeout` fails with EIO (its
thread is abandoned: it ends whenever the lower mount answers) and marks the
source unhealthy. While unhealthy, new calls fail at once instead of each
waiting out the timeout, and a probe repeats the call that timed out, one at a
time, until the lower mount answers it; then calls go through again. Threads
stuck in the lower mount are bounded by the limiters (trio keeps a token until
its thread really ends) and counted in `statistics()`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import count
from typing import TypeVar

import trio

from fusecache.blockio import Block, BlockPool
from fusecache.config import SourceConfig
from fusecache.errors import LowerError
from fusecache.threads import ThreadPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

ETAG_XATTRS = (b"user.etag", b"user.s3.etag", b"user.oss.etag")


class SourceUnavailable(LowerError):
    """The lower mount did not answer in time, or is known not to be answering."""


@dataclass(frozen=True)
class Identity:
    """What makes cached bytes of a lower file valid: any change means new content."""

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
        # ctime, which nobody can set back.
        return (self.path, self.size, self.mtime_ns, self.ctime_ns, self.etag)

    @property
    def version(self) -> Version:
        return (self.size, self.mtime_ns, self.ctime_ns)


Version = tuple[int, int, int]  # (size, mtime_ns, ctime_ns) as a stat shows them


def version_of(st: os.stat_result) -> Version:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class SourceStatistics:
    healthy: bool
    timeouts: int  # calls that got no answer in time
    failed_fast: int  # calls refused at once while the source was unhealthy
    abandoned_threads: int  # threads still stuck in the lower mount after their caller left


class _Call:
    """One call's thread, as seen from both sides: did it start, did it end."""

    __slots__ = ("started", "finished", "abandoned", "since")

    def __init__(self, since: float) -> None:
        self.started = self.finished = self.abandoned = False
        self.since = since


class LowerSource:
    """A directory tree (usually an object-store FUSE mount) read in worker threads.

    Paths are bytes relative to the root, b"" being the root itself, so names
    with any bytes work. `run()` must be running (in the owner's nursery) for
    an unhealthy source to become healthy again.
    """

    def __init__(self, root: os.PathLike[str] | str, config: SourceConfig | None = None,
                 threads: ThreadPolicy | None = None):
        config = config or SourceConfig()
        threads = threads or ThreadPolicy(config)
        self.root = os.fsencode(os.path.abspath(root))
        self.timeout = config.timeout
        self.stale_after = config.stale_after
        self._demand = threads.lower_demand
        self._metadata = threads.lower_metadata
        self._readahead = threads.lower_readahead
        self._closer = threads.lower_close  # waits for a thread as long as it takes
        self._prober = threads.lower_probe
        self._healthy = True
        self._unhealthy = trio.Event()  # set while unhealthy: wakes run()
        self._probe: Callable[[], object] | None = None
        self._timeouts = 0
        self._failed_fast = 0
        self._abandoned = 0
        self._lock = threading.Lock()  # _abandoned and _Call flags, shared with threads
        self._metadata_calls: dict[int, _Call] = {}  # under way, by serial
        self._serial = count()

    @property
    def healthy(self) -> bool:
        return self._healthy

    def answering(self, within: float) -> bool:
        """Healthy, and no metadata call has been waiting for longer than *within* seconds.

        Callers holding an earlier answer use this to decide whether waiting for
        a fresh one is worth it.
        """
        if not self._healthy:
            return False
        now = trio.current_time()
        return all(now - c.since <= within for c in self._metadata_calls.values())

    def statistics(self) -> SourceStatistics:
        return SourceStatistics(healthy=self._healthy, timeouts=self._timeouts,
                                failed_fast=self._failed_fast,
                                abandoned_threads=self._abandoned)

    def full(self, path: bytes) -> bytes:
        return self.root + b"/" + path if path else self.root

    async def _call(self, limiter: trio.CapacityLimiter, probe: Callable[[], object] | None,
                    fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in a worker thread, within the timeout; see the module's docstring.

        *probe* repeats the call for the health probe, should it time out (None:
        the call itself is safe to repeat).
        """
        if not self._healthy:
            self._failed_fast += 1
            raise SourceUnavailable("the lower mount is not answering (retrying in the "
                                    "background)")
        call = _Call(trio.current_time())
        serial = next(self._serial)
        if limiter is self._metadata:
            self._metadata_calls[serial] = call

        def run() -> T:
            with self._lock:
                call.started = True
            try:
                return fn(*args)
            finally:
                with self._lock:
                    call.finished = True
                    if call.abandoned:
                        self._abandoned -= 1

        try:
            with trio.move_on_after(self.timeout):
                return await trio.to_thread.run_sync(run, limiter=limiter,
                                                     abandon_on_cancel=True)
        finally:
            self._metadata_calls.pop(serial, None)
            with self._lock:
                if not call.finished:  # timed out, or cancelled (unmounting)
                    call.abandoned = True
                    self._abandoned += 1
        # Timed out. Waiting for a thread is not the lower mount's fault.
        if not call.started:
            raise SourceUnavailable(f"no thread free for the lower mount in {self.timeout:g} s")
        self._timeouts += 1
        self._mark_unhealthy(probe or partial(fn, *args), getattr(fn, "__name__", "call"))
        raise SourceUnavailable(f"no answer from the lower mount in {self.timeout:g} s")

    def _mark_unhealthy(self, probe: Callable[[], object], what: str) -> None:
        if not self._healthy:
            return
        self._healthy = False
        self._probe = probe
        self._unhealthy.set()
        log.warning("the lower mount gave no answer to %s in %g s: failing its calls at once "
                    "and serving what is cached until it answers again", what, self.timeout)

    async def run(self) -> None:
        """Bring the source back once the lower mount answers; runs until cancelled.

        The probe repeats the call that timed out (a stat cache can answer other
        calls while the store is gone), one thread at a time, with no time limit:
        it ends when the lower mount answers, with data or with an error.
        """
        while True:
            await self._unhealthy.wait()
            probe, started = self._probe, trio.current_time()
            assert probe is not None
            try:
                await trio.to_thread.run_sync(probe, limiter=self._prober,
                                              abandon_on_cancel=True)
            except OSError:
                pass  # an answer all the same: the mount is back, if not the file
            self._healthy = True
            self._unhealthy = trio.Event()
            log.warning("the lower mount answers again (after %.1f s); lower calls go through",
                        trio.current_time() - started + self.timeout)

    async def _meta(self, fn: Callable[..., T], *args: object) -> T:
        return await self._call(self._metadata, None, fn, *args)

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
                                _open_file, full, path)

    async def close(self, fd: int) -> None:
        """Close a lower fd, however long the lower mount takes (never fails fast)."""
        try:
            await trio.to_thread.run_sync(os.close, fd, limiter=self._closer,
                                          abandon_on_cancel=True)
        except OSError as exc:  # the fd is gone all the same; only the flush failed
            log.debug("closing a lower fd: %s", exc)

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
