"""A lower file's fd: open while pinned, and a while after (IdleFds), then closed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fusecache.fs.lowerfile import IdleFds, LowerFile, Pin
from fusecache.source import LowerSource

pytestmark = pytest.mark.core


class CountingSource(LowerSource):
    """The lower directory, noting which fds it was asked to close."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.closed: list[int] = []

    async def close(self, fd: int) -> None:
        self.closed.append(fd)
        await super().close(fd)


async def _file(source: CountingSource, nursery: trio.Nursery, idle: IdleFds | None,
                name: str) -> tuple[LowerFile, int]:
    (Path(os.fsdecode(source.root)) / name).write_bytes(b"x")
    fd, ident = await source.open(name.encode())
    f = LowerFile(ident, source, nursery, idle)
    with Pin(f):
        f.attach(fd)
    return f, fd


async def test_an_fd_nobody_holds_stays_open_its_linger_then_closes(tmp_path: Path) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        idle = IdleFds(nursery, linger=0.5)
        f, fd = await _file(source, nursery, idle, "model")
        await trio.sleep(0.3)
        assert f.fd == fd and source.closed == [], "still open within the linger"
        pin = Pin(f)  # a loader opens it again: the same fd, what it loaded and all
        await trio.sleep(0.5)
        pin.release()
        await trio.sleep(0.3)
        assert f.fd == fd, "the linger counts from the last release"
        await trio.sleep(0.4)
        assert f.fd is None and source.closed == [fd]
        assert len(idle) == 0


async def test_past_the_most_the_fd_idle_longest_closes_at_once(tmp_path: Path) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        idle = IdleFds(nursery, linger=60.0, most=2)
        files = [await _file(source, nursery, idle, f"m{i}") for i in range(3)]
        await trio.sleep(0.1)
        assert [f.fd for f, _ in files] == [None, files[1][1], files[2][1]]
        assert source.closed == [files[0][1]]
        nursery.cancel_scope.cancel()


async def test_without_a_keeper_or_a_linger_the_fd_closes_with_the_last_pin(
        tmp_path: Path) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        for idle in (None, IdleFds(nursery, linger=0.0)):
            f, fd = await _file(source, nursery, idle, "model")
            await trio.sleep(0.1)
            assert f.fd is None and fd in source.closed
