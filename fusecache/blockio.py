"""Block memory and block copies: the C module when it is built, else its pure-Python twin.

`BlockPool(slot_size).read(fd, offset, sizes)` fills consecutive blocks from a
file; `.join(parts)` assembles one reply from block ranges. The C version
(native/blockpool.c, built as `fusecache._native`) returns read-only blocks whose
memory is reused without page faults; this module's `PyBlockPool` is the
reference it is tested against and the fallback where no compiler was at hand.

`FUSECACHE_NATIVE=0` selects the twin (the bench compares the two);
`FUSECACHE_REQUIRE_NATIVE=1` turns a missing C module into an error (CI and the
container set it, so a broken build cannot hide behind the fallback).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class Block(Protocol):
    """Bytes of one block or reply: the C Block, bytes or bytearray."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...


class BlockPool(Protocol):
    """What the cache needs of block memory; both implementations provide it."""

    @property
    def page_aligned(self) -> bool:
        """Blocks start on a page boundary, so an O_DIRECT read may land in them."""

    def read(self, fd: int, offset: int, sizes: Sequence[int]) -> list[Block]: ...
    def join(self, parts: Sequence[Block | memoryview]) -> Block: ...
    def statistics(self) -> dict[str, int]: ...


class PyBlockPool:
    """The pure-Python twin: bytearrays from the allocator, one copy per join."""

    page_aligned = False  # the allocator places bytearrays anywhere

    def __init__(self, slot_size: int, reserve_bytes: int = 64 << 20) -> None:
        if slot_size <= 0 or slot_size % os.sysconf("SC_PAGESIZE"):
            raise ValueError("slot_size must be a positive multiple of the page size")
        self.slot_size = slot_size

    def read(self, fd: int, offset: int, sizes: Sequence[int]) -> list[Block]:
        """Consecutive blocks at *offset*; short at end of file, empty past it."""
        if offset < 0 or any(n < 0 for n in sizes):
            raise ValueError("offset and sizes must not be negative")
        bufs = [bytearray(n) for n in sizes]
        want = sum(sizes)
        got = 0
        # A FUSE lower mount may return short reads before EOF; keep reading
        # until EOF (0) or everything asked for has arrived.
        while got < want:
            views, skip = [], got
            for b in bufs:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                views.append(memoryview(b)[skip:])
                skip = 0
            n = os.preadv(fd, views, offset + got)
            if n == 0:
                break
            got += n
        if got == want:
            return list(bufs)
        out: list[Block] = []
        for b in bufs:
            out.append(b if got >= len(b) else b[:got])
            got = max(0, got - len(b))
        return out

    def join(self, parts: Sequence[Block | memoryview]) -> Block:
        return b"".join(parts)

    def statistics(self) -> dict[str, int]:
        return {"slot_size": self.slot_size, "mapped_bytes": 0, "live_bytes": 0, "reused": 0}


class NativeMissing(RuntimeError):
    """FUSECACHE_REQUIRE_NATIVE=1 and the C module is not built."""


@functools.cache
def selected() -> tuple[type, str]:
    """The pool class in use and a description of it; logs a fallback once."""
    if os.environ.get("FUSECACHE_NATIVE") == "0":
        return PyBlockPool, "pure Python (FUSECACHE_NATIVE=0)"
    try:
        from fusecache._native import BlockPool as NativeBlockPool
    except ImportError as exc:
        if os.environ.get("FUSECACHE_REQUIRE_NATIVE") == "1":
            raise NativeMissing(f"FUSECACHE_REQUIRE_NATIVE=1 but the C module is not built "
                                f"({exc}); reinstall where gcc is present: pip install .") from None
        log.warning("the C module fusecache._native is not built (%s); falling back to the "
                    "slower pure-Python block copy", exc)
        return PyBlockPool, "pure Python (C module not built)"
    return NativeBlockPool, "native C"


def new_pool(slot_size: int) -> BlockPool:
    """A block pool of the implementation in use (see `selected`)."""
    pool: BlockPool = selected()[0](slot_size)
    return pool
