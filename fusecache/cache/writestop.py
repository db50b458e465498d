"""When disk writes fail (a full disk, mostly): stop them for a while, say so once, try again."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# After a write fails (ENOSPC, EDQUOT: mostly a disk that something else
# filled), writes stop for this long, then the free space is measured again and
# writes are tried. A minute keeps the writer threads from failing a write per
# block read (a reader at 1 GB/s hands over a thousand a second), and a disk
# that was cleaned up is used again soon enough.
WRITE_BACKOFF = 60.0
# While writes stay stopped, the log says so (with counts) at most this often,
# not once per block: the default log lives in /run, in RAM.
STOPPED_SUMMARY_EVERY = 300.0


class WriteStop:
    """Episodes of stopped writes: each begins with a failed write and ends with one that works.

    Thread-safe: the disk writers and the event loop (`accepting`) share it.
    """

    def __init__(self, where: Path, clock: Callable[[], float]) -> None:
        self._where = where
        self._clock = clock
        self._lock = threading.Lock()
        self._resume_at: float | None = None  # writes refused until then
        self._stopped_since: float | None = None  # the episode under way
        self._last_said = 0.0  # when the log last spoke of the episode
        self.write_errors = 0
        self.refused = 0
        self.episodes = 0
        self._errors_unsaid = 0  # since the log last spoke
        self._refused_unsaid = 0

    @property
    def accepting(self) -> bool:
        """False while writes are stopped; cheap, no lock."""
        resume = self._resume_at
        return resume is None or self._clock() >= resume

    @property
    def stopped(self) -> bool:
        """Whether an episode is under way (writes stopped, or being tried again)."""
        return self._stopped_since is not None

    def admit(self, on_resume: Callable[[], None]) -> bool:
        """Whether a write may be tried now; *on_resume* runs once when a pause ends.

        The caller measures the free space again then, so a disk that stays full
        takes as many new blocks as old ones leave.
        """
        if self._resume_at is None:
            return True
        with self._lock:
            if self._resume_at is None:
                return True
            now = self._clock()
            if now < self._resume_at:
                self.refused += 1
                self._refused_unsaid += 1
                self._summarize(now)
                return False
            self._resume_at = None
        on_resume()
        return True

    def failed(self, exc: OSError) -> None:
        """A write failed: refuse writes for WRITE_BACKOFF; say so once per episode."""
        with self._lock:
            now = self._clock()
            self.write_errors += 1
            self._resume_at = now + WRITE_BACKOFF
            if self._stopped_since is not None:
                self._errors_unsaid += 1
                self._summarize(now)
                return
            self._stopped_since = self._last_said = now
            self.episodes += 1
            self._errors_unsaid = self._refused_unsaid = 0
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        log.warning("disk cache %s at %s (%s): not writing for %.0f s", "full" if full else
                    "write failed", self._where, exc.strerror or exc, WRITE_BACKOFF)

    def worked(self) -> None:
        """A write worked: an episode under way is over."""
        if self._stopped_since is None:
            return
        with self._lock:
            if self._stopped_since is None:
                return
            since, self._stopped_since = self._stopped_since, None
            refused = self._refused_unsaid
        log.info("disk cache at %s writes again after %.0f s (%d writes refused since the "
                 "last report)", self._where, self._clock() - since, refused)

    def _summarize(self, now: float) -> None:
        """Log the counts of the episode, at most every STOPPED_SUMMARY_EVERY; lock held."""
        assert self._stopped_since is not None
        if now - self._last_said < STOPPED_SUMMARY_EVERY:
            return
        log.warning("disk cache at %s still not writing after %.0f s: %d writes refused and "
                    "%d failed in the last %.0f s", self._where, now - self._stopped_since,
                    self._refused_unsaid, self._errors_unsaid, now - self._last_said)
        self._last_said = now
        self._errors_unsaid = self._refused_unsaid = 0
