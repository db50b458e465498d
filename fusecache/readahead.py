"""Read-ahead policy: what to fetch before it is asked for.

A SequentialStream per open handle follows one reader; a FileInterest per file
(across handles and opens) decides when the whole file is wanted.
"""

from __future__ import annotations

from fusecache.config import MiB, ReadaheadConfig


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
        self.jumps = 0  # reads in a row that were not where the stream stood (a first read is)
        self.streak = 0  # bytes read in order since the last jump

    @property
    def random(self) -> bool:
        """Whether the reader reads at random: two reads in a row that were not in order.

        One alone may be a sequential reader's first read, or its start elsewhere.
        """
        return self.jumps >= 2

    def heading_for(self, offset: int) -> bool:
        """Whether this reader streams through the file and will ask for *offset* itself.

        It read `streaming_after` in order since its last jump, none of its reads
        skipping more than `stream_holes` ahead (a mapped loader's faults come in
        short in-order runs, the kernel's read-around of each), and *offset* is not
        behind it (the kernel's read-ahead asks out of order within the slack).
        """
        return (self.streak >= self.config.streaming_after
                and offset >= self.position - self.config.slack)

    def on_read(self, offset: int, size: int) -> tuple[int, int] | None:
        """Record a read; return the [start, end) range to fetch ahead, or None."""
        end = offset + size
        # The kernel's own read-ahead sends a sequential reader's requests out of
        # order, within the slack; a random reader's read lands in it by chance
        # (one read in 32 on a 512 MiB file), so once random, only a read right
        # where the last one ended is in order again.
        slack = 0 if self.random else self.config.slack
        if self.position >= 0 and self.position - slack <= offset <= self.position + slack:
            self.window = min(max(self.window * 2, self.config.initial_window), self.max_window)
            # A read that skips further ahead than the kernel's read-ahead does is
            # in order for read-ahead, but starts a new streak.
            in_stride = offset <= self.position + self.config.stream_holes
            self.streak = self.streak + size if in_stride else size
            self.position = max(self.position, end)
            self.jumps = 0
        else:
            self.jumps += 1
            self.streak = size
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


class FileInterest:
    """Decides, across every handle on one file, when the whole file is wanted."""

    def __init__(self, config: ReadaheadConfig) -> None:
        self.config = config
        self.contiguous = 0  # bytes [0, contiguous) have been read, give or take slack
        self.scattered = 0  # reads beyond that, after the head was read
        self.head_read = 0  # bytes of the reads that made up the head
        self.triggered = False

    @property
    def streamed(self) -> bool:
        """Whether a reader read all of the head (but what the kernel's read-ahead has on
        its way) and nothing else: it streams through the file, and asks for what lies
        ahead itself. Reads that jump ahead within the slack make a head too, with
        holes: a loader's. Settled once triggered (no read counts after)."""
        return (self.contiguous >= self.config.whole_file_after and self.scattered == 0
                and self.head_read >= self.contiguous - self.config.stream_holes)

    def on_read(self, offset: int, size: int) -> bool:
        """Record a read; True exactly once, when the rest of the file should be fetched."""
        if self.triggered:
            return False
        if self.contiguous == 0 and offset != 0:
            pass  # the head is read first, by a hash pass or a loader; a random reader may not
        elif offset <= self.contiguous + self.config.slack:
            self.contiguous = max(self.contiguous, offset + size)
            self.head_read += size
        else:
            self.scattered += 1
        if (self.contiguous >= self.config.whole_file_after
                or self.scattered >= self.config.whole_file_scattered_reads):
            self.triggered = True
        return self.triggered
