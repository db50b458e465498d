"""Blocks on their way from memory to the disk tier: the queue, its writers, the unmount flush."""

from __future__ import annotations

import logging
from collections.abc import Hashable

import trio

from fusecache.blockio import Block
from fusecache.cache.budget import MemoryBudget
from fusecache.cache.disk import DiskTier
from fusecache.cache.underway import Underway
from fusecache.logrepeats import RepeatedLog
from fusecache.lru import BlockKey

log = logging.getLogger(__name__)
repeats = RepeatedLog(log)  # what fails for one block tends to fail for the next


class SpillQueue:
    """Blocks that left memory and wait for a disk writer; served from here meanwhile.

    The disk tier holds what memory lets go (evicted, or handed on once the kernel
    holds it): a block is written when it leaves memory, not when it arrives, so a
    model that fits in memory costs no disk writes at all (they cost 0.8 CPU-s per GB
    on this machine, a tenth of a cold read). Blocks waiting for a writer take their
    bytes from the memory budget's spilling share (config.MemoryShares); beyond
    that a block that leaves is not written (`dropped`) rather than growing memory
    without bound.
    """

    # One writer fell behind a 240 MB/s reader (117 of 400 blocks dropped); four
    # keep up.
    WRITERS = 4

    def __init__(self, disk: DiskTier, nursery: trio.Nursery, budget: MemoryBudget,
                 page_aligned: bool) -> None:
        self._disk = disk
        self._page_aligned = page_aligned  # the blocks' pool says so (BlockPool.page_aligned)
        self._budget = budget
        self._waiting: dict[BlockKey, Block] = {}
        self._writes = Underway()  # keys queued for the writers
        self.dropped = 0
        # A key per waiting block, and as many again for keys whose file changed.
        send, receive = trio.open_memory_channel[BlockKey](
            2 * budget.shares.spilling // disk.block_size)
        self._queue = send
        for _ in range(self.WRITERS):
            nursery.start_soon(self._write, receive)

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
        try:
            self._queue.send_nowait(key)
        except trio.WouldBlock:  # full of keys whose file changed meanwhile
            self._budget.give_spilling(len(block))
            self.dropped += 1
            return False
        self._waiting[key] = block
        self._writes.start()
        return True

    def forget_file(self, file_key: Hashable) -> None:
        """Drop a changed file's waiting blocks; their writers then find nothing."""
        for doomed in [k for k in self._waiting if k[0] == file_key]:
            self._budget.give_spilling(len(self._waiting.pop(doomed)))

    async def _write(self, receive: trio.MemoryReceiveChannel[BlockKey]) -> None:
        async for key in receive:
            block = self._waiting.get(key)  # None: its file changed meanwhile
            try:
                if block is not None:
                    await trio.to_thread.run_sync(self._disk.write, *key, block,
                                                  self._page_aligned)
            except Exception:
                repeats.log(logging.ERROR, "writing a block to the disk cache failed",
                            exc_info=True)
            finally:
                if (written := self._waiting.pop(key, None)) is not None:
                    self._budget.give_spilling(len(written))
                self._writes.end()

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
