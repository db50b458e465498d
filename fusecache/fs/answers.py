"""The lower mount's known answers, served when a fresh one is late or cannot come.

What the lower mount answered (stat results, listings, link targets, xattrs,
statfs; errors such as ENOENT too) is kept. A question never answered before
waits for the lower mount (within its timeout). One answered before waits at
most `stale_after` seconds for a fresh answer, and not at all while the lower
mount is slow or not answering; it then gets the known answer, while the
question goes on in the background and its answer, once it comes, replaces the
known one. At most one background question per key is under way: later askers
wait for the same one.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import trio

from fusecache.errors import PASSTHROUGH_ERRNOS, FsError, LowerError
from fusecache.source_api import Source

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Asking:
    """A question to the lower mount under way; later askers wait for the same answer."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    # Askers waiting for it now (see KnownAnswers.wait_fresh): the question
    # hands out one share of its result to each (Opener.open: a pin apiece).
    waiters: int = 0
    result: Any = None


@dataclass(frozen=True)
class _Refusal:
    """A known answer that is an error (ENOENT, ENODATA...): served by raising it again."""

    errno: int
    strerror: str


def unavailable(exc: BaseException) -> bool:
    """Whether *exc* says the lower mount could not answer, rather than what it answered."""
    if isinstance(exc, LowerError):
        return True
    return isinstance(exc, OSError) and exc.errno not in PASSTHROUGH_ERRNOS


def log_no_answer(what: str, exc: Exception) -> None:
    """Log a background question's failure: the lower mount's are expected, others are bugs."""
    if isinstance(exc, (OSError, FsError)):
        log.debug("%s: %s", what, exc)
    else:
        log.error("%s", what, exc_info=exc)


class KnownAnswers:
    """The lower mount's last answer to each question, and the questions under way."""

    def __init__(self, source: Source, nursery: trio.Nursery) -> None:
        self._source = source
        self._nursery = nursery
        self._stale_after = source.stale_after
        self._known: dict[Hashable, Any] = {}
        self._asking: dict[Hashable, Asking] = {}
        self.stale_answers = 0  # questions answered from what was known

    async def answer(self, key: Hashable, ask: Callable[[], Awaitable[T]]) -> T:
        """The lower mount's answer to *ask*, or the last one if it has none in time.

        A known answer may be an error (ENOENT, ENODATA), raised again.
        """
        if key not in self._known:
            try:
                result = await ask()
            except OSError as exc:
                self._keep_refusal(key, exc)
                raise
            self._known[key] = result
            return result
        asking = self.asking(key, partial(self._ask, key, ask))
        fresh = await self.wait_fresh(asking)
        if not fresh or (asking.error is not None and unavailable(asking.error)):
            self.stale_answers += 1
        known = self._known[key]
        if isinstance(known, _Refusal):
            raise OSError(known.errno, known.strerror)
        return known  # type: ignore[no-any-return]

    async def _ask(self, key: Hashable, ask: Callable[[], Awaitable[object]],
                   asking: Asking) -> None:
        try:
            self._known[key] = await ask()
        except Exception as exc:  # a background task: nothing may escape into the nursery
            asking.error = exc
            if not (isinstance(exc, OSError) and self._keep_refusal(key, exc)):
                log_no_answer(f"no fresh answer to {key!r}", exc)

    def _keep_refusal(self, key: Hashable, exc: OSError) -> bool:
        """Keep *exc* as the known answer if it is one (ENOENT...), not a failure to answer."""
        if unavailable(exc):
            return False
        self._known[key] = _Refusal(exc.errno or errno.EIO, exc.strerror or "")
        return True

    def asking(self, key: Hashable, work: Callable[[Asking], Awaitable[None]]) -> Asking:
        """The question *key* under way; unless one is, *work* asks it in the background.

        *work* must let no exception escape (it sets `Asking.error`). Once it
        returns the question is no longer under way and its askers wake, with
        no await in between.
        """
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = Asking()
            self._nursery.start_soon(self._settle, key, work, asking)
        return asking

    async def _settle(self, key: Hashable, work: Callable[[Asking], Awaitable[None]],
                      asking: Asking) -> None:
        try:
            await work(asking)
        finally:
            del self._asking[key]
            asking.done.set()

    async def wait_fresh(self, asking: Asking) -> bool:
        """Wait for *asking* as long as a known answer may wait; whether it came in time.

        At most `stale_after` seconds, and not at all while the lower mount is
        slow or not answering. Counted among its waiters while waiting and,
        when it came, after.
        """
        if not self._source.answering(self._stale_after):
            return False
        asking.waiters += 1
        with trio.move_on_after(self._stale_after):
            await asking.done.wait()
        if asking.done.is_set():
            return True
        asking.waiters -= 1
        return False

    def served_stale(self) -> None:
        """Count a question answered from what was known (not by `answer`)."""
        self.stale_answers += 1
