"""Read-ahead policy: one SequentialStream per open handle decides what to fetch early."""

from __future__ import annotations

from dataclasses import dataclass

from fusecache.config import MiB


@dataclass(frozen=True)
class ReadaheadConfig:
    """Knobs of the read-ahead; see SequentialStream for how they combine."""

    # The first window is small so a reader that only wants a header (safetensors
    # reads 8 bytes and a JSON header first) does not pull megabytes it never uses.
    initial_window: int = 2 * MiB
    # The window doubles per sequential read up to this; at the stand-in's few
    # hundred MB/s, 128 MiB keeps the lower mount busy for about half a second.
    # It is also held under a quarter of the memory cache (see BlockCache).
    max_window: int = 128 * MiB
    # The kernel's own read-ahead (4 MiB) sends several requests at once, and they
    # arrive out of order; a jump within this distance is still the same stream.
    slack: int = 8 * MiB


class SequentialStream:
    """Detects a sequential reader and returns the range it will want next.

    A first read, or a read far from where the stream stood, fetches only what
    it asked for (random access, such as mmap faults, is not flooded). Each read
    near the stream's position doubles the window, from initial_window up to
    max_window.
    """

    def __init__(
        self, config: ReadaheadConfig, max_window: int | None = None, unit: int = MiB
    ) -> None:
        self.config = config
        # Ranges are handed out in multiples of *unit* (the lower-mount read size),
        # so read-ahead reads stay large instead of one block per request.
        self.unit = unit
        self.max_window = min(config.max_window, max_window or config.max_window)
        self.position = -1  # where the next sequential read is expected; -1: no history
        self.window = 0
        self.fetched_until = 0  # read-ahead already asked for everything below this

    def on_read(self, offset: int, size: int) -> tuple[int, int] | None:
        """Record a read; return the [start, end) range to fetch ahead, or None."""
        end = offset + size
        slack = self.config.slack
        if self.position >= 0 and self.position - slack <= offset <= self.position + slack:
            self.window = min(max(self.window * 2, self.config.initial_window), self.max_window)
            self.position = max(self.position, end)
        else:
            self.window = 0
            self.position = end
            self.fetched_until = end
            return None
        start = max(self.position, self.fetched_until)
        stop = self.position + self.window
        if stop - start < self.unit and start - self.position >= self.unit:
            return None  # enough is on its way; wait until a whole unit is due
        if start >= stop:
            return None
        self.fetched_until = stop
        return start, stop
