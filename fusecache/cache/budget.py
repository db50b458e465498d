"""One memory budget: the block memory the daemon holds, by what holds it, against one limit."""

from __future__ import annotations

from fusecache.config import MemoryShares


class MemoryBudget:
    """Every holder of block memory takes from here before it holds, and gives back after.

    The model is mountpoint-s3's memory limiter. Each holder has a share
    (config.MemoryShares, each with its reason), so together they stay within
    one limit, and the daemon's RSS is that limit plus the interpreter and
    the pool's spare arenas (docs/design.md, "Memory"):
    - the memory tier keeps within its share by evicting (its size is in the
      stats as memory_used);
    - fetches hold a block from the moment a worker thread reads it until it
      lands in the memory tier: the threads (threads.ThreadPolicy) bound them to
      their share, so they need not ask;
    - the spill queue asks (`try_take`); a block that finds no room is not
      written to disk, rather than making the daemon grow.
    """

    def __init__(self, shares: MemoryShares) -> None:
        self.shares = shares
        self._spilling = 0

    @property
    def limit(self) -> int:
        """What all block memory stays within: the sum of the shares."""
        return self.shares.total

    @property
    def spilling(self) -> int:
        """Bytes of blocks that left memory and wait for a disk writer."""
        return self._spilling

    def try_take_spilling(self, n: int) -> bool:
        """Room for *n* more bytes waiting for a disk writer? Taken if so."""
        if self._spilling + n > self.shares.spilling:
            return False
        self._spilling += n
        return True

    def give_spilling(self, n: int) -> None:
        self._spilling -= n

    @property
    def spilling_has_room(self) -> bool:
        """Whether one more block may wait for a disk writer."""
        return self._spilling < self.shares.spilling
