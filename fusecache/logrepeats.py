"""Errors that can repeat once per request are logged once, then counted and summarised.

A broken lower file fails every read of it, and a reader retries: one line per
failure would push the daemon's capped log (logs.py) past how the trouble began
within minutes. So a message is logged the first time; the same message again
(digits aside, so offsets and sizes do not make it new) is counted, and the count
is logged as one line every PERIOD while it goes on. A message not seen for a
whole PERIOD is forgotten, so the next episode is logged in full again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

# One summary a minute: a line per minute of trouble keeps hours of it in the
# capped log, and a minute is soon enough for someone watching it.
PERIOD = 60.0
# Kinds of message tracked at once; past this, new kinds share one count. A model
# tree has thousands of files, but not thousands failing in different ways at once.
MAX_KINDS = 1000
OTHER = "(other repeated messages)"


@dataclass
class _Kind:
    level: int
    since: float  # the start of the period being counted
    repeats: int = 0
    last: str = ""


class RepeatedLog:
    """A logger's front that logs each kind of message once, then counts it.

    Thread-safe: disk-tier reads log from worker threads.
    """

    def __init__(self, logger: logging.Logger, period: float = PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._period = period
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()
        _ALL.append(self)

    def log(self, level: int, msg: str, *args: object, exc_info: object = None) -> None:
        """Log *msg* % *args* unless its kind was logged this period; then count it."""
        text = msg % args if args else msg
        kind = re.sub(r"\d+", "#", text)
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is None and len(self._kinds) >= MAX_KINDS:
                kind, seen = OTHER, self._kinds.setdefault(OTHER, _Kind(level, now))
            if seen is None:
                self._kinds[kind] = _Kind(level, now)
            else:
                seen.repeats += 1
                seen.last = text
                summary = self._summary(kind, seen, now, force=False)
        if seen is None:
            self._logger.log(level, "%s", text, exc_info=exc_info)  # type: ignore[arg-type]
        elif summary is not None:
            self._logger.log(seen.level, "%s", summary)

    def summarise(self, force: bool = False) -> None:
        """Log the count of each kind whose period is over (*force*: of every kind)."""
        now = self._clock()
        with self._lock:
            lines = [(seen.level, self._summary(kind, seen, now, force))
                     for kind, seen in list(self._kinds.items())]
        for level, line in lines:
            if line is not None:
                self._logger.log(level, "%s", line)

    def _summary(self, kind: str, seen: _Kind, now: float, force: bool) -> str | None:
        """The count of *kind* if its period is over, starting the next; under the lock."""
        if not force and now - seen.since < self._period:
            return None
        if seen.repeats == 0:  # quiet for a whole period: the episode is over
            del self._kinds[kind]
            return None
        line = (f"{seen.repeats} more like this in the last {now - seen.since:.0f} s, "
                f"the last: {seen.last}")
        seen.since, seen.repeats = now, 0
        return line


_ALL: list[RepeatedLog] = []  # every RepeatedLog, for summarise_every


async def summarise_every(period: float = PERIOD) -> None:
    """Log the counts of every RepeatedLog each *period*, so a count that stopped still shows."""
    try:
        while True:
            await trio.sleep(period)
            for repeats in _ALL:
                repeats.summarise()
    finally:
        for repeats in _ALL:  # unmounting: what was counted so far
            repeats.summarise(force=True)
