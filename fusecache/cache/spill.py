"""Blocks on their way from memory to the disk tier: the queue, its writers, the unmount flush."""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

import trio

from fusecache.blockio import Block
from fusecache.cache.budget import MemoryBudget
from fusecache.cache.disk import DiskTier
from fusecache.cache.underway import Underway
from fusecache.logrepeats import RepeatedLog
from fusecache.lru import BlockKey

if TYPE_CHECKING:
    from outcome import Outcome

log = logging.getLogger(__name__)
repeats = RepeatedLog(log)  # what fails for one block tends to fail for the next


class SpillQueue:
    """Blocks that left memory and wait for a disk writer; served from here meanwhile.

    The disk tier holds what memory lets go (evicted, or handed on once the kernel
    holds it): a block is written when it leaves memory, not when it arrives, so a
    model that fits in memory costs no disk writes at all (they cost about 0.3 CPU-s
    per GB on this machine, a quarter of the daemon's cold read). Blocks waiting for
    a writer take their bytes from the memory budget's spilling share
    (config.MemoryShares); beyond that a block that leaves is not written
    (`dropped`) rather than growing memory without bound.
    """

    # One writer fell behind a 240 MB/s reader (117 of 400 blocks dropped); four
    # keep up.
    WRITERS = 4

    def __init__(self, disk: DiskTier, budget: MemoryBudget, page_aligned: bool) -> None:
        self._disk = disk
        self._page_aligned = page_aligned  # the blocks' pool says so (BlockPool.page_aligned)
        self._budget = budget
        self._waiting: dict[BlockKey, Block] = {}
        self._writes = Underway()  # keys queued for the writers
        self.dropped = 0
        # Each write runs in one of trio's cached threads and reports back to the
        # loop, at most WRITERS at a time: not a trio.to_thread hop per block, which
        # costs the loop 84 us to a report's 6 (measured), and a cold read spills
        # every block.
        self._token = trio.lowlevel.current_trio_token()
        self._queued: deque[BlockKey] = deque()
        self._writing: set[BlockKey] = set()
        # A key per waiting block, and as many again for keys whose file changed.
        self._max_queued = 2 * budget.shares.spilling // disk.block_size

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def get(self, key: BlockKey) -> Block | None:
        return self._waiting.get(key)

    @property
    def has_room(self) -> bool:
        return self._budget.spilling_has_room and self._disk.accepting_writes

    def offer(self, key: BlockKey, block: Block) -> bool:
        """Queue a block that leaves memory for a writer; False (counted) if there is no room."""
        if key in self._waiting or self._disk.contains(*key):
            return True
        if not self._disk.accepting_writes or not self._budget.try_take_spilling(len(block)):
            self.dropped += 1
            return False
        if len(self._queued) >= self._max_queued:  # full of keys whose file changed
            self._budget.give_spilling(len(block))
            self.dropped += 1
            return False
        self._waiting[key] = block
        self._writes.start()
        self._queued.append(key)
        self._start_writes()
        return True

    def forget_file(self, file_key: Hashable) -> None:
        """Drop a changed file's waiting blocks: a write not started finds nothing; one under
        way finishes, its slot under the old version's identity."""
        for doomed in [k for k in self._waiting if k[0] == file_key]:
            self._budget.give_spilling(len(self._waiting.pop(doomed)))

    def _start_writes(self) -> None:
        """Hand queued blocks to writer threads, up to WRITERS at a time."""
        while self._queued and len(self._writing) < self.WRITERS:
            key = self._queued.popleft()
            block = self._waiting.get(key)
            # None: its file changed meanwhile. Being written: queued again after its
            # file was forgotten and offered anew; the write under way does for both.
            if block is None or key in self._writing:
                self._writes.end()
                continue
            try:
                trio.lowlevel.start_thread_soon(
                    functools.partial(self._disk.write, *key, block, self._page_aligned),
                    functools.partial(self._report, key), name="fusecache disk write")
            except RuntimeError:  # no thread to be had: this block is not kept
                repeats.log(logging.ERROR, "no thread for a disk cache write", exc_info=True)
                self._budget.give_spilling(len(self._waiting.pop(key)))
                self._writes.end()
                continue
            self._writing.add(key)

    def _report(self, key: BlockKey, result: Outcome[bool]) -> None:
        """In the writer thread: tell the loop the write ended."""
        try:
            self._token.run_sync_soon(self._written, key, result)
        except trio.RunFinishedError:
            pass  # the daemon is gone

    def _written(self, key: BlockKey, result: Outcome[bool]) -> None:
        """In the loop: a write ended; its memory goes back to the budget, the next starts."""
        self._writing.discard(key)
        try:
            result.unwrap()
        except Exception:  # a bug or an odd file system: this block is not kept
            repeats.log(logging.ERROR, "writing a block to the disk cache failed",
                        exc_info=True)
        if (written := self._waiting.pop(key, None)) is not None:
            self._budget.give_spilling(len(written))
        self._writes.end()
        self._start_writes()

    async def wait_spilled(self) -> None:
        """Return once every block queued so far is written (or failed to be)."""
        await self._writes.wait_none()

    async def flush(self, held: list[tuple[BlockKey, Block]]) -> None:
        """Write every block of *held* (most recent first) the disk lacks, after the queue.

        For a clean unmount, so the next mount starts warm. The caller bounds
        the time; what is written by then stays, the log says how much.
        """
        disk = self._disk
        todo = [(k, b) for k, b in held if not disk.contains(*k)]
        pending = iter(todo)
        written = [0, 0]
        start = trio.current_time()

        async def writer() -> None:
            for key, block in pending:
                if await trio.to_thread.run_sync(disk.write, *key, block, self._page_aligned):
                    written[0] += 1
                    written[1] += len(block)

        try:
            await self.wait_spilled()
            async with trio.open_nursery() as nursery:
                for _ in range(self.WRITERS):
                    nursery.start_soon(writer)
        finally:
            log.info("wrote %d of %d blocks (%.0f MB) held in memory to the disk cache in %.1f s",
                     written[0], len(todo), written[1] / 1e6, trio.current_time() - start)
