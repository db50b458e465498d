"""A bucket's prefixes as directories: what one LIST says, and how long it is believed.

A directory is a prefix ending in "/"; its entries come from one LIST with a
delimiter: objects are files (size, Last-Modified, ETag), common prefixes are
directories. Listings are kept in a TTL cache (cachetools' TTLCache), so a stat,
an open or a readdir within the TTL costs no request, and a replaced object is
seen, as new content, once its directory's listing has expired.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

if TYPE_CHECKING:
    import opendal

NS = 1_000_000_000
# Directories kept: a model tree has tens of them; 4096 bounds a bucket walked
# whole (`find`) at a few MB of names.
MAX_LISTINGS = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a listing: a file (an object) or a directory (a prefix)."""

    is_dir: bool
    size: int = 0
    # Last-Modified, in whole seconds: HEAD and GET say it to the second, while
    # LIST adds milliseconds; one rule for both keeps a version from flickering.
    mtime_ns: int = 0
    etag: str | None = None  # None when the store gives none (rclone without hashing)


Listing = dict[bytes, Entry]


def listing_of(client: opendal.AsyncOperator, directory: str) -> Listing:
    """The entries of *directory* ("" is the root), from LIST; blocking, for a worker thread.

    Through the client's asyncio interface, on an event loop of this thread's own:
    its blocking lister keeps the GIL while it waits for the store (measured: a
    LIST to a stopped server froze every other thread until it timed out).
    """
    return asyncio.run(_list(client, directory))


async def _list(client: opendal.AsyncOperator, directory: str) -> Listing:
    prefix = directory + "/" if directory else ""
    out: Listing = {}
    async for item in await client.list(prefix or "/"):
        name = item.path[len(prefix):] if item.path.startswith(prefix) else item.path
        meta = item.metadata
        is_dir = meta.is_dir
        name = name.rstrip("/") if is_dir else name
        if not name or "/" in name or name in (".", ".."):
            continue  # the directory's own marker object, or a name no path can reach
        key = name.encode("utf-8", "surrogateescape")
        if is_dir:
            out[key] = Entry(True)  # a prefix wins over an object of the same name
        elif key not in out:
            out[key] = file_entry(meta)
    return out


def list_one(client: opendal.AsyncOperator) -> None:
    """Ask the store for one name at the root; blocking, without keeping the GIL."""
    async def ask() -> None:
        async for _ in await client.list("/", limit=1):
            break

    asyncio.run(ask())


def file_entry(meta: Any) -> Entry:
    """An object's entry from the client's metadata (of a LIST or a HEAD)."""
    modified = meta.last_modified
    mtime = int(modified.timestamp()) * NS if modified is not None else 0
    etag = (meta.etag or "").strip('"') or None
    return Entry(False, int(meta.content_length), mtime, etag)


def stat_of(entry: Entry, block_size: int) -> os.stat_result:
    """A read-only stat of *entry*, owned by the daemon's user (who else could read it)."""
    if entry.is_dir:
        mode, nlink = stat.S_IFDIR | 0o555, 2
    else:
        mode, nlink = stat.S_IFREG | 0o444, 1
    t = entry.mtime_ns
    return os.stat_result(
        (mode, 0, 0, nlink, os.getuid(), os.getgid(), entry.size, t // NS, t // NS, t // NS),
        {"st_atime_ns": t, "st_mtime_ns": t, "st_ctime_ns": t, "st_rdev": 0,
         "st_blksize": block_size, "st_blocks": (entry.size + 511) // 512},
    )


def not_found(path: bytes) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(path))


def split(path: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a path relative to the root; the root's parent is b""."""
    parent, _, name = path.rpartition(b"/")
    return parent, name


class Listings:
    """Listings by directory, each believed for *ttl* seconds after its LIST."""

    def __init__(self, ttl: float, maxsize: int = MAX_LISTINGS) -> None:
        self.ttl = ttl
        self._cache: TTLCache[bytes, Listing] = TTLCache(maxsize, ttl, timer=time.monotonic)
        self.lists = 0  # LIST requests answered

    def get(self, directory: bytes) -> Listing | None:
        return self._cache.get(directory)

    def put(self, directory: bytes, listing: Listing) -> None:
        self.lists += 1
        self._cache[directory] = listing

    def forget(self, directory: bytes) -> None:
        """Believe *directory*'s listing no more (one of its objects was seen changed)."""
        self._cache.pop(directory, None)
