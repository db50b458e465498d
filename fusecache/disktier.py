"""The disk tier: cached blocks in local files that check themselves.

Layout: ROOT/v2/<identity digest>/<block index>.blk, one block per file. Each file
starts with a 4 KiB header holding the format magic, the digest of the source
identity, the block index, the data length and an XXH3-64 checksum of the data;
the data follows at 4 KiB. A block whose header or checksum does not match what
the reader expects is a miss (and is deleted), never data. Files are written under
a temporary name and renamed into place, so a crash at any moment leaves either no
block or a whole one.

Whole blocks move with O_DIRECT where the file system allows it: straight between
the device and the block's own memory, with no copy into the page cache, whose
pages belong to the mounted files readers map.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import shutil
import struct
import threading
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import xxhash

from fusecache.blockio import Block, BlockPool
from fusecache.lru import BlockKey, ScanResistantLRU

log = logging.getLogger(__name__)

FORMAT = "v2"
MAGIC = b"FCBLK002"
HEADER = struct.Struct("<8s32sQQQ")  # magic, identity digest, index, length, xxh3-64
# Where the data starts: one page, so O_DIRECT transfers of the data stay aligned.
DATA_OFFSET = 4096
TMP_SUFFIX = ".tmp"


def checksum(data: Block) -> int:
    """XXH3-64 of a block: 30 GB/s here, against zlib.crc32's 2.7 (see native/README.md)."""
    return xxhash.xxh3_64_intdigest(data)


def identity_digest(file_key: Hashable) -> bytes:
    """A stable 32-byte name for a source identity (its repr is deterministic)."""
    return hashlib.sha256(repr(file_key).encode()).digest()


class _Size(int):
    """An index entry: only the block's size is kept in memory."""

    def __len__(self) -> int:
        return int(self)


class DiskTier:
    """Blocks on local disk, bounded by bytes, surviving remounts.

    The methods here block (file I/O); callers run them in worker threads,
    except lookups of the in-memory index (`contains`).
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root / FORMAT
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        os.chmod(self.root, 0o700)
        _remove_older_formats(root)
        # tmpfs (before Linux 6.6) and some FUSE file systems refuse O_DIRECT.
        self.direct_io = _accepts_direct_io(self.root)
        # Reader threads and the writer thread share the index; file I/O runs
        # outside the lock.
        self._lock = threading.Lock()
        self._index: ScanResistantLRU[_Size] = ScanResistantLRU(max_bytes, self._evicted)
        self._digests: dict[Hashable, bytes] = {}
        # Indexed (their space is reserved) but not yet renamed into place.
        self._pending: set[BlockKey] = set()
        self._made_dirs: set[Path] = set()  # block directories known to exist
        self.validation_failures = 0
        self._load_index(max_bytes)

    @property
    def capacity(self) -> int:
        return self._index.capacity

    @property
    def used(self) -> int:
        return self._index.used

    def _digest(self, file_key: Hashable) -> bytes:
        digest = self._digests.get(file_key)
        if digest is None:
            digest = self._digests[file_key] = identity_digest(file_key)
        return digest

    def _path(self, digest: bytes, idx: int) -> Path:
        return self.root / digest.hex() / f"{idx}.blk"

    def _load_index(self, max_bytes: int) -> None:
        """Index what an earlier daemon left, oldest first; drop half-written files.

        The capacity is the smaller of *max_bytes* and what the disk can take:
        what we already hold plus 90% of the free space.
        """
        found = []
        for d in self.root.iterdir():
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                if entry.name.endswith(TMP_SUFFIX):
                    os.unlink(entry.path)
                    continue
                try:
                    idx = int(entry.name.removesuffix(".blk"))
                    digest = bytes.fromhex(d.name)
                    st = entry.stat()
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime_ns, digest, idx, st.st_size - DATA_OFFSET))
        found.sort()
        held = sum(size + DATA_OFFSET for *_, size in found)
        free = shutil.disk_usage(self.root).free
        self._index.capacity = min(max_bytes, held + int(free * 0.9))
        for _, digest, idx, size in found:
            # Indexed by digest: the file key is unknown until a reader opens the file.
            if size >= 0 and not self._index.put((digest, idx), _Size(size)):
                self._path(digest, idx).unlink(missing_ok=True)
        log.info("disk cache %s: %d blocks, %d bytes; %s", self.root, len(self._index),
                 self._index.used, "O_DIRECT" if self.direct_io else
                 "no O_DIRECT here, through the page cache")

    def _evicted(self, key: BlockKey, size: _Size) -> None:
        digest = key[0]
        assert isinstance(digest, bytes)
        self._path(digest, key[1]).unlink(missing_ok=True)

    def contains(self, file_key: Hashable, idx: int) -> bool:
        key = (self._digest(file_key), idx)
        with self._lock:
            return key in self._index and key not in self._pending

    def read(self, file_key: Hashable, idx: int, length: int, pool: BlockPool
             ) -> Block | None:
        """The block if its file is whole and belongs to this identity and index; else None.

        *pool* provides the block's memory.
        """
        digest = self._digest(file_key)
        key = (digest, idx)
        with self._lock:
            if key in self._pending or self._index.get(key) is None:
                return None
        path = self._path(digest, idx)
        direct = self.direct_io and _whole_pages(length) and pool.page_aligned
        data, why = _load(path, digest, idx, length, pool, direct)
        if why is None:
            return data
        log.warning("disk cache block %s is bad (%s); fetching it again", path, why)
        with self._lock:
            self.validation_failures += 1
            self._index.discard(key)
        path.unlink(missing_ok=True)
        return None

    def write(self, file_key: Hashable, idx: int, data: Block) -> bool:
        """Store a block; False if the index would not admit it."""
        digest = self._digest(file_key)
        key = (digest, idx)
        with self._lock:
            if key in self._index:
                return True
            if not self._index.put(key, _Size(len(data))):
                return False
            self._pending.add(key)
        path = self._path(digest, idx)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            if path.parent not in self._made_dirs:
                path.parent.mkdir(mode=0o700, exist_ok=True)
                self._made_dirs.add(path.parent)
            direct = self.direct_io and _whole_pages(len(data)) and _page_aligned(data)
            _store(tmp, HEADER.pack(MAGIC, digest, idx, len(data), checksum(data)), data, direct)
            os.rename(tmp, path)
        except OSError as exc:
            log.warning("cannot write disk cache block %s: %s", path, exc)
            self._made_dirs.discard(path.parent)  # removed under us? made again next time
            with self._lock:
                self._pending.discard(key)
                self._index.discard(key)
            tmp.unlink(missing_ok=True)
            return False
        with self._lock:
            self._pending.discard(key)
            if key in self._index:
                return True
        # Evicted or discarded while it was being written: its file must go too.
        path.unlink(missing_ok=True)
        return False

    def discard_file(self, file_key: Hashable) -> None:
        """Delete every block of one source identity (its content changed)."""
        digest = self._digest(file_key)
        with self._lock:
            doomed = self._index.discard_file(digest)
        for key in doomed:
            self._path(digest, key[1]).unlink(missing_ok=True)


def _load(path: Path, digest: bytes, idx: int, length: int, pool: BlockPool, direct: bool
          ) -> tuple[Block | None, str | None]:
    """Read the block at *path*; return it, or what is wrong with it.

    *direct*: read header and data in one O_DIRECT preadv into *pool* memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        return None, f"unreadable: {exc}"
    try:
        if os.fstat(fd).st_size != DATA_OFFSET + length:
            return None, "wrong length"
        if direct:
            head, data = pool.read(fd, 0, [DATA_OFFSET, length])
            raw = bytes(memoryview(head)[: HEADER.size])
        else:
            raw = os.pread(fd, HEADER.size, 0)
            [data] = pool.read(fd, DATA_OFFSET, [length])
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        return None, f"unreadable: {exc}"
    finally:
        os.close(fd)
    if len(raw) != HEADER.size or len(data) != length:
        return None, "truncated"
    magic, got_digest, got_idx, got_len, got_sum = HEADER.unpack(raw)
    if (magic, got_digest, got_idx, got_len) != (MAGIC, digest, idx, length):
        return None, "header does not match"
    if checksum(data) != got_sum:
        return None, "checksum mismatch"
    return data, None


def _store(path: Path, header: bytes, data: Block, direct: bool) -> None:
    """Write a new block file: the header padded to DATA_OFFSET, then *data*.

    With O_DIRECT when *direct* (the caller checked the data allows it);
    otherwise through the page cache, flushed and dropped so the file's pages do
    not push the mounted files' pages out (measured: second switches of an 8 GB
    model set 5.0 s -> 12.8 s with them left in).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                 | (os.O_DIRECT if direct else 0), 0o600)
    try:
        if direct:
            head = _header_page()
            head[: len(header)] = header
            written = os.writev(fd, [head, data])
        else:
            written = os.writev(fd, [header.ljust(DATA_OFFSET, b"\0"), data])
        if written != DATA_OFFSET + len(data):
            raise OSError("short write (disk full?)")
        if not direct:
            os.fdatasync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_thread_pages = threading.local()


def _header_page() -> mmap.mmap:
    """This thread's page-aligned DATA_OFFSET bytes (zeros past the header), as O_DIRECT wants."""
    page: mmap.mmap | None = getattr(_thread_pages, "page", None)
    if page is None:
        page = _thread_pages.page = mmap.mmap(-1, DATA_OFFSET)
    return page


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


def _remove_older_formats(root: Path) -> None:
    """Delete the blocks an older fusecache left in a format this one cannot read."""
    for old in root.iterdir():
        if old.name != FORMAT and re.fullmatch(r"v\d+", old.name) and old.is_dir():
            log.info("removing the disk cache %s of an older format", old)
            shutil.rmtree(old, ignore_errors=True)
