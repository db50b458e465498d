"""A count of jobs of one kind under way, and a wait for there to be none."""

from __future__ import annotations

import trio


class Underway:
    """How many jobs of one kind are under way; `wait_none` returns once there are none."""

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()
        self._none.set()

    def start(self) -> None:
        if self.count == 0:
            self._none = trio.Event()
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._none.set()

    async def wait_none(self) -> None:
        await self._none.wait()
