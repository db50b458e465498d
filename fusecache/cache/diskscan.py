"""What an earlier daemon left in the disk tier's directory, found at mount time."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from fusecache.cache.slots import DATA_OFFSET, FORMAT, UNIT
from fusecache.cachedir import TaggedDir

log = logging.getLogger(__name__)


def left_behind(root: Path, slot: int, block_size: int) -> list[tuple[int, bytes, int, int]]:
    """(mtime, identity digest, block index, data bytes at most) of each written slot
    under *root*, oldest unit file first.

    *slot* is the distance between the starts of two slots of a unit file.
    Nothing is read but directory entries and extents: a slot that is not what
    it should be fails its checks when read.
    """
    found: list[tuple[int, bytes, int, int]] = []
    for d in root.iterdir():
        if not d.is_dir():
            continue
        for entry in os.scandir(d):
            try:
                unit = int(entry.name.removesuffix(".blk"))
                digest = bytes.fromhex(d.name)
                mtime = entry.stat().st_mtime_ns
                slots = list(_written_slots(entry.path, slot, block_size))
            except (ValueError, OSError):
                continue
            found.extend((mtime, digest, unit * UNIT + s, size) for s, size in slots)
    found.sort()
    return found


def _written_slots(path: str, slot: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(slot, data bytes at most) for each slot of a unit file that holds data.

    From the file's data extents, so a start does not read every header.
    Where the file system has no holes, every slot of the file's length counts.
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
            first = -(-start // slot)  # slots whose header lies in [start, end)
            for s in range(first, UNIT):
                base = s * slot
                if base + DATA_OFFSET > end:
                    break
                yield s, min(end - base - DATA_OFFSET, block_size)
            pos = end
    finally:
        os.close(fd)


def remove_older_formats(tagged: TaggedDir) -> None:
    """Delete the blocks an older fusecache left in our tagged directory, in a format this
    one cannot read. Only there: a v1/ elsewhere may be anyone's."""
    for old in tagged.path.iterdir():
        if old.name != FORMAT and re.fullmatch(r"v\d+", old.name) and old.is_dir():
            log.info("removing the disk cache %s of an older format", old)
            shutil.rmtree(old, ignore_errors=True)
