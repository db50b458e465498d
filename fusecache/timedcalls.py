"""Blocking calls on a source, each in a worker thread, within a time limit.

A call that gets no answer within `SourceConfig.timeout` fails with EIO (its
thread is abandoned: it ends whenever the source answers) and marks the
source unhealthy. While unhealthy, new calls fail at once instead of each
waiting out the timeout, and a probe repeats the call that timed out, one at a
time, until the source answers it; then calls go through again. Threads
stuck in the source are bounded by the limiters (trio keeps a token until
its thread really ends) and counted in `statistics()`.

Both sources (the directory source and the object-store source) are built on
`TimedCalls`, so the rule is one piece of code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from itertools import count
from typing import TypeVar, cast

import trio

from fusecache.config import SourceConfig
from fusecache.source_api import SourceStatistics, SourceUnavailable
from fusecache.threads import ThreadPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Call:
    """One call's thread, as seen from both sides: did it start, did it end, with what."""

    __slots__ = ("started", "finished", "abandoned", "since", "result")

    def __init__(self, since: float) -> None:
        self.started = self.finished = self.abandoned = False
        self.since = since
        self.result: object = _NONE  # what it returned, until its caller took it


_NONE = object()


class TimedCalls:
    """The timeout, unhealthy state and health probe that every source's calls go through.

    *what* names the source in log lines and errors ("the lower mount", "the
    object store").
    """

    def __init__(self, config: SourceConfig, threads: ThreadPolicy, what: str) -> None:
        self.timeout = config.timeout
        self.stale_after = config.stale_after
        self.what = what
        self._demand = threads.lower_demand
        self._metadata = threads.lower_metadata
        self._readahead = threads.lower_readahead
        self._closer = threads.lower_close  # waits for a thread as long as it takes
        self._prober = threads.lower_probe
        self._healthy = True
        self._unhealthy = trio.Event()  # set while unhealthy: wakes run()
        self._probe: Callable[[], object] | None = None
        self._timeouts = 0
        self._failed_fast = 0
        self._abandoned = 0
        self._lock = threading.Lock()  # _abandoned and _Call flags, shared with threads
        self._metadata_calls: dict[int, _Call] = {}  # under way, by serial
        self._serial = count()

    @property
    def healthy(self) -> bool:
        return self._healthy

    def answering(self, within: float) -> bool:
        """Healthy, and no metadata call has been waiting for longer than *within* seconds.

        Callers holding an earlier answer use this to decide whether waiting for
        a fresh one is worth it.
        """
        if not self._healthy:
            return False
        now = trio.current_time()
        return all(now - c.since <= within for c in self._metadata_calls.values())

    def statistics(self) -> SourceStatistics:
        return SourceStatistics(healthy=self._healthy, timeouts=self._timeouts,
                                failed_fast=self._failed_fast,
                                abandoned_threads=self._abandoned)

    async def _call(self, limiter: trio.CapacityLimiter, probe: Callable[[], object] | None,
                    fn: Callable[..., T], *args: object,
                    discard: Callable[[T], object] | None = None) -> T:
        """fn(*args) in a worker thread, within the timeout; see the module's docstring.

        *probe* repeats the call for the health probe, should it time out (None:
        the call itself is safe to repeat). *discard* undoes what a call returns
        after its caller gave up on it (an open's fd, closed in that thread, or
        in a new one), which would otherwise stay open for good: for s3fs, with
        the file's state loaded, which every later open of the path would share.
        """
        if not self._healthy:
            self._failed_fast += 1
            raise SourceUnavailable(f"{self.what} is not answering (retrying in the "
                                    "background)")
        call = _Call(trio.current_time())
        serial = next(self._serial)
        if limiter is self._metadata:
            self._metadata_calls[serial] = call

        def run() -> T:
            with self._lock:
                if call.abandoned:  # given up before this thread started: nobody waits
                    return cast(T, None)
                call.started = True
            result: object = _NONE
            try:
                result = fn(*args)
                return result  # type: ignore[return-value]
            finally:
                with self._lock:
                    call.finished = True
                    unwanted = call.abandoned
                    if not unwanted and discard is not None:
                        call.result = result  # for the caller to discard, if it left just now
                try:
                    if unwanted and discard is not None and result is not _NONE:
                        discard(result)  # type: ignore[arg-type]
                finally:
                    if unwanted:  # counted until the discard, too, is done
                        with self._lock:
                            self._abandoned -= 1

        answered = False
        try:
            with trio.move_on_after(self.timeout):
                answer = await trio.to_thread.run_sync(run, limiter=limiter,
                                                       abandon_on_cancel=True)
                answered = True
                return answer
        finally:
            self._metadata_calls.pop(serial, None)
            with self._lock:
                if not call.finished:  # timed out, or cancelled (unmounting)
                    call.abandoned = True
                    if call.started:  # one not started yet never calls fn, so it
                        self._abandoned += 1  # is no thread left in the source
                late, call.result = call.result, _NONE
            if not answered and discard is not None and late is not _NONE:
                # It ended, but its answer came after the caller gave up.
                trio.lowlevel.start_thread_soon(partial(discard, late),  # type: ignore[arg-type]
                                                lambda _: None, name="fusecache discard")
            del late
        # Timed out. Waiting for a thread is not the source's fault.
        if not call.started:
            raise SourceUnavailable(f"no thread free for {self.what} in {self.timeout:g} s")
        self._timeouts += 1
        self._mark_unhealthy(probe or partial(fn, *args), getattr(fn, "__name__", "call"))
        raise SourceUnavailable(f"no answer from {self.what} in {self.timeout:g} s")

    async def _meta(self, fn: Callable[..., T], *args: object) -> T:
        return await self._call(self._metadata, None, fn, *args)

    def _mark_unhealthy(self, probe: Callable[[], object], what: str) -> None:
        if not self._healthy:
            return
        self._healthy = False
        self._probe = probe
        self._unhealthy.set()
        log.warning("%s gave no answer to %s in %g s: failing its calls at once "
                    "and serving what is cached until it answers again",
                    self.what, what, self.timeout)

    async def run(self) -> None:
        """Bring the source back once it answers; runs until cancelled.

        The probe repeats the call that timed out (a stat cache can answer other
        calls while the store is gone), one thread at a time, with no time limit:
        it ends when the source answers, with data or with an error.
        """
        while True:
            await self._unhealthy.wait()
            probe, started = self._probe, trio.current_time()
            assert probe is not None
            try:
                await trio.to_thread.run_sync(probe, limiter=self._prober,
                                              abandon_on_cancel=True)
            except OSError:
                pass  # an answer all the same: the source is back, if not the file
            self._healthy = True
            self._unhealthy = trio.Event()
            log.warning("%s answers again (after %.1f s); its calls go through",
                        self.what, trio.current_time() - started + self.timeout)
