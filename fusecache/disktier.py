"""The disk tier: cached blocks in local files that check themselves.

Layout: ROOT/v1/<identity digest>/<block index>.blk, one block per file. Each file
starts with a fixed header holding the format magic, the digest of the source
identity, the block index, the data length and a CRC32 of the data. A block whose
header or checksum does not match what the reader expects is a miss (and is
deleted), never data. Files are written under a temporary name and renamed into
place, so a crash at any moment leaves either no block or a whole one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Hashable
from pathlib import Path

from fusecache.blockio import Block, BlockPool
from fusecache.lru import BlockKey, ScanResistantLRU

log = logging.getLogger(__name__)

FORMAT = "v1"
MAGIC = b"FCBLK001"
HEADER = struct.Struct("<8s32sQQI")  # magic, identity digest, index, length, crc32
TMP_SUFFIX = ".tmp"


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
        # Reader threads and the writer thread share the index; file I/O runs
        # outside the lock.
        self._lock = threading.Lock()
        self._index: ScanResistantLRU[_Size] = ScanResistantLRU(max_bytes, self._evicted)
        self._digests: dict[Hashable, bytes] = {}
        # Indexed (their space is reserved) but not yet renamed into place.
        self._pending: set[BlockKey] = set()
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
                found.append((st.st_mtime_ns, digest, idx, st.st_size - HEADER.size))
        found.sort()
        held = sum(size + HEADER.size for *_, size in found)
        free = shutil.disk_usage(self.root).free
        self._index.capacity = min(max_bytes, held + int(free * 0.9))
        for _, digest, idx, size in found:
            # Indexed by digest: the file key is unknown until a reader opens the file.
            if size >= 0 and not self._index.put((digest, idx), _Size(size)):
                self._path(digest, idx).unlink(missing_ok=True)
        if found:
            log.info("disk cache %s: %d blocks, %d bytes", self.root, len(self._index),
                     self._index.used)

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
        data, why = self._load(path, digest, idx, length, pool)
        if why is None:
            return data
        log.warning("disk cache block %s is bad (%s); fetching it again", path, why)
        with self._lock:
            self.validation_failures += 1
            self._index.discard(key)
        path.unlink(missing_ok=True)
        return None

    @staticmethod
    def _load(path: Path, digest: bytes, idx: int, length: int, pool: BlockPool
              ) -> tuple[Block | None, str | None]:
        """Read the block at *path*; return it, or what is wrong with it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return None, f"unreadable: {exc}"
        try:
            raw = os.pread(fd, HEADER.size, 0)
            if len(raw) != HEADER.size:
                return None, "truncated header"
            magic, got_digest, got_idx, got_len, crc = HEADER.unpack(raw)
            if (magic, got_digest, got_idx, got_len) != (MAGIC, digest, idx, length):
                return None, "header does not match"
            if os.fstat(fd).st_size != HEADER.size + length:
                return None, "wrong length"
            [data] = pool.read(fd, HEADER.size, [length])
            _drop_pages(fd)
        except OSError as exc:
            return None, f"unreadable: {exc}"
        finally:
            os.close(fd)
        if len(data) != length:
            return None, "wrong length"
        if zlib.crc32(data) != crc:
            return None, "checksum mismatch"
        return data, None

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
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                header = HEADER.pack(MAGIC, digest, idx, len(data), zlib.crc32(data))
                if os.writev(fd, [header, data]) != len(header) + len(data):
                    raise OSError("short write (disk full?)")
                _drop_pages(fd, flush=True)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            log.warning("cannot write disk cache block %s: %s", path, exc)
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


def _drop_pages(fd: int, flush: bool = False) -> None:
    """Keep block files out of the page cache.

    Their bytes already sit in our memory tier and in the kernel's pages of the
    mounted file; a third copy in the page cache would push the mounted file's
    pages out (measured: second switches of a 8 GB model set 5.0 s -> 12.8 s).
    Dirty pages cannot be dropped, so a fresh write is flushed first.
    """
    if flush:
        os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
