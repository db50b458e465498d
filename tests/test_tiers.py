"""Memory and disk tiers together, without a kernel, and across a real remount."""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from fusecache.cache.disk import FORMAT, DiskTier
from fusecache.cachedir import SUBDIR
from fusecache.config import MiB
from fusecache.fs.core import FilesystemCore
from fusecache.fs.readonce import SHA256_XATTR
from tests.conftest import make_core, needs_fuse
from tests.ramp import ramp, write_ramp
from tests.test_core import open_file, read_all

SIZE = 20 * MiB + 99


async def read_settled(tmp_path: Path, core: FilesystemCore, flags: int = os.O_RDONLY) -> int:
    """Write src/f (SIZE bytes of ramp), read it whole, wait for every fetch and spill."""
    write_ramp(tmp_path / "src" / "f", SIZE)
    fh = await open_file(core, b"f", flags)
    assert await read_all(core, fh, SIZE) == ramp(0, SIZE)
    await core.wait_idle()
    with trio.fail_after(20):
        await core.cache.wait_spilled()
    return fh


@pytest.mark.core
async def test_blocks_evicted_from_memory_come_from_disk(tmp_path: Path, implementation: str
                                                         ) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 4 * MiB, disk, implementation) as core:
        fh = await read_settled(tmp_path, core)
        stats = core.cache.statistics()
        assert stats.disk_writes_dropped == 0
        # Memory spills to disk: what it let go is on disk, what it holds is not.
        assert disk.used + stats.memory_used == SIZE
        f = core._handles[fh].file
        assert core.cache.holds_all(f)
        lower = stats.lower_bytes
        assert bytes(await read_all(core, fh, SIZE, chunk=3 * MiB + 5)) == ramp(0, SIZE)
        stats = core.cache.statistics()
        assert stats.lower_bytes == lower, "the second read must not reach the lower mount"
        assert stats.served_disk > SIZE // 2
        disk.discard_file(f.key)
        assert not core.cache.holds_all(f)


@pytest.mark.core
async def test_whole_blocks_of_the_c_pool_go_to_disk_with_o_direct(
        tmp_path: Path, implementation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spill writers and the unmount flush tell the disk tier the pool's blocks are
    page aligned; the twin's bytearrays are not, so they go through the page cache."""
    direct: list[bool] = []  # one per slot written
    real_open = os.open

    def recording_open(path: str, flags: int, *args: int) -> int:
        if str(path).endswith(".blk") and flags & os.O_CREAT:
            direct.append(bool(flags & os.O_DIRECT))
        return real_open(path, flags, *args)

    monkeypatch.setattr("fusecache.cache.slots.os.open", recording_open)
    whole = SIZE // MiB  # the short tail goes through the page cache either way
    want = (whole + 1, whole if implementation == "native" else 0)
    disk = DiskTier(tmp_path / "spilled", 1 << 30)
    assert disk.direct_io, "ext4 and tmpfs take O_DIRECT"
    async with make_core(tmp_path, 4 * MiB, disk, implementation) as core:
        await read_settled(tmp_path, core)  # blocks leave memory for the spill writers
        assert disk.used == SIZE and (len(direct), direct.count(True)) == want
    direct.clear()
    disk = DiskTier(tmp_path / "flushed", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        await read_settled(tmp_path, core, os.O_RDONLY | os.O_DIRECT)  # memory keeps them
        assert direct == []
        await core.cache.flush_to_disk()  # what a clean unmount does
        assert disk.used == SIZE and (len(direct), direct.count(True)) == want


@pytest.mark.core
async def test_blocks_the_kernel_holds_leave_memory_for_disk(tmp_path: Path,
                                                              implementation: str) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        fh = await read_settled(tmp_path, core)
        stats = core.cache.statistics()
        assert stats.memory_used == 0 and disk.used == SIZE
        assert stats.handed_to_kernel == core.cache.block_count(core._handles[fh].file)
        lower = stats.lower_bytes
        # The kernel dropped its pages (drop_caches): the next read comes from disk.
        assert await read_all(core, fh, SIZE) == ramp(0, SIZE)
        assert core.cache.statistics().lower_bytes == lower


@pytest.mark.core
async def test_an_o_direct_reader_keeps_nothing_so_memory_keeps_its_blocks(
        tmp_path: Path, implementation: str) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        await read_settled(tmp_path, core, os.O_RDONLY | os.O_DIRECT)
        assert core.cache.statistics().memory_used == SIZE and disk.used == 0
        await core.cache.flush_to_disk()  # what a clean unmount does
        assert disk.used == SIZE
    disk.close()  # and the daemon's exit
    again = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, again, implementation) as core:
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, SIZE) == ramp(0, SIZE)
        assert core.cache.statistics().lower_bytes == 0


@pytest.mark.core
async def test_the_sha256_is_kept_with_the_disk_tier_across_a_remount(
        tmp_path: Path, implementation: str) -> None:
    want = hashlib.sha256(ramp(0, SIZE)).hexdigest().encode()
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        write_ramp(tmp_path / "src" / "f", SIZE)
        ino = (await core.lookup(1, b"f")).ino
        assert await core.getxattr(ino, SHA256_XATTR) == want
    disk.close()
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        ino = (await core.lookup(1, b"f")).ino
        assert await core.getxattr(ino, SHA256_XATTR) == want
        stats = core.cache.statistics()
        assert stats.lower_bytes == 0 and stats.served_disk == 0, "answered without hashing"
    write_ramp(tmp_path / "src" / "f", SIZE, seed=4)  # a new version: the kept digest is not its
    os.utime(tmp_path / "src" / "f", ns=(1, 1))
    disk.close()
    async with make_core(tmp_path, 64 * MiB, DiskTier(tmp_path / "cache", 1 << 30),
                         implementation) as core:
        ino = (await core.lookup(1, b"f")).ino
        assert await core.getxattr(ino, SHA256_XATTR) == hashlib.sha256(
            ramp(0, SIZE, seed=4)).hexdigest().encode()


@pytest.mark.core
async def test_a_block_leaves_memory_only_once_the_kernel_holds_every_page(
        tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk) as core:
        write_ramp(tmp_path / "src" / "f", MiB + 5000)  # a whole block and a short one
        fh = await open_file(core, b"f")
        cache = core.cache

        async def read(off: int, size: int) -> int:
            assert bytes(await core.read(fh, off, size)) == ramp(off, min(size, MiB + 5000 - off))
            await cache.wait_spilled()
            return cache.statistics().handed_to_kernel

        assert await read(0, 4096 + 100) == 0  # page 0, and a part of page 1
        assert await read(4096, MiB - 2 * 4096) == 0  # pages 1 .. 254
        assert await read(MiB - 100, 100) == 0  # a part of page 255 is not the page
        assert await read(MiB - 4096, 4096) == 1
        assert await read(MiB, 4096) == 1  # the tail block's first page of two
        assert await read(MiB + 4096, 4096) == 2  # its last page is short: the kernel has it
        assert disk.used == MiB + 5000 and cache.statistics().memory_used == 0


@pytest.mark.core
async def test_a_whole_file_fetch_leaves_blocks_on_disk_where_they_are(tmp_path: Path) -> None:
    """After a remount, a hash pass over a file on disk fires read-once; its fill must not
    copy the rest of the file from disk into memory ahead of any reader."""
    size = 96 * MiB  # under half the memory cache: read-once fetches it whole
    (tmp_path / "src").mkdir()
    write_ramp(tmp_path / "src" / "f", size)
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 256 * MiB, disk) as core:
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, size) == ramp(0, size)
        await core.wait_idle()
        await core.cache.wait_spilled()
    disk.close()
    async with make_core(tmp_path, 256 * MiB, DiskTier(tmp_path / "cache", 1 << 30)) as core:
        fh = await open_file(core, b"f")
        for off in range(0, 17 * MiB, MiB):  # past whole_file_after: a hash pass begins
            assert bytes(await core.read(fh, off, MiB)) == ramp(off, MiB)
        await core.wait_idle()
        stats = core.cache.statistics()
        assert stats.lower_bytes == 0
        # Read-ahead reaches 24 MiB past the reader; the rest of the file stays on disk.
        assert stats.memory_used <= 17 * MiB + 24 * MiB, "the fill copied disk blocks"


@pytest.mark.core
async def test_a_block_waiting_for_its_writer_is_served_from_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    gate = threading.Event()
    real_write = disk.write

    def slow_write(*args: object) -> bool:
        gate.wait(10)
        return real_write(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(disk, "write", slow_write)
    async with make_core(tmp_path, 2 * MiB, disk) as core:
        write_ramp(tmp_path / "src" / "f", 8 * MiB)
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, 8 * MiB) == ramp(0, 8 * MiB)
        await core.wait_idle()
        lower = core.cache.statistics().lower_bytes
        assert bytes(await core.read(fh, 0, MiB)) == ramp(0, MiB)  # left memory, not on disk yet
        assert core.cache.statistics().lower_bytes == lower
        gate.set()
        with trio.fail_after(20):
            await core.cache.wait_spilled()


@pytest.mark.core
async def test_the_unmount_flush_stops_at_its_deadline_with_whole_blocks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fusecache.cache.spill")
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    real_write = disk.write

    def slow_write(*args: object) -> bool:
        time.sleep(0.2)  # a disk far slower than the deadline allows
        return real_write(*args)  # type: ignore[arg-type]

    async with make_core(tmp_path, 64 * MiB, disk) as core:
        # O_DIRECT: memory keeps every block, so the flush has all of them to write.
        await read_settled(tmp_path, core, os.O_RDONLY | os.O_DIRECT)
        monkeypatch.setattr(disk, "write", slow_write)
        start = time.monotonic()
        with trio.move_on_after(0.3):  # what mount.serve does with flush_on_unmount
            await core.cache.flush_to_disk()
        assert time.monotonic() - start < 2, "the flush must not outlive its deadline by much"
    assert 0 < disk.used < SIZE, "some blocks written, not all"
    assert any("held in memory to the disk cache" in r.getMessage() for r in caplog.records)
    disk.close()
    again = DiskTier(tmp_path / "cache", 1 << 30)  # what was written reads back whole
    assert again.used == disk.used and again.validation_failures == 0


@pytest.mark.core
async def test_corrupted_disk_block_is_refetched(tmp_path: Path, implementation: str) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    (tmp_path / "src").mkdir()
    write_ramp(tmp_path / "src" / "f", 4 * MiB)
    async with make_core(tmp_path, 1 * MiB, disk, implementation) as core:
        fh = await open_file(core, b"f")
        await read_all(core, fh, 4 * MiB)
        await core.wait_idle()
        await core.cache.flush_to_disk()
    disk.close()
    for path in (tmp_path / "cache").glob(f"{SUBDIR}/{FORMAT}/*/*.blk"):  # damage every block
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, b"\xff", os.fstat(fd).st_size - 1)
        os.close(fd)
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 1 * MiB, disk, implementation) as core:
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, 4 * MiB) == ramp(0, 4 * MiB)
        assert disk.validation_failures >= 1
        assert core.cache.statistics().lower_bytes > 0


@pytest.mark.mount
@needs_fuse
def test_the_daemon_lets_go_of_what_the_kernel_page_cache_holds(tmp_path: Path,
                                                                mount_factory) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    write_ramp(src / "cached.bin", SIZE, seed=5)
    write_ramp(src / "direct.bin", SIZE, seed=6)
    m = mount_factory(src)
    assert (m.mnt / "cached.bin").read_bytes() == ramp(0, SIZE, seed=5)
    fd = os.open(m.mnt / "direct.bin", os.O_RDONLY | os.O_DIRECT)
    try:  # O_DIRECT reads bypass the page cache: the daemon must keep its copy
        buf = mmap.mmap(-1, SIZE + 4096)
        assert os.preadv(fd, [buf], 0) == SIZE
        assert buf[:SIZE] == ramp(0, SIZE, seed=6)
    finally:
        os.close(fd)
    stats = m.settled()  # both fetched whole
    assert stats["handed_to_kernel"] == -(-SIZE // MiB), "every block of cached.bin"
    assert stats["memory_used"] == SIZE, "direct.bin's blocks, and none of cached.bin's"


@pytest.mark.mount
@needs_fuse
def test_remount_serves_from_disk(tmp_path: Path, mount_factory) -> None:
    from tests.test_mount import drop_kernel_cache

    src = tmp_path / "tree"
    src.mkdir()
    write_ramp(src / "model.bin", SIZE, seed=9)
    cache = tmp_path / "shared-cache"
    m = mount_factory(src, "--mem-cache", "4M", cache_dir=cache)
    assert (m.mnt / "model.bin").read_bytes() == ramp(0, SIZE, seed=9)
    before = m.stats()["lower_bytes"]
    drop_kernel_cache(m.mnt / "model.bin")
    assert (m.mnt / "model.bin").read_bytes() == ramp(0, SIZE, seed=9)
    stats = m.stats()
    assert stats["lower_bytes"] == before, "after the kernel dropped its pages: no lower reads"
    m.unmount()  # writes what memory still holds to disk
    m2 = mount_factory(src, cache_dir=cache)
    assert (m2.mnt / "model.bin").read_bytes() == ramp(0, SIZE, seed=9)
    stats = m2.stats()
    # Read-ahead brings blocks from disk into memory, so some count as memory hits, and
    # the whole-file fetch feeds those to the page cache, where the reader finds them.
    assert stats["lower_bytes"] == 0
    assert stats["served_disk"] > 0


@pytest.mark.mount
@needs_fuse
def test_kill_9_mid_read_leaves_no_bad_block(tmp_path: Path, mount_factory) -> None:
    import signal
    import threading

    from fusecache.daemon import pidfile_for
    from tests.conftest import fusecache_cmd

    src = tmp_path / "tree"
    src.mkdir()
    size = 64 * MiB
    write_ramp(src / "model.bin", size, seed=4)
    cache = tmp_path / "crash-cache"
    m = mount_factory(src, "--mem-cache", "8M", cache_dir=cache)  # spills as it reads
    pid = int(pidfile_for(m.mnt).read_text())

    def read() -> None:
        try:
            (m.mnt / "model.bin").read_bytes()
        except OSError:
            pass  # the daemon dies under this reader

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while not any(cache.glob(f"{SUBDIR}/{FORMAT}/*/*.blk")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)  # mid-read, disk writes under way
    reader.join(10)
    res = fusecache_cmd("umount", str(m.mnt))  # clears the stale mount
    assert res.returncode == 0, res.stderr
    assert not pidfile_for(m.mnt).exists()  # the killed daemon's, removed by umount
    m2 = mount_factory(src, cache_dir=cache)
    assert (m2.mnt / "model.bin").read_bytes() == ramp(0, size, seed=4)
    assert m2.stats()["validation_failures"] == 0


@pytest.mark.core
async def test_read_ahead_leaves_on_disk_what_the_kernel_took_during_a_fill(
        tmp_path: Path, implementation: str) -> None:
    """Blocks the kernel took whole while a fill ran went on to disk. A page-cache reader's
    read-ahead leaves them there while the fill runs (they would come back as copies); an
    O_DIRECT reader's reads them, and so does everyone's once the fill has ended."""
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        write_ramp(tmp_path / "src" / "f", SIZE)
        fh = await open_file(core, b"f")
        f = core._handles[fh].file
        core.cache.fill_started(f.key)  # as FilePasses.fill does
        assert await read_all(core, fh, SIZE) == ramp(0, SIZE)  # the kernel holds it all
        await core.wait_idle()
        with trio.fail_after(20):
            await core.cache.wait_spilled()
        half = SIZE // 2
        core.cache.prefetch(f, 0, half, kernel_keeps=True)
        assert core.cache.fetching == 0, "read back from disk while the fill runs"
        core.cache.prefetch(f, 0, half, kernel_keeps=False)
        assert core.cache.fetching > 0, "an O_DIRECT reader's read-ahead reads them"
        core.cache.fill_ended(f.key)
        core.cache.prefetch(f, half, SIZE, kernel_keeps=True)
        assert core.cache.fetching > half // MiB, "after the fill, read-ahead reads disk again"
        await core.wait_idle()
        assert core.cache.statistics().lower_bytes == SIZE
        core.release(fh)
