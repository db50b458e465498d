"""The spill queue: blocks that left memory, on their way to the disk tier's writers."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from pathlib import Path

import pytest
import trio

from fusecache.blockio import Block
from fusecache.cache.budget import MemoryBudget
from fusecache.cache.disk import DiskTier
from fusecache.cache.spill import SpillQueue
from fusecache.config import MemoryShares, MiB

pytestmark = pytest.mark.core


class SlowDisk(DiskTier):
    """A disk tier whose writes take a while, counting how many run at once."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 30)
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.release = threading.Event()

    def write(self, file_key: Hashable, idx: int, data: Block, page_aligned: bool = False
              ) -> bool:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(10)
        time.sleep(0.01)
        try:
            return super().write(file_key, idx, data, page_aligned)
        finally:
            with self.lock:
                self.running -= 1


def _queue(disk: DiskTier) -> tuple[SpillQueue, MemoryBudget]:
    budget = MemoryBudget(MemoryShares(cached=0, fetching=0, spilling=64 * MiB))
    return SpillQueue(disk, budget, page_aligned=False), budget


async def test_at_most_four_writes_at_once_and_every_block_lands(tmp_path: Path) -> None:
    disk = SlowDisk(tmp_path / "cache")
    spill, budget = _queue(disk)
    for idx in range(12):
        assert spill.offer(("f", idx), bytes([idx]) * MiB)
    assert budget.spilling == 12 * MiB
    await trio.sleep(0.1)
    assert disk.running == SpillQueue.WRITERS, "four under way, the rest queued"
    disk.release.set()
    with trio.fail_after(10):
        await spill.wait_spilled()
    assert disk.most == SpillQueue.WRITERS
    assert all(disk.contains("f", idx) for idx in range(12))
    assert budget.spilling == 0 and ("f", 0) not in spill


async def test_a_file_forgotten_while_its_block_is_written_is_not_written_twice(
        tmp_path: Path) -> None:
    disk = SlowDisk(tmp_path / "cache")
    spill, budget = _queue(disk)
    spill.offer(("old", 0), b"a" * MiB)
    await trio.sleep(0.05)  # its write is under way
    spill.forget_file("old")
    assert budget.spilling == 0, "its memory is the budget's again"
    # Offered anew (a fill of the old version still running) while the first write runs.
    spill.offer(("old", 0), b"a" * MiB)
    disk.release.set()
    with trio.fail_after(10):
        await spill.wait_spilled()
    assert disk.most == 1
    assert budget.spilling == 0
