"""The object-store source: a bucket read directly, ranged GETs straight into the block pool.

Every request runs in a worker thread through TimedCalls, as the directory
source's calls do, so --source-timeout, the unhealthy state and its probe work
the same. Metadata comes from listings (listing.py): a stat, an open or a
readdir within the listing TTL costs no request. A file's identity is its
ETag (with size and Last-Modified), and each ranged GET carries If-Match with
it, so a replaced object's bytes are never cached as the old one's.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from itertools import count
from typing import TYPE_CHECKING, TypeVar

import trio

from fusecache.blockio import Block, BlockPool
from fusecache.config import SourceConfig
from fusecache.errors import LowerError
from fusecache.objectstore.listing import (
    NS,
    Entry,
    Listing,
    Listings,
    list_one,
    listing_of,
    not_found,
    split,
    stat_of,
)
from fusecache.objectstore.location import StoreLocation
from fusecache.source_api import Identity
from fusecache.threads import ThreadPolicy
from fusecache.timedcalls import TimedCalls

if TYPE_CHECKING:
    import opendal

log = logging.getLogger(__name__)

T = TypeVar("T")

# statfs of a bucket: nothing to count, so zeros (as s3fs and mountpoint-s3 say),
# read-only, and S3's longest key as the longest name.
_STATFS = os.statvfs_result((1 << 20, 1 << 20, 0, 0, 0, 0, 0, 0, os.ST_RDONLY, 1024))
# The probe of an unhealthy store asks again this often until it answers.
PROBE_INTERVAL = 0.5


class ObjectChanged(LowerError):
    """The object is no longer the version being read (its ETag or size changed)."""


class ObjectSource(TimedCalls):
    """A bucket (and a prefix in it) served as a read-only tree; see the module's docstring.

    *client* is an opendal Operator rooted at the prefix (location.open_client).
    Handles are numbers with nothing behind them: a GET needs only the key and
    the identity the core passes with each read.
    """

    # Every GET stands alone (source_api.Source): an open of a new version shares nothing.
    shares_open_state = False

    def __init__(self, client: opendal.Operator, location: StoreLocation,
                 config: SourceConfig | None = None, threads: ThreadPolicy | None = None,
                 block_size: int = 1 << 20) -> None:  # CacheConfig.block_size's default
        config = config or SourceConfig()
        super().__init__(config, threads or ThreadPolicy(config), f"the object store {location}")
        self.location = location
        self._client = client  # GETs
        self._lister = client.to_async_operator()  # LISTs: see listing_of
        self._block_size = block_size
        self.listings = Listings(config.list_ttl)
        self._listing_now: dict[bytes, trio.Event] = {}  # LISTs under way, by directory
        self._root = stat_of(Entry(True, mtime_ns=time.time_ns() // NS * NS), block_size)
        self._handles = count(1)

    # --- metadata ---------------------------------------------------------

    async def _listing(self, directory: bytes) -> Listing:
        """*directory*'s listing: the cached one within the TTL, else one LIST for all askers."""
        while True:
            known = self.listings.get(directory)
            if known is not None:
                return known
            under_way = self._listing_now.get(directory)
            if under_way is None:
                break
            await under_way.wait()  # then look again: the LIST may have failed
        done = self._listing_now[directory] = trio.Event()
        try:
            listing = await self._call(self._metadata, self._wait_for_answer, _mapped,
                                       listing_of, self._lister, self.location.key(directory))
            self.listings.put(directory, listing)
            return listing
        finally:
            del self._listing_now[directory]
            done.set()

    async def _entry(self, path: bytes) -> Entry:
        if not path:
            return Entry(True, mtime_ns=self._root.st_mtime_ns)
        parent, name = split(path)
        entry = (await self._listing(parent)).get(name)
        if entry is None:
            raise not_found(path)
        return entry

    async def lstat(self, path: bytes) -> os.stat_result:
        entry = await self._entry(path) if path else None
        if entry is None or entry.is_dir:  # a prefix has no date of its own: the mount's
            return self._root
        return stat_of(entry, self._block_size)

    async def listdir(self, path: bytes) -> list[bytes]:
        if path and not (await self._entry(path)).is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                     os.fsdecode(path))
        return list(await self._listing(path))

    async def readlink(self, path: bytes) -> bytes:
        await self._entry(path)
        raise OSError(errno.EINVAL, "an object is never a symbolic link")

    async def statvfs(self) -> os.statvfs_result:
        return _STATFS

    async def getxattr(self, path: bytes, name: bytes) -> bytes:
        await self._entry(path)
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))

    async def listxattr(self, path: bytes) -> list[bytes]:
        await self._entry(path)
        return []

    # --- files --------------------------------------------------------------

    async def open(self, path: bytes) -> tuple[int, Identity]:
        """A handle and the identity of the object at *path*, as its listing shows it."""
        entry = await self._entry(path)
        if entry.is_dir:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fsdecode(path))
        etag = entry.etag.encode() if entry.etag else None
        return next(self._handles), Identity(path, entry.size, entry.mtime_ns, entry.mtime_ns,
                                             etag)

    async def close(self, fd: int) -> None:
        """Nothing to close: a handle holds no connection."""

    async def read_blocks(
        self, pool: BlockPool, fd: int, offset: int, sizes: list[int], expect: Identity,
        readahead: bool = False,
    ) -> list[Block]:
        """Consecutive blocks at *offset*, from one ranged GET; short at the object's end.

        Raises ObjectChanged if the object is no longer *expect* (If-Match, or a
        short answer), and forgets its directory's listing so the next open sees
        the new version. Read-ahead has its own limiter, as for the lower mount.
        """
        limiter = self._readahead if readahead else self._demand
        etag = expect.etag.decode() if expect.etag else None
        try:
            return await self._call(limiter, self._wait_for_answer, _mapped, _get_blocks,
                                    self._client, self.location.key(expect.path), pool,
                                    offset, sizes, expect.size, etag)
        except ObjectChanged:
            self.listings.forget(split(expect.path)[0])
            raise

    def _wait_for_answer(self) -> None:
        """The health probe: ask the store for one name until it answers, however it answers."""
        while True:
            try:
                list_one(self._lister)
                return
            except Exception as exc:  # noqa: BLE001 - a refusal is an answer; only silence is not
                if _is_answer(exc):
                    return
                time.sleep(PROBE_INTERVAL)


def _get_blocks(client: opendal.Operator, key: str, pool: BlockPool, offset: int,
                sizes: list[int], size: int, etag: str | None) -> list[Block]:
    """One ranged GET of the blocks at *offset*, copied once into the pool's blocks."""
    want = max(0, min(offset + sum(sizes), size) - offset)
    data = b""
    if want:
        data = client.read(key, offset=offset, size=want,
                           if_match=None if etag is None else f'"{etag}"')
        if len(data) != want:
            raise ObjectChanged(f"{key}: {len(data)} bytes where {want} were asked for: the "
                                "object changed in the store")
    view, blocks, at = memoryview(data), [], 0
    for n in sizes:
        blocks.append(pool.join([view[at:at + n]]))
        at += n
    return blocks


def _mapped(fn: Callable[..., T], *args: object) -> T:
    """fn(*args), with the client's errors as the OSError or EIO a reader should get."""
    import opendal.exceptions as e

    try:
        return fn(*args)
    except e.NotFound as exc:
        raise FileNotFoundError(errno.ENOENT, _first_line(exc)) from None
    except e.PermissionDenied as exc:
        raise PermissionError(errno.EACCES, _first_line(exc)) from None
    except (e.ConditionNotMatch, e.RangeNotSatisfied) as exc:
        raise ObjectChanged(f"changed in the store while it was read: {_first_line(exc)}"
                            ) from None
    except (OSError, LowerError):
        raise
    except Exception as exc:  # opendal's errors share no base class; any other is EIO too
        raise LowerError(_first_line(exc)) from None


def _is_answer(exc: Exception) -> bool:
    """Whether an error is the store's answer (a refusal), not the lack of one."""
    import opendal.exceptions as e

    return isinstance(exc, (e.NotFound, e.PermissionDenied, e.ConfigInvalid))


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
