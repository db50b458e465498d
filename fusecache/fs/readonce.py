"""Read-once: a file wanted whole is fetched whole, once, and hashed from that one pass.

One `FileInterest` per file version, fed by every handle's reads, says when
the whole file is wanted (a hash pass, or a loader's header then tensors); the
rest is then fetched in the background, in parallel, fed to the kernel's page
cache when that is on. The sha256 xattr reads a file through the cache the same
way: a cold file crosses the network once, for the hash and the load after it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
from collections.abc import Hashable
from typing import Protocol

import trio

from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache
from fusecache.cache.passes import FilePasses
from fusecache.config import ReadaheadConfig
from fusecache.errors import FsError, LowerError
from fusecache.fs.lowerfile import LowerFile, Pin
from fusecache.fs.pagecache import PageCache
from fusecache.readahead import FileInterest

log = logging.getLogger(__name__)

# The hex sha256 of a file, on the file, once a whole-file fetch has streamed it;
# a tool that asks for it can skip its own hash pass.
SHA256_XATTR = b"user.fusecache.sha256"


class DiskNotes(Protocol):
    """What read-once needs of the disk tier: its size, and small notes kept per file version."""

    @property
    def capacity(self) -> int: ...
    def note(self, file_key: Hashable, name: str) -> bytes | None: ...
    def set_note(self, file_key: Hashable, name: str, value: bytes) -> None: ...


class ReadOnce:
    """Whole-file fetches of wanted files, and the sha256 of each file version.

    *parallel*: fetches a whole-file fetch keeps registered at a time. *disk*,
    when there is a disk tier, bounds what a fed fetch may take, and keeps each
    digest as a note beside the version's blocks, for the next mount.
    """

    def __init__(self, config: ReadaheadConfig, cache: BlockCache, parallel: int,
                 nursery: trio.Nursery, pagecache: PageCache, disk: DiskNotes | None) -> None:
        self.config = config
        self._cache = cache
        self.passes = FilePasses(cache)  # the fills and hash walks below
        self._parallel = parallel
        self._nursery = nursery
        self._pagecache = pagecache
        self._disk = disk
        self._interest: dict[Hashable, FileInterest] = {}  # by file version
        self._sha256: dict[Hashable, str] = {}  # by file version
        self._hashing: dict[Hashable, trio.Event] = {}  # by file version: set when it ends

    def forget(self, key: Hashable) -> None:
        """Drop what is known of a file version that is no longer current."""
        self._interest.pop(key, None)
        self._sha256.pop(key, None)

    def digest(self, key: Hashable) -> str | None:
        """The sha256 of a file version, if it has been computed."""
        return self._sha256.get(key)

    def on_read(self, ino: int, f: LowerFile, offset: int, size: int, feed: bool) -> None:
        """Count a read of *f* (inode *ino*); the read that shows it wanted whole fetches the rest.

        *feed*: the reader looks in the page cache (an O_DIRECT one does not),
        so what is fetched may be handed to it. Not to a reader that streams
        through the file (a hash pass, a sequential load): it asks for every page
        itself, and its requests race the stores, so the pages were copied twice
        (measured: served 0.47 and fed 0.69 of a cold 1 GiB sequential read).
        """
        interest = self._interest.get(f.key)
        if interest is None:
            interest = self._interest[f.key] = FileInterest(self.config)
        if interest.on_read(offset, size):
            # Followed: the streaming reader takes each block from memory as it
            # lands, into the page cache (an O_DIRECT reader's stay in memory).
            self._fetch_whole(ino, f, feed and not interest.streamed,
                              followed=interest.streamed and feed)

    def _fetch_whole(self, ino: int, f: LowerFile, feed: bool, followed: bool) -> None:
        """The read-once rule: fetch the rest of a wanted file now (and hash it, if so set).

        Only files the cache can keep until their reader comes (see _fits_whole);
        *feed*: hand what comes to the kernel's page cache; *followed*: a reader
        streams through the file behind the fetch.
        """
        if not self._fits_whole(f, (feed and self._pagecache.feeding) or followed):
            log.debug("%s: too big to fetch whole (%d bytes)", f.display, f.size)
            return
        log.debug("%s: fetching the whole file", f.display)
        self._start_fill(ino, f, feed)
        if self.config.sha256 and f.key not in self._sha256 and f.key not in self._hashing:
            self._start_hash(ino, f, fill=False)

    def _start_fill(self, ino: int, f: LowerFile, feed: bool) -> None:
        """Fetch the rest of *f* in the background; *feed*: into the kernel's page cache too."""
        self.passes.start_soon(self._nursery, self.fill, ino, Pin(f), feed)

    async def fill(self, ino: int, pin: Pin, feed: bool) -> str | None:
        """Fetch every block of the pinned file that is not here; the error that stopped it.

        The whole-file fetch of read-once (`fusecache warm` asks for it too):
        at most *parallel* fetches at a time, each block from below once;
        *feed*: into the kernel's page cache of inode *ino* too. Takes the pin.
        """
        feeder = self._pagecache.feeder(ino, pin.file) if feed else None
        return await self.passes.fill(pin.give(), self._parallel, feeder)

    def _fits_whole(self, f: LowerFile, handed_on: bool) -> bool:
        """Whether a whole-file fetch of *f* keeps what it fetches until a reader wants it.

        In memory, a file up to half the memory cache: a bigger one would evict
        its own head (or other files) before the next pass reads it. *handed_on*:
        each block goes to the kernel as it lands (fed, or read by a reader that
        streams behind the fetch) and from memory on to the disk tier, so then
        the disk tier bounds it.
        """
        if f.size <= self._cache.config.whole_file_in_memory:
            return True
        disk = self._disk
        return handed_on and disk is not None and f.size <= disk.capacity // 2

    async def sha256(self, ino: int, f: LowerFile) -> str:
        """The sha256 of *f*, the current version of *ino*, hashing it if nobody has.

        The caller holds a pin on *f* until this returns. The hash reads the
        file through the cache, so what it fetches from below is fetched once
        and stays for the readers that follow.
        """
        if f.key not in self._sha256 and self._disk is not None:
            kept = await trio.to_thread.run_sync(self._disk.note, f.key, "sha256")
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
        if fill and self._fits_whole(f, handed_on=self._pagecache.feeding):
            self._start_fill(ino, f, feed=True)
        elif fill:
            ahead = self._cache.fetch_blocks * self._parallel
        self.passes.start_soon(self._nursery, self._hash, Pin(f), ahead, done)
        return done

    async def _hash(self, pin: Pin, ahead: int, done: trio.Event) -> None:
        """sha256 of the pinned file from its cached blocks, in file order, for SHA256_XATTR.

        Releases *pin* and sets *done* at the end.
        """
        f = pin.file
        h = hashlib.sha256()

        async def update(block: Block) -> None:
            await trio.to_thread.run_sync(h.update, block)

        try:
            with pin:
                try:
                    await self.passes.walk(f, update, ahead=ahead)
                except LowerError as exc:
                    log.warning("%s: no sha256: %s", f.display, exc)
                    return
                digest = self._sha256[f.key] = h.hexdigest()
                log.info("%s: sha256 %s", f.display, digest)
                if self._disk is not None:  # for the next mount over the same cache
                    await trio.to_thread.run_sync(self._disk.set_note, f.key, "sha256",
                                                  digest.encode())
        finally:
            del self._hashing[f.key]
            done.set()
