"""Lower fds kept open after their last reader (fs/keptfds.py), and what a new version does."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from fusecache.blockio import Block, BlockPool
from fusecache.config import MiB, ReadaheadConfig, SourceConfig
from fusecache.errors import FsError, LowerError
from fusecache.fs.core import ROOT_INODE, FilesystemCore
from fusecache.fs.keptfds import KeptFds
from fusecache.fs.lowerfile import LowerFile, Pin
from fusecache.readahead import FileInterest
from fusecache.source import LowerSource
from fusecache.source_api import Identity, version_of
from tests.conftest import make_core
from tests.ramp import ramp, write_ramp

pytestmark = pytest.mark.core


class CountingSource(LowerSource):
    """The lower directory, noting the opens and closes asked of it, in order."""

    def __init__(self, root: Path, config: SourceConfig | None = None) -> None:
        super().__init__(root, config)
        self.calls: list[tuple[str, int]] = []

    async def open(self, path: bytes) -> tuple[int, Identity]:
        fd, ident = await super().open(path)
        self.calls.append(("open", fd))
        return fd, ident

    async def close(self, fd: int) -> None:
        self.calls.append(("close", fd))
        await super().close(fd)

    @property
    def closed(self) -> list[int]:
        return [fd for what, fd in self.calls if what == "close"]


async def _file(source: CountingSource, nursery: trio.Nursery, kept: KeptFds,
                name: str) -> tuple[LowerFile, int]:
    """A LowerFile whose fd was opened, pinned and released once: idle from now."""
    (Path(os.fsdecode(source.root)) / name).write_bytes(b"x")
    fd, ident = await source.open(name.encode())
    f = LowerFile(ident, source, nursery, kept)
    with Pin(f):
        f.attach(fd)
    return f, fd


async def test_an_idle_fd_closes_its_linger_after_the_last_release(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        kept = KeptFds(nursery, source, linger=5.0, most=64, max_age=60.0)
        f, fd = await _file(source, nursery, kept, "model")  # idle from t=0
        mock_clock.autojump_threshold = 0  # after the open: it waits on a thread
        await trio.sleep(3)
        Pin(f).release()  # a loader opened it again, same fd: idle again from t=3
        await trio.sleep(4)
        assert f.fd == fd and source.closed == [], "the linger counts from the last release"
        await trio.sleep(2)
        assert f.fd is None and source.closed == [fd] and len(kept) == 0


async def test_an_fd_open_past_its_max_age_closes_at_its_last_release(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        kept = KeptFds(nursery, source, linger=5.0, most=64, max_age=30.0)
        f, fd = await _file(source, nursery, kept, "model")
        mock_clock.autojump_threshold = 0
        for _ in range(10):  # reopened every 4 s: kept between opens, until it is 30 s old
            await trio.sleep(4)
            Pin(f).release()
        await trio.sleep(0.1)
        assert f.fd is None and source.closed == [fd]


async def test_past_the_most_the_fd_idle_longest_closes_at_once(tmp_path: Path) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        kept = KeptFds(nursery, source, linger=60.0, most=2, max_age=60.0)
        files = [await _file(source, nursery, kept, f"m{i}") for i in range(3)]
        await trio.sleep(0.1)
        assert [f.fd for f, _ in files] == [None, files[1][1], files[2][1]]
        assert source.closed == [files[0][1]]
        await kept.close_all()
        assert sorted(source.closed) == sorted(fd for _, fd in files) and len(kept) == 0
        nursery.cancel_scope.cancel()


async def test_a_file_held_whole_closes_with_the_last_pin(tmp_path: Path) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        kept = KeptFds(nursery, source, linger=60.0, most=64, max_age=60.0,
                       held_whole=lambda f: True)
        f, fd = await _file(source, nursery, kept, "model")
        await trio.sleep(0.1)
        assert f.fd is None and source.closed == [fd] and len(kept) == 0


async def test_with_no_linger_the_fd_closes_with_the_last_pin(tmp_path: Path) -> None:
    source = CountingSource(tmp_path)
    async with trio.open_nursery() as nursery:
        kept = KeptFds(nursery, source, linger=0.0, most=64, max_age=60.0)
        f, fd = await _file(source, nursery, kept, "model")
        await trio.sleep(0.1)
        assert f.fd is None and source.closed == [fd] and len(kept) == 0


@pytest.fixture
async def counted_core(tmp_path: Path) -> AsyncIterator[tuple[FilesystemCore, CountingSource]]:
    source = CountingSource(tmp_path / "src")
    async with make_core(tmp_path, 64 * MiB, source=source) as core:
        yield core, source


async def _open(core: FilesystemCore, name: bytes) -> int:
    attr = await core.lookup(ROOT_INODE, name)
    fh, _ = await core.open(attr.ino, os.O_RDONLY)
    return fh


async def test_a_file_opened_again_soon_reads_through_the_same_lower_fd(
        counted_core: tuple[FilesystemCore, CountingSource]) -> None:
    core, source = counted_core
    write_ramp(Path(os.fsdecode(source.root)) / "m", 3 * MiB)
    fh = await _open(core, b"m")
    first = core._handles[fh].file
    kept_fd = first.fd
    assert bytes(await core.read(fh, 0, 4096)) == ramp(0, 4096)
    core.release(fh)  # the header read is done
    await trio.sleep(0.05)
    assert first.fd == kept_fd and len(core.opener.kept) == 1
    fh = await _open(core, b"m")  # and the loader maps it
    assert core._handles[fh].file is first and first.fd == kept_fd
    assert bytes(await core.read(fh, MiB, 4096)) == ramp(MiB, 4096)
    await trio.sleep(0.05)
    opened = [fd for what, fd in source.calls if what == "open"]
    assert kept_fd not in source.closed and set(source.closed) == set(opened) - {kept_fd}, \
        "each fresh open's fd is closed; the kept one stays"
    core.release(fh)


async def test_a_file_the_cache_holds_whole_lets_its_lower_fd_go_at_the_last_release(
        counted_core: tuple[FilesystemCore, CountingSource]) -> None:
    """What s3fs and ossfs keep for an open file is as big as the file; once every block
    is here nothing more is wanted from below."""
    core, source = counted_core
    write_ramp(Path(os.fsdecode(source.root)) / "m", 3 * MiB)
    fh = await _open(core, b"m")
    f = core._handles[fh].file
    assert bytes(await core.read(fh, 0, 3 * MiB)) == ramp(0, 3 * MiB)
    assert core.cache.holds_all(f)
    kept_fd = f.fd
    core.release(fh)
    await trio.sleep(0.05)
    assert f.fd is None and kept_fd in source.closed and len(core.opener.kept) == 0
    lower = core.cache.statistics().lower_bytes
    fh = await _open(core, b"m")  # a loader opens it again: read from the cache
    assert bytes(await core.read(fh, MiB, 4096)) == ramp(MiB, 4096)
    assert core.cache.statistics().lower_bytes == lower
    core.release(fh)


class SlowLower(CountingSource):
    """A lower mount that takes its time over opens and closes; notes when each close ended."""

    def __init__(self, root: Path, open_delay: float, close_delay: float) -> None:
        super().__init__(root)
        self.open_delay, self.close_delay = open_delay, close_delay
        self.close_ended: dict[int, float] = {}
        self.open_started: list[float] = []

    async def open(self, path: bytes) -> tuple[int, Identity]:
        self.open_started.append(trio.current_time())
        await trio.sleep(self.open_delay)
        return await super().open(path)

    async def close(self, fd: int) -> None:
        await trio.sleep(self.close_delay)
        await super().close(fd)
        self.close_ended[fd] = trio.current_time()


# The old version's close still under way when the new open returns; or ended while it ran.
@pytest.mark.parametrize(("open_delay", "close_delay"), [(0.0, 0.3), (0.3, 0.1)])
async def test_a_new_version_opened_while_the_old_fd_closes_is_opened_anew(
        tmp_path: Path, open_delay: float, close_delay: float) -> None:
    """A file held whole closes its fd in the background at its last release; an open of
    a new version made before that close ended may share what the fd had loaded."""
    source = SlowLower(tmp_path / "src", open_delay, close_delay)
    async with make_core(tmp_path, 64 * MiB, source=source) as core:
        path = tmp_path / "src" / "m"
        write_ramp(path, 3 * MiB, seed=1)
        fh = await _open(core, b"m")
        old_fd = core._handles[fh].file.fd
        assert bytes(await core.read(fh, 0, 3 * MiB)) == ramp(0, 3 * MiB, seed=1)
        core.release(fh)  # held whole: the fd closes in the background, at once
        write_ramp(path, 2 * MiB, seed=2)
        os.utime(path, ns=(1, 10**18))
        source.calls.clear()
        fh = await _open(core, b"m")
        assert old_fd in source.close_ended
        opens = [fd for what, fd in source.calls if what == "open"]
        assert len(opens) == 2 and opens[0] in source.closed, \
            "the open made while the old fd was open below is closed, and the file opened again"
        assert source.open_started[-1] >= source.close_ended[old_fd]
        assert core._handles[fh].file.fd == opens[1]
        assert bytes(await core.read(fh, 0, 2 * MiB)) == ramp(0, 2 * MiB, seed=2)
        core.release(fh)


async def test_a_new_version_is_opened_anew_after_the_old_ones_kept_fd_closes(
        counted_core: tuple[FilesystemCore, CountingSource]) -> None:
    """s3fs and ossfs hand an open what a still open fd loaded: it must be closed first."""
    core, source = counted_core
    path = Path(os.fsdecode(source.root)) / "m"
    write_ramp(path, 3 * MiB, seed=1)
    fh = await _open(core, b"m")
    old_fd = core._handles[fh].file.fd
    assert old_fd is not None
    core.release(fh)
    write_ramp(path, 2 * MiB, seed=2)
    os.utime(path, ns=(1, 10**18))
    source.calls.clear()
    fh = await _open(core, b"m")
    calls = source.calls
    assert calls[0][0] == "open" and calls[1] == ("close", old_fd), calls
    assert calls[2] == ("close", calls[0][1]) and calls[3][0] == "open", \
        "the open made while the old fd was open is closed, and the file opened again"
    assert core._handles[fh].file.fd == calls[3][1]
    assert bytes(await core.read(fh, 0, 2 * MiB)) == ramp(0, 2 * MiB, seed=2)
    core.release(fh)


class SharedStateLower(CountingSource):
    """s3fs and ossfs as they behave: every open of a path that is still open somewhere is
    handed the state loaded for it, old bytes and all, while its stat is the path's current
    one (s3fs 1.90, measured on the stand-in: an overwritten object read b'AAAA' with the
    new size and mtime until every fd on it was closed)."""

    def __init__(self, root: Path, snapshots: Path, open_delays: list[float] | None = None,
                 close_delays: list[float] | None = None, config: SourceConfig | None = None
                 ) -> None:
        super().__init__(root, config)
        self._snapshots = snapshots
        self._open_delays = open_delays or []  # one per open, in turn: it answers that late
        self._close_delays = close_delays or []  # and per close
        self._state: dict[bytes, tuple[Path, int]] = {}  # path -> (its bytes, fds open)
        self._path_of: dict[int, bytes] = {}

    async def open(self, path: bytes) -> tuple[int, Identity]:
        state, count = self._state.get(path, (None, 0))
        if state is None:  # nothing loaded: this open loads what is there now
            state = self._snapshots / f"{len(self.calls)}"
            shutil.copyfile(self.full(path), state)
        self._state[path] = (state, count + 1)
        fd = os.open(state, os.O_RDONLY)
        self._path_of[fd] = path
        await trio.sleep(self._open_delays.pop(0) if self._open_delays else 0)
        fresh, ident = await super().open(path)  # the current stat, as s3fs answers it
        await super().close(fresh)
        self.calls[-2:] = [("open", fd)]
        return fd, ident

    async def close(self, fd: int) -> None:
        await trio.sleep(self._close_delays.pop(0) if self._close_delays else 0)
        await super().close(fd)
        path = self._path_of.pop(fd)  # the state goes once the close is answered
        state, count = self._state[path]
        self._state[path] = (state, count - 1)
        if count == 1:
            del self._state[path]

    async def read_blocks(self, pool: BlockPool, fd: int, offset: int, sizes: list[int],
                          expect: Identity, readahead: bool = False) -> list[Block]:
        blocks = await trio.to_thread.run_sync(pool.read, fd, offset, sizes)
        if version_of(os.stat(self.full(expect.path))) != expect.version:
            raise LowerError("changed")  # fstat: the state's stat, the path's current one
        return blocks


async def _held_then_replaced(core: FilesystemCore, path: Path) -> int:
    """A handle on *path* (3 MiB, seed 1) that has read its head, still open, once the file
    was replaced below (2 MiB, seed 2, a new mtime): a model still mapped when its object
    is overwritten."""
    write_ramp(path, 3 * MiB, seed=1)
    old = await _open(core, path.name.encode())
    assert bytes(await core.read(old, 0, 4096)) == ramp(0, 4096, seed=1)
    write_ramp(path, 2 * MiB, seed=2)
    os.utime(path, ns=(1, 10**18))
    return old


async def test_a_new_version_is_never_read_through_the_state_of_an_old_handles_fd(
        tmp_path: Path) -> None:
    """A model still mapped from the old version holds its lower fd open: the new version
    must not be read while that fd is open below, nor the old one read below any more."""
    (tmp_path / "snapshots").mkdir()
    source = SharedStateLower(tmp_path / "src", tmp_path / "snapshots")
    async with make_core(tmp_path, 64 * MiB, source=source) as core:
        old = await _held_then_replaced(core, tmp_path / "src" / "m")
        new = await _open(core, b"m")
        assert bytes(await core.read(new, 0, 2 * MiB)) == ramp(0, 2 * MiB, seed=2)
        with pytest.raises(FsError) as info:  # not here, and gone below
            await core.read(old, 2 * MiB, 4096)
        assert info.value.errno == errno.EIO
        core.release(old)
        core.release(new)


async def test_two_opens_of_a_new_version_at_once_both_read_it(tmp_path: Path) -> None:
    """The second open's fresh fd shares the old state too: it must be closed before the
    first is opened again."""
    (tmp_path / "snapshots").mkdir()
    # The old handle's open; then opens of the new version answer late: without turns,
    # the second open's fresh fd is still open below when the first opens again.
    source = SharedStateLower(tmp_path / "src", tmp_path / "snapshots", [0, 0.05, 0.3])
    async with make_core(tmp_path, 64 * MiB, source=source) as core:
        old = await _held_then_replaced(core, tmp_path / "src" / "m")
        attr = await core.lookup(ROOT_INODE, b"m")  # shows the new version
        got: list[bytes] = []

        async def open_and_read() -> None:
            fh, _ = await core.open(attr.ino, os.O_RDONLY)
            got.append(bytes(await core.read(fh, 0, 2 * MiB)))
            core.release(fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_and_read)
            nursery.start_soon(open_and_read)
        assert got == [ramp(0, 2 * MiB, seed=2)] * 2
        core.release(old)
        await trio.sleep(0.05)
        assert len(core.opener.kept) == 0 or all(
            not f.retired for f in core.opener.kept._since), "a retired version is not kept"


async def test_an_open_that_gave_up_waiting_leaves_its_fd_for_the_next_open_to_wait_for(
        tmp_path: Path) -> None:
    """Its fresh fd shares the old state until its slow close is answered: the next open
    must not be trusted before then."""
    (tmp_path / "snapshots").mkdir()
    source = SharedStateLower(tmp_path / "src", tmp_path / "snapshots",
                              close_delays=[0, 0.8], config=SourceConfig(timeout=0.5))
    async with make_core(tmp_path, 64 * MiB, source=source) as core:
        old = await _held_then_replaced(core, tmp_path / "src" / "m")
        with pytest.raises(FsError) as info:  # the fresh fd's close takes 0.8 s
            await _open(core, b"m")
        assert info.value.errno == errno.EIO
        new = await _open(core, b"m")  # at once: that close is still under way
        assert bytes(await core.read(new, 0, 2 * MiB)) == ramp(0, 2 * MiB, seed=2)
        core.release(new)
        core.release(old)


class StuckSecondClose(CountingSource):
    """A lower mount whose second close hangs: the fresh fd's, after the kept one's."""

    async def close(self, fd: int) -> None:
        await super().close(fd)
        if len(self.closed) == 2:
            await trio.sleep_forever()


async def test_a_fresh_fd_whose_close_hangs_fails_the_open_within_the_timeout(
        tmp_path: Path) -> None:
    """The file may not be opened again while the fresh fd shares the old state: EIO in time."""
    source = StuckSecondClose(tmp_path / "src", SourceConfig(timeout=0.5))
    async with make_core(tmp_path, 64 * MiB, source=source) as core:
        path = tmp_path / "src" / "m"
        write_ramp(path, MiB, seed=1)
        core.release(await _open(core, b"m"))
        write_ramp(path, MiB, seed=2)
        os.utime(path, ns=(1, 10**18))
        with trio.fail_after(5), pytest.raises(FsError) as info:
            await _open(core, b"m")
        assert info.value.errno == errno.EIO
        assert len(source.closed) == 2 and [w for w, _ in source.calls].count("open") == 2, \
            "not opened a third time"


def test_with_the_defaults_four_scattered_reads_after_the_head_want_the_file_whole() -> None:
    """One mapped fault's read-around (four 1 MiB requests) fires it; three reads do not."""
    for reads, fires in ((3, False), (4, True)):
        interest = FileInterest(ReadaheadConfig())
        assert not interest.on_read(0, 4096)  # the header
        got = [interest.on_read((400 + i) * MiB, MiB) for i in range(reads)]
        assert any(got) == fires
