"""Page-cache feeding: what a whole-file fetch brings is pushed into the kernel's page cache."""

from __future__ import annotations

import errno
import mmap
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from fusecache.blockio import Block
from fusecache.cache.disk import DiskTier
from fusecache.config import MiB
from fusecache.fs.core import FilesystemCore
from tests.conftest import Mount, make_core, needs_fuse
from tests.ramp import ramp, write_ramp
from tests.test_core import open_file
from tests.test_mount import drop_kernel_cache

SIZE = 20 * MiB + 99  # fits the fill (half of 64 MiB)
# A random reader's reads move their pages only (fs/core.py): the 8 reads that
# show a loader at work, before the fill then moves every byte once.
RANDOM_PAGES = 8 * 4096


class PageCache:
    """A stand-in for the kernel's page cache: what was stored where."""

    def __init__(self, fail: int | None = None) -> None:
        self.stored: dict[tuple[int, int], bytes] = {}
        self.fail = fail
        self.calls = 0

    def store(self, ino: int, offset: int, data: Block) -> None:
        self.calls += 1
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        self.stored[ino, offset] = bytes(data)


async def _load_header_then_scattered(core: FilesystemCore, name: bytes) -> tuple[int, int]:
    """A loader's first reads: the header, then 8 tensors elsewhere (read-once fires)."""
    fh = await open_file(core, name)
    await core.read(fh, 0, 8)
    for off in random.Random(3).sample(range(MiB, SIZE - 4096, 4096), 8):
        assert bytes(await core.read(fh, off, 4096)) == ramp(off, 4096)
    with trio.fail_after(20):
        await core.wait_idle()  # the fill, and the feeding behind it
    return fh, (await core.lookup(1, name)).ino


@pytest.mark.core
async def test_a_fill_feeds_the_blocks_the_kernel_lacks(tmp_path: Path) -> None:
    kernel = PageCache()
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, store=kernel.store) as core:
        write_ramp(tmp_path / "src" / "m", SIZE)
        _, ino = await _load_header_then_scattered(core, b"m")
        assert kernel.stored, "the fill fed the page cache"
        for (got_ino, offset), data in kernel.stored.items():
            assert got_ino == ino and offset % 4096 == 0
            assert data == ramp(offset, len(data)), "the right bytes, in place"
        # Of the blocks the reads touched, only the pages the kernel was not served.
        for off in random.Random(3).sample(range(MiB, SIZE - 4096, 4096), 8):
            assert (ino, off) not in kernel.stored
        stats = core.cache.statistics()
        assert SIZE <= stats.lower_bytes <= SIZE + RANDOM_PAGES
        # Fed blocks count as the kernel's: they left memory for the disk tier.
        fed_blocks = {offset // MiB for _, offset in kernel.stored}
        assert stats.handed_to_kernel == len(fed_blocks)
        assert stats.memory_used == SIZE - sum(min(MiB, SIZE - i * MiB) for i in fed_blocks)


@pytest.mark.core
async def test_fed_and_with_a_disk_tier_a_file_bigger_than_memory_is_fetched_whole(
        tmp_path: Path) -> None:
    size = 48 * MiB + 5  # over half the 64 MiB memory cache
    kernel = PageCache()
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, store=kernel.store) as core:
        write_ramp(tmp_path / "src" / "m", size)
        fh = await open_file(core, b"m")
        await core.read(fh, 0, 8)
        for off in range(24 * MiB, 40 * MiB, 2 * MiB):  # tensors, well past the head
            assert bytes(await core.read(fh, off, 4096)) == ramp(off, 4096)
        with trio.fail_after(20):
            await core.wait_idle()
        stats = core.cache.statistics()
        assert size <= stats.lower_bytes <= size + RANDOM_PAGES, "fetched whole, once"
        for (_, offset), data in kernel.stored.items():
            assert data == ramp(offset, len(data))
        assert stats.memory_used < 16 * MiB, "what was fed went on to the disk tier"
    async with make_core(tmp_path, 64 * MiB, None) as core:  # no disk tier: memory bounds it
        fh = await open_file(core, b"m")
        await core.read(fh, 0, 8)
        for off in range(24 * MiB, 40 * MiB, 2 * MiB):
            await core.read(fh, off, 4096)
        await core.wait_idle()
        assert core.cache.statistics().lower_bytes < size


@pytest.mark.core
async def test_nothing_is_fed_once_the_file_changed(tmp_path: Path) -> None:
    kernel = PageCache()
    async with make_core(tmp_path, 64 * MiB, store=kernel.store) as core:
        write_ramp(tmp_path / "src" / "m", SIZE)
        ino = (await core.lookup(1, b"m")).ino
        pin, _ = await core.opener.open(ino, b"m")
        feed = core.pagecache.feeder(ino, pin.file)
        assert feed is not None
        assert len(await feed([(0, 0, ramp(0, MiB))])) == 1
        os.utime(tmp_path / "src" / "m", ns=(1, 1))
        await core.lookup(1, b"m")  # the kernel asks again and sees the new version
        assert not await feed([(1, 0, ramp(MiB, MiB))]), "the old version's bytes must not go in"
        assert list(kernel.stored) == [(ino, 0)]
        pin.release()


@pytest.mark.core
async def test_what_a_streaming_reader_heads_for_is_left_to_it_while_it_reads(
        tmp_path: Path) -> None:
    kernel = PageCache()
    async with make_core(tmp_path, 64 * MiB, store=kernel.store) as core:
        core.readahead = replace(core.readahead, streaming_idle=0.2)
        write_ramp(tmp_path / "src" / "m", SIZE)
        fh = await open_file(core, b"m")
        for off in range(0, 17 * MiB, MiB):  # streams: 16 MiB in order
            await core.read(fh, off, MiB)
        ino = (await core.lookup(1, b"m")).ino
        pin, _ = await core.opener.open(ino, b"m")
        feed = core.pagecache.feeder(ino, pin.file)
        assert feed is not None
        ahead, behind = (18, 0, ramp(18 * MiB, MiB)), (0, 0, ramp(0, MiB))
        assert await feed([ahead, behind]) == [behind], "it asks for what lies ahead itself"
        await trio.sleep(0.3)  # left open, read no more: it asks for nothing now
        assert await feed([ahead]) == [ahead]
        assert set(kernel.stored) == {(ino, 0), (ino, 18 * MiB)}
        pin.release()


@pytest.mark.core
async def test_a_kernel_without_notify_store_is_asked_once(tmp_path: Path) -> None:
    kernel = PageCache(fail=errno.ENOSYS)
    async with make_core(tmp_path, 64 * MiB, store=kernel.store) as core:
        write_ramp(tmp_path / "src" / "m", SIZE)
        await _load_header_then_scattered(core, b"m")
        assert kernel.calls == 1
        assert core.cache.statistics().lower_bytes >= SIZE, "the fill goes on without it"


@pytest.mark.core
async def test_no_page_cache_call_once_the_session_is_closing(tmp_path: Path) -> None:
    kernel = PageCache()
    invalidated = []
    async with make_core(tmp_path, 64 * MiB, store=kernel.store) as core:
        core.pagecache._invalidate = invalidated.append
        write_ramp(tmp_path / "src" / "m", SIZE)
        ino = (await core.lookup(1, b"m")).ino
        pin, _ = await core.opener.open(ino, b"m")
        feed = core.pagecache.feeder(ino, pin.file)
        assert feed is not None
        await core.end_page_cache_calls(5.0)
        assert not await feed([(0, 0, ramp(0, MiB))])
        os.utime(tmp_path / "src" / "m", ns=(1, 1))
        await core.lookup(1, b"m")  # a change noticed: would invalidate
        await trio.sleep(0.2)
        assert kernel.calls == 0 and invalidated == []
        pin.release()


# --- through the kernel ---


@pytest.mark.mount
@needs_fuse
def test_a_mapped_load_finds_the_fed_pages(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # Big enough that the tensors lie far apart: on a small file the kernel's
    # read-around of each fault reads it nearly whole, in order, as a stream would.
    size = 128 * MiB + 99
    write_ramp(src / "model.safetensors", size, seed=8)
    pieces = list(range(0, size, 64 * 1024))
    random.Random(5).shuffle(pieces)
    requests = {}
    for option in ("--no-feed-page-cache", "--feed-page-cache"):
        m: Mount = mount_factory(src, option)
        path = m.mnt / "model.safetensors"
        drop_kernel_cache(path)
        out = bytearray(size)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            f.read(8)  # a loader: the header, then tensors in its own order
            for off in pieces[:8]:
                out[off:off + 64 * 1024] = mapped[off:off + 64 * 1024]
            before = m.settled()  # read-once fired: the fill (and feeding) ran to the end
            for off in pieces[8:]:
                out[off:off + 64 * 1024] = mapped[off:off + 64 * 1024]
        assert bytes(out) == ramp(0, size, seed=8)
        after = m.settled()
        assert after["lower_bytes"] == size
        requests[option] = after["read_requests"] - before["read_requests"]
        m.unmount()
    # Fed, the rest of the load finds its pages in place instead of asking the daemon.
    assert requests["--feed-page-cache"] == 0 < requests["--no-feed-page-cache"], requests


@pytest.mark.mount
@needs_fuse
def test_a_reader_that_streams_through_a_file_is_not_fed_what_it_asks_for(
        tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 64 * MiB + 99  # read-once fires at 16 MiB: the rest is fetched whole
    write_ramp(src / "model.bin", size, seed=4)
    m: Mount = mount_factory(src)
    path = m.mnt / "model.bin"
    drop_kernel_cache(path)
    with open(path, "rb") as f:  # a hash pass, or a sequential load
        got = b"".join(iter(lambda: f.read(MiB), b""))
    assert got == ramp(0, size, seed=4)
    stats = m.settled()
    assert stats["lower_bytes"] == size, "fetched whole, once"
    # It asked for every page itself; a store of them too would copy them twice.
    assert stats["fed_bytes"] == 0
    assert stats["served_bytes"] == size


@pytest.mark.mount
@needs_fuse
def test_fed_pages_of_an_old_version_are_never_read_as_the_new_one(tmp_path: Path,
                                                                   mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.safetensors"
    write_ramp(path, SIZE, seed=1)
    # Attributes trusted for a minute: the kernel does not notice the change itself,
    # the daemon's open does (and tells it to drop the pages it was fed).
    m: Mount = mount_factory(src)
    with open(m.mnt / "model.safetensors", "rb") as f:  # a loader's first reads: fed whole
        f.read(8)
        for off in random.Random(2).sample(range(MiB, SIZE - 4096, 4096), 8):
            f.seek(off)
            assert f.read(4096) == ramp(off, 4096, seed=1)
        m.settled()
    assert m.stats()["handed_to_kernel"] > 0, "the page cache was fed"
    write_ramp(path, SIZE, seed=2)  # the same size, other bytes, a new mtime
    os.utime(path, ns=(1, 10**18))
    assert (m.mnt / "model.safetensors").read_bytes() == ramp(0, SIZE, seed=2)
