"""The disk tier: cached blocks in local files that check themselves.

Layout: DIR/blocks/v3/<identity digest>/<unit>.blk, and <name>.note beside them
for a small value kept per identity (its sha256). DIR/blocks is the directory
fusecache made and tagged in the cache dir (cachedir.py); nothing outside it is
touched. A unit file holds blocks
unit*8 .. unit*8+7 of one source identity (one fetch from the lower mount), each
in its own slot: a 4 KiB header, then the block's data. A slot never written, or
given up, is a hole. The header holds the format magic, the digest of the source
identity, the block index, the data length and an XXH3-64 checksum of the data.
A slot whose header or checksum does not match what the reader expects is a miss
(and is punched out), never data. A crash mid-write leaves at worst a slot that
fails its checks, so blocks are written in place, with no temporary file.

Eight blocks to a file because each file costs a create and its own metadata:
writing 512 one-block files with a rename each took 0.22-0.29 CPU-seconds of the
machine, writing the same blocks into slots of 64 files 0.11-0.20.

Whole blocks move with O_DIRECT where the file system allows it: straight between
the device and the block's own memory, with no copy into the page cache, whose
pages belong to the mounted files readers map.

A write that fails (the disk is full, mostly) stops writes for a while; reads go on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from fusecache.blockio import Block, BlockPool
from fusecache.cachedir import TaggedDir
from fusecache.lru import BlockKey, ScanResistantLRU

log = logging.getLogger(__name__)

FORMAT = "v3"
MAGIC = b"FCBLK003"
HEADER = struct.Struct("<8s32sQQQ")  # magic, identity digest, index, length, xxh3-64
# Where a slot's data starts: one page, so O_DIRECT transfers of the data stay aligned.
DATA_OFFSET = 4096
UNIT = 8  # blocks per file
NOTE_SUFFIX = ".note"  # beside the unit files: small values kept per identity
TMP_SUFFIX = ".tmp"  # a note or the O_DIRECT probe, before it is renamed or gone
# After a write fails (ENOSPC, EDQUOT: mostly a disk that something else
# filled), writes stop for this long, then the free space is measured again and
# writes are tried. A minute keeps the writer threads from failing a write per
# block read (a reader at 1 GB/s hands over a thousand a second), and a disk
# that was cleaned up is used again soon enough.
WRITE_BACKOFF = 60.0
# While writes stay stopped, the log says so (with counts) at most this often,
# not once per block: the default log lives in /run, in RAM.
STOPPED_SUMMARY_EVERY = 300.0


def checksum(data: Block) -> int:
    """XXH3-64 of a block: 30 GB/s here, against zlib.crc32's 2.7 (see native/README.md)."""
    return xxhash.xxh3_64_intdigest(data)


def identity_digest(file_key: Hashable, block_size: int) -> bytes:
    """A stable 32-byte name for a source identity cut in blocks of *block_size*."""
    return hashlib.sha256(repr((file_key, block_size)).encode()).digest()


@dataclass(frozen=True)
class DiskStatistics:
    """The disk tier's counters."""

    used: int  # bytes of blocks held
    capacity: int  # bytes it may hold: at most --disk-cache and 90% of the free space
    validation_failures: int  # blocks that failed their checks when read (then refetched)
    write_errors: int  # writes that failed: the disk was full (ENOSPC, EDQUOT) or broken
    writes_refused_full: int  # writes refused at once because writes were stopped
    full_episodes: int  # times writes stopped after a failure
    full_now: bool  # writes are stopped, or being tried again after a stop


class _Size(int):
    """An index entry: only the block's size is kept in memory."""

    def __len__(self) -> int:
        return int(self)


class DiskTier:
    """Blocks on local disk, bounded by bytes, surviving remounts.

    The methods here block (file I/O); callers run them in worker threads,
    except lookups of the in-memory index (`contains`).
    """

    def __init__(self, cache_dir: Path, max_bytes: int, block_size: int = 1 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Open the cache in *cache_dir* (see cachedir.py) for this process alone.

        Raises OSError (cachedir.CacheDirError) when *cache_dir* holds what is not
        ours, or another daemon has it open.
        """
        self._dir = TaggedDir(cache_dir)
        self.root = self._dir.path / FORMAT
        self.root.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        _remove_older_formats(self._dir)
        self.block_size = block_size
        self._slot = DATA_OFFSET + block_size  # bytes between the starts of two slots
        # tmpfs (before Linux 6.6) and some FUSE file systems refuse O_DIRECT.
        self.direct_io = block_size % DATA_OFFSET == 0 and _accepts_direct_io(self.root)
        # Reader threads and the writer threads share the index; data moves
        # outside the lock, slots are given up (punched, unlinked) under it.
        self._lock = threading.Lock()
        self._max_bytes = max_bytes
        self._index: ScanResistantLRU[_Size] = ScanResistantLRU(max_bytes, self._evicted)
        self._digests: dict[Hashable, bytes] = {}
        # Indexed (their space is reserved) but not yet written.
        self._pending: set[BlockKey] = set()
        self._made_dirs: set[Path] = set()  # block directories known to exist
        self.validation_failures = 0
        # Writes stopped after a failure (under the lock): until _resume_at, for
        # an episode that began at _stopped_since and ends with a write that works.
        self._clock = clock
        self._resume_at: float | None = None
        self._stopped_since: float | None = None
        self._last_said = 0.0  # when the log last spoke of the episode
        self._write_errors = 0
        self._refused = 0
        self._episodes = 0
        self._errors_unsaid = 0  # since the log last spoke
        self._refused_unsaid = 0
        self._load_index(max_bytes)

    def close(self) -> None:
        """Let another DiskTier open the cache dir (a daemon's exit does the same)."""
        self._dir.close()

    def statistics(self) -> DiskStatistics:
        with self._lock:
            return DiskStatistics(
                used=self._index.used,
                capacity=self._index.capacity,
                validation_failures=self.validation_failures,
                write_errors=self._write_errors,
                writes_refused_full=self._refused,
                full_episodes=self._episodes,
                full_now=self._stopped_since is not None,
            )

    @property
    def capacity(self) -> int:
        return self._index.capacity

    @property
    def used(self) -> int:
        return self._index.used

    def _digest(self, file_key: Hashable) -> bytes:
        digest = self._digests.get(file_key)
        if digest is None:
            digest = self._digests[file_key] = identity_digest(file_key, self.block_size)
        return digest

    def _unit_path(self, digest: bytes, idx: int) -> Path:
        """The file holding block *idx*; its slot starts at `_slot_offset(idx)`."""
        return self.root / digest.hex() / f"{idx // UNIT}.blk"

    def _slot_offset(self, idx: int) -> int:
        return idx % UNIT * self._slot

    def _load_index(self, max_bytes: int) -> None:
        """Index the slots an earlier daemon left, oldest file first.

        The capacity is the smaller of *max_bytes* and what the disk can take:
        what we already hold plus 90% of the free space.
        """
        found: list[tuple[int, bytes, int, int]] = []
        for d in self.root.iterdir():
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                try:
                    unit = int(entry.name.removesuffix(".blk"))
                    digest = bytes.fromhex(d.name)
                    mtime = entry.stat().st_mtime_ns
                    slots = list(self._written_slots(entry.path))
                except (ValueError, OSError):
                    continue
                found.extend((mtime, digest, unit * UNIT + s, size) for s, size in slots)
        found.sort()
        self._fit_capacity(sum(size + DATA_OFFSET for *_, size in found))
        with self._lock:
            for _, digest, idx, size in found:
                # Indexed by digest: the file key is unknown until a reader opens the file.
                if not self._index.put((digest, idx), _Size(size)):
                    self._give_up(digest, idx)
        log.info("disk cache %s: %d blocks, %d bytes; %s", self.root, len(self._index),
                 self._index.used, "O_DIRECT" if self.direct_io else
                 "no O_DIRECT here, through the page cache")

    def _fit_capacity(self, held: int) -> None:
        """Hold at most --disk-cache, and what we hold (*held* bytes, headers too) plus 90%
        of the free space."""
        free = shutil.disk_usage(self.root).free
        self._index.capacity = min(self._max_bytes, held + int(free * 0.9))

    def _written_slots(self, path: str) -> Iterator[tuple[int, int]]:
        """(slot, data bytes at most) for each slot of a unit file that holds data.

        From the file's data extents, so a start does not read every header;
        a slot that is not what it should be fails its checks when read. Where
        the file system has no holes, every slot of the file's length counts.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            end_of_file = os.fstat(fd).st_size
            pos = 0
            while pos < end_of_file:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data past pos
                    return
                end = os.lseek(fd, start, os.SEEK_HOLE)
                first = -(-start // self._slot)  # slots whose header lies in [start, end)
                for s in range(first, UNIT):
                    base = s * self._slot
                    if base + DATA_OFFSET > end:
                        break
                    yield s, min(end - base - DATA_OFFSET, self.block_size)
                pos = end
        finally:
            os.close(fd)

    def _evicted(self, key: BlockKey, size: _Size) -> None:
        """The index let a block go (with the lock held): give up its slot."""
        digest = key[0]
        assert isinstance(digest, bytes)
        self._give_up(digest, key[1])

    def _give_up(self, digest: bytes, idx: int) -> None:
        """Free the slot of a block that is no longer indexed; call with the lock held.

        The unit's file goes when no other block of it is indexed (being written
        counts), else the slot is punched out.
        """
        path = self._unit_path(digest, idx)
        first = idx - idx % UNIT
        if not any((digest, i) in self._index for i in range(first, first + UNIT) if i != idx):
            path.unlink(missing_ok=True)
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            _punch_hole(fd, self._slot_offset(idx), self._slot)
        except OSError as exc:  # no hole punching here: the space comes back with the file
            log.debug("cannot punch out block %d of %s: %s", idx, path, exc)
        finally:
            os.close(fd)

    def contains(self, file_key: Hashable, idx: int) -> bool:
        key = (self._digest(file_key), idx)
        with self._lock:
            return key in self._index and key not in self._pending

    def read(self, file_key: Hashable, idx: int, length: int, pool: BlockPool
             ) -> Block | None:
        """The block if its slot is whole and belongs to this identity and index; else None.

        *pool* provides the block's memory.
        """
        digest = self._digest(file_key)
        key = (digest, idx)
        with self._lock:
            if key in self._pending or self._index.get(key) is None:
                return None
        path = self._unit_path(digest, idx)
        direct = self.direct_io and _whole_pages(length) and pool.page_aligned
        data, why = _load(path, self._slot_offset(idx), (digest, idx, length), pool, direct)
        if why is None:
            return data
        log.warning("disk cache block %d in %s is bad (%s); fetching it again", idx, path, why)
        with self._lock:
            self.validation_failures += 1
            if self._index.discard(key) is not None:
                self._give_up(digest, idx)
        return None

    @property
    def accepting_writes(self) -> bool:
        """False while writes are stopped after a failure (a full disk); cheap, no lock."""
        resume = self._resume_at
        return resume is None or self._clock() >= resume

    def write(self, file_key: Hashable, idx: int, data: Block) -> bool:
        """Store a block; False if the index would not admit it, or writes are stopped."""
        if self._resume_at is not None and not self._try_again():
            return False
        digest = self._digest(file_key)
        key = (digest, idx)
        with self._lock:
            if key in self._index:
                return True
            if not self._index.put(key, _Size(len(data))):
                return False
            self._pending.add(key)
        path = self._unit_path(digest, idx)
        try:
            if path.parent not in self._made_dirs:
                path.parent.mkdir(mode=0o700, exist_ok=True)
                self._made_dirs.add(path.parent)
            direct = self.direct_io and _whole_pages(len(data)) and _page_aligned(data)
            _store(path, self._slot_offset(idx),
                   HEADER.pack(MAGIC, digest, idx, len(data), checksum(data)), data, direct)
        except OSError as exc:
            log.debug("cannot write disk cache block %d to %s: %s", idx, path, exc)
            self._made_dirs.discard(path.parent)  # removed under us? made again next time
            with self._lock:
                self._pending.discard(key)
                if self._index.discard(key) is not None:
                    self._give_up(digest, idx)
            self._stop_writes(exc)
            return False
        if self._stopped_since is not None:
            self._writes_work()
        with self._lock:
            self._pending.discard(key)
            if key in self._index:
                return True
            # Evicted or discarded while it was being written: its slot must go too.
            self._give_up(digest, idx)
        return False

    def _try_again(self) -> bool:
        """Whether a write may be tried while writes are stopped: once the pause is over.

        The first write after it measures the free space again, so a disk that
        stays full takes as many new blocks as old ones leave.
        """
        with self._lock:
            if self._resume_at is None:
                return True
            now = self._clock()
            if now < self._resume_at:
                self._refused += 1
                self._refused_unsaid += 1
                self._summarize(now)
                return False
            self._resume_at = None
            self._fit_capacity(self._index.used + len(self._index) * DATA_OFFSET)
            return True

    def _stop_writes(self, exc: OSError) -> None:
        """A write failed: refuse writes for WRITE_BACKOFF; say so once per episode."""
        with self._lock:
            now = self._clock()
            self._write_errors += 1
            self._resume_at = now + WRITE_BACKOFF
            if self._stopped_since is not None:
                self._errors_unsaid += 1
                self._summarize(now)
                return
            self._stopped_since = self._last_said = now
            self._episodes += 1
            self._errors_unsaid = self._refused_unsaid = 0
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        log.warning("disk cache %s at %s (%s): not writing for %.0f s", "full" if full else
                    "write failed", self._dir.path, exc.strerror or exc, WRITE_BACKOFF)

    def _summarize(self, now: float) -> None:
        """Log the counts of a stopped episode, at most every STOPPED_SUMMARY_EVERY; lock held."""
        assert self._stopped_since is not None
        if now - self._last_said < STOPPED_SUMMARY_EVERY:
            return
        log.warning("disk cache at %s still not writing after %.0f s: %d writes refused and "
                    "%d failed in the last %.0f s", self._dir.path, now - self._stopped_since,
                    self._refused_unsaid, self._errors_unsaid, now - self._last_said)
        self._last_said = now
        self._errors_unsaid = self._refused_unsaid = 0

    def _writes_work(self) -> None:
        """A write worked after a stop: the episode is over."""
        with self._lock:
            if self._stopped_since is None:
                return
            since, self._stopped_since = self._stopped_since, None
            refused = self._refused_unsaid
        log.info("disk cache at %s writes again after %.0f s (%d writes refused since the "
                 "last report)", self._dir.path, self._clock() - since, refused)

    def discard_file(self, file_key: Hashable) -> None:
        """Delete every block and note of one source identity (its content changed)."""
        digest = self._digest(file_key)
        with self._lock:
            units = {idx // UNIT for _, idx in self._index.discard_file(digest)}
            for unit in units:  # once per file, not once per block in it
                self._unit_path(digest, unit * UNIT).unlink(missing_ok=True)
        for note in (self.root / digest.hex()).glob(f"*{NOTE_SUFFIX}"):
            note.unlink(missing_ok=True)

    def _note_path(self, file_key: Hashable, name: str) -> Path:
        return self.root / self._digest(file_key).hex() / f"{name}{NOTE_SUFFIX}"

    def note(self, file_key: Hashable, name: str) -> bytes | None:
        """A small value kept for one source identity (its sha256), or None.

        Notes are not checksummed: the caller checks the value's form.
        """
        try:
            return self._note_path(file_key, name).read_bytes()
        except OSError:
            return None

    def set_note(self, file_key: Hashable, name: str, value: bytes) -> None:
        """Keep *value* for one source identity, across remounts. Best effort."""
        if self._resume_at is not None and not self._try_again():
            return
        path = self._note_path(file_key, name)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, value)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            log.debug("cannot keep the %s of %s: %s", name, path.parent, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._stop_writes(exc)


def _load(path: Path, offset: int, expect: tuple[bytes, int, int], pool: BlockPool,
          direct: bool) -> tuple[Block | None, str | None]:
    """Read the slot at *offset* of *path*; return its data, or what is wrong with it.

    *expect* is the (identity digest, index, length) the header must hold.
    *direct*: read header and data in one O_DIRECT preadv into *pool* memory.
    """
    length = expect[2]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        return None, f"unreadable: {exc}"
    try:
        if direct:
            head, data = pool.read(fd, offset, [DATA_OFFSET, length])
            raw = bytes(memoryview(head)[: HEADER.size])
        else:
            raw = os.pread(fd, HEADER.size, offset)
            [data] = pool.read(fd, offset + DATA_OFFSET, [length])
            os.posix_fadvise(fd, offset, DATA_OFFSET + length, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        return None, f"unreadable: {exc}"
    finally:
        os.close(fd)
    if len(raw) != HEADER.size or len(data) != length:
        return None, "truncated"
    magic, *got, got_sum = HEADER.unpack(raw)
    if magic != MAGIC or tuple(got) != expect:
        return None, "header does not match"
    if checksum(data) != got_sum:
        return None, "checksum mismatch"
    return data, None


def _store(path: Path, offset: int, header: bytes, data: Block, direct: bool) -> None:
    """Write a slot at *offset* of *path*: the header padded to DATA_OFFSET, then *data*.

    With O_DIRECT when *direct* (the caller checked the data allows it);
    otherwise through the page cache, flushed and dropped so the file's pages do
    not push the mounted files' pages out (measured: second switches of an 8 GB
    model set 5.0 s -> 12.8 s with them left in).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                 | (os.O_DIRECT if direct else 0), 0o600)
    try:
        if direct:
            head = _header_page()
            head[: len(header)] = header
            written = os.pwritev(fd, [head, data], offset)
        else:
            written = os.pwritev(fd, [header.ljust(DATA_OFFSET, b"\0"), data], offset)
        if written != DATA_OFFSET + len(data):  # the disk filled up mid-write
            raise OSError(errno.ENOSPC, "short write")
        if not direct:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, offset, DATA_OFFSET + len(data), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_thread_pages = threading.local()


def _header_page() -> mmap.mmap:
    """This thread's page-aligned DATA_OFFSET bytes (zeros past the header), as O_DIRECT wants."""
    page: mmap.mmap | None = getattr(_thread_pages, "page", None)
    if page is None:
        page = _thread_pages.page = mmap.mmap(-1, DATA_OFFSET)
    return page


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a file, leaving a hole that reads as zeros."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _whole_pages(length: int) -> bool:
    """O_DIRECT moves whole pages: a block's data may, a file's odd-sized tail may not."""
    return length % DATA_OFFSET == 0


def _page_aligned(data: Block) -> bool:
    return int(np.frombuffer(memoryview(data), np.uint8).ctypes.data) % mmap.PAGESIZE == 0


def _accepts_direct_io(directory: Path) -> bool:
    """Whether files in *directory* can be written and read with O_DIRECT."""
    probe = directory / f".direct-probe-{os.getpid()}{TMP_SUFFIX}"
    page = mmap.mmap(-1, DATA_OFFSET)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT,
                     0o600)
        try:
            return (os.pwritev(fd, [page], 0) == DATA_OFFSET
                    and os.preadv(fd, [page], 0) == DATA_OFFSET)
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        page.close()
        probe.unlink(missing_ok=True)


def _remove_older_formats(tagged: TaggedDir) -> None:
    """Delete the blocks an older fusecache left in our tagged directory, in a format this
    one cannot read. Only there: a v1/ elsewhere may be anyone's."""
    for old in tagged.path.iterdir():
        if old.name != FORMAT and re.fullmatch(r"v\d+", old.name) and old.is_dir():
            log.info("removing the disk cache %s of an older format", old)
            shutil.rmtree(old, ignore_errors=True)
