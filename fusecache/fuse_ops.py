"""The thin pyfuse3 adapter over FilesystemCore: conversions and errno, nothing else."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from fusecache.errors import errno_for
from fusecache.fs.core import Attr, FilesystemCore
from fusecache.logrepeats import RepeatedLog
from fusecache.source_api import SourceUnavailable

log = logging.getLogger(__name__)
repeats = RepeatedLog(log)  # a reader retries a read that failed, and so on

P = ParamSpec("P")
R = TypeVar("R")


def _fuse_errors(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Let nothing but FUSEError escape a handler; log what is not a plain miss."""

    @wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            err = errno_for(exc)
            if isinstance(exc, SourceUnavailable):  # the source logs its outage once
                log.debug("%s%r failed: %s", fn.__name__, args[1:], exc)
            elif err == errno.EIO:
                repeats.log(logging.ERROR, "%s%r failed: %s", fn.__name__, args[1:], exc,
                            exc_info=not isinstance(exc, OSError))
            raise pyfuse3.FUSEError(err) from None

    return handler


class FuseOperations(pyfuse3.Operations):
    """pyfuse3's request handlers, each a call into the core."""

    def __init__(self, core: FilesystemCore, entry_timeout: float, attr_timeout: float):
        super().__init__()
        self.core = core
        self._entry_timeout = entry_timeout
        self._attr_timeout = attr_timeout

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = self._entry_timeout
        e.attr_timeout = self._attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        return self._entry(await self.core.lookup(parent_inode, name))

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any) -> Any:
        return self._entry(await self.core.getattr(inode))

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> Any:
        return await self.core.readlink(inode)

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> Any:
        return await self.core.opendir(inode)

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for pos, (name, attr) in enumerate(self.core.readdir(fh, start_id), start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), pos):
                break

    async def releasedir(self, fh: int) -> None:
        self.core.releasedir(fh)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fh, keep_cache = await self.core.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> Any:
        return await self.core.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self.core.release(fh)

    @_fuse_errors
    async def statfs(self, ctx: Any) -> Any:
        sv = await self.core.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = 0
        out.f_bavail = 0
        out.f_files = sv.f_files
        out.f_ffree = 0
        out.f_favail = 0
        out.f_namemax = sv.f_namemax
        return out

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> Any:
        return await self.core.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> Any:
        return await self.core.listxattr(inode)

    # A read-only filesystem: the 'ro' mount option stops most changes in the
    # kernel already; these cover the few that would still reach us.
    async def setattr(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)
