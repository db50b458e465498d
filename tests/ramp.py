"""Test data whose bytes reveal their own offset: a wrong block fails the first check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def ramp(offset: int, size: int, seed: int = 0) -> bytes:
    """The bytes at [offset, offset+size) of a file whose 8-byte words count up.

    Word i holds i + seed * 2**40 as little-endian uint64, so every aligned
    8 bytes name their own position (and the file they belong to).
    """
    first, last = offset // 8, (offset + size + 7) // 8
    words = np.arange(first, last, dtype="<u8") + np.uint64(seed << 40)
    raw = words.tobytes()
    start = offset - first * 8
    return raw[start : start + size]


def write_ramp(path: Path, size: int, seed: int = 0, chunk: int = 64 << 20) -> Path:
    """Write a ramp file of *size* bytes (in chunks, so large files are cheap)."""
    with open(path, "wb") as f:
        for off in range(0, size, chunk):
            f.write(ramp(off, min(chunk, size - off), seed))
    return path


def write_sparse_ramp(path: Path, size: int, marks: list[int], seed: int = 0) -> Path:
    """A sparse file of *size* bytes holding 4 KiB of ramp at each offset in *marks*."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in marks:
            os.pwrite(f.fileno(), ramp(off, 4096, seed), off)
    return path
