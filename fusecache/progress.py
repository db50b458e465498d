"""Progress of a long job in bytes: a bar on a terminal, plain lines elsewhere (logs, CI)."""

from __future__ import annotations

import shutil
import time
from typing import TextIO

from fusecache.config import format_size

# A plain line every 5 s: a container log shows the job is alive without
# filling up with one line per file or per poll.
PLAIN_EVERY = 5.0
# A terminal's bar is redrawn at most this often: smooth to the eye, cheap.
BAR_EVERY = 0.2


class Progress:
    """Draws done/total bytes with rate and ETA on *out*; *tty* picks bar or lines."""

    def __init__(self, out: TextIO, tty: bool, total: int, what: str) -> None:
        self._out = out
        self._tty = tty
        self._total = total
        self._what = what
        self._start = time.monotonic()
        self._first_done: int | None = None  # what was done already when the job began
        self._drawn = 0.0

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        """Show *done* bytes of the total, at most every BAR_EVERY or PLAIN_EVERY s."""
        now = time.monotonic()
        if self._first_done is None:
            self._first_done = done
        if not force and now - self._drawn < (BAR_EVERY if self._tty else PLAIN_EVERY):
            return
        self._drawn = now
        line = self._line(done, now - self._start, note)
        if self._tty:
            width = shutil.get_terminal_size().columns
            self._out.write("\r" + line[: width - 1].ljust(width - 1))
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def say(self, text: str) -> None:
        """A line of its own, under the bar on a terminal."""
        if self._tty:
            self._out.write("\r\033[K")
        self._out.write(text + "\n")
        self._out.flush()
        self._drawn = 0.0  # redraw the bar at once

    def close(self, done: int, note: str = "") -> None:
        self.update(done, note, force=True)
        if self._tty:
            self._out.write("\n")
            self._out.flush()

    def _line(self, done: int, elapsed: float, note: str) -> str:
        total = max(self._total, 1)
        rate = (done - (self._first_done or 0)) / elapsed if elapsed > 0 else 0.0
        left = self._total - done
        eta = "" if not left else f"ETA {left / rate:.0f} s" if rate > 0 else "ETA -"
        amount = f"{format_size(done)} of {format_size(self._total)}"
        parts = [f"{format_size(rate)}/s", eta, note]
        if self._tty:
            filled = int(30 * done / total)
            bar = "#" * filled + "." * (30 - filled)
            return "  ".join([f"{self._what} [{bar}] {amount}", *filter(None, parts)])
        return ", ".join([f"{self._what}: {amount} ({100 * done // total}%)",
                          *filter(None, parts)])
