"""The disk tier's file format: slots of self-checking blocks, eight to a unit file.

A unit file holds blocks unit*8 .. unit*8+7 of one source identity (one fetch from
the lower mount), each in its own slot: a 4 KiB header, then the block's data. A
slot never written, or given up, is a hole. The header holds the format magic, the
digest of the source identity, the block index, the data length and an XXH3-64
checksum of the data. A slot whose header or checksum does not match what the
reader expects is a miss, never data. A crash mid-write leaves at worst a slot that
fails its checks, so blocks are written in place, with no temporary file.

Eight blocks to a file because each file costs a create and its own metadata:
writing 512 one-block files with a rename each took 0.22-0.29 CPU-seconds of the
machine, writing the same blocks into slots of 64 files 0.11-0.20.

Whole blocks move with O_DIRECT where the file system allows it: straight between
the device and the block's own memory, with no copy into the page cache, whose
pages belong to the mounted files readers map.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import struct
import threading
from collections.abc import Hashable
from pathlib import Path

import xxhash

from fusecache.blockio import Block, BlockPool

FORMAT = "v3"
MAGIC = b"FCBLK003"
HEADER = struct.Struct("<8s32sQQQ")  # magic, identity digest, index, length, xxh3-64
# Where a slot's data starts: one page, so O_DIRECT transfers of the data stay aligned.
DATA_OFFSET = 4096
UNIT = 8  # blocks per file
NOTE_SUFFIX = ".note"  # beside the unit files: small values kept per identity
TMP_SUFFIX = ".tmp"  # a note or the O_DIRECT probe, before it is renamed or gone
def checksum(data: Block) -> int:
    """XXH3-64 of a block: 30 GB/s here, against zlib.crc32's 2.7 (see native/README.md)."""
    return xxhash.xxh3_64_intdigest(data)


def identity_digest(file_key: Hashable, block_size: int) -> bytes:
    """A stable 32-byte name for a source identity cut in blocks of *block_size*."""
    return hashlib.sha256(repr((file_key, block_size)).encode()).digest()


def load_slot(path: str, offset: int, expect: tuple[bytes, int, int], pool: BlockPool,
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


def store_slot(path: str, offset: int, header: bytes, data: Block, direct: bool) -> None:
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


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a file, leaving a hole that reads as zeros."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def whole_pages(length: int) -> bool:
    """O_DIRECT moves whole pages: a block's data may, a file's odd-sized tail may not."""
    return length % DATA_OFFSET == 0


def accepts_direct_io(directory: Path) -> bool:
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
