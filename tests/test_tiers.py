"""Memory and disk tiers together, without a kernel, and across a real remount."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import trio

from fusecache.config import MiB
from fusecache.core import FilesystemCore
from fusecache.disktier import FORMAT, DiskTier
from tests.conftest import make_core, needs_fuse
from tests.ramp import ramp, write_ramp
from tests.test_core import open_file, read_all

SIZE = 20 * MiB + 99


async def read_settled(tmp_path: Path, core: FilesystemCore) -> int:
    """Write src/f (SIZE bytes of ramp), read it whole, wait for every fetch and spill."""
    write_ramp(tmp_path / "src" / "f", SIZE)
    fh = await open_file(core, b"f")
    assert await read_all(core, fh, SIZE) == ramp(0, SIZE)
    await core.cache.wait_idle()
    with trio.fail_after(20):
        await core.cache.wait_spilled()
    return fh


async def test_blocks_evicted_from_memory_come_from_disk(tmp_path: Path, implementation: str
                                                         ) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 4 * MiB, disk, implementation) as core:
        fh = await read_settled(tmp_path, core)
        stats = core.cache.statistics()
        assert stats.disk_writes_dropped == 0
        # Memory spills to disk: what it let go is on disk, what it holds is not.
        assert disk.used + stats.memory_used == SIZE
        lower = stats.lower_bytes
        assert bytes(await read_all(core, fh, SIZE, chunk=3 * MiB + 5)) == ramp(0, SIZE)
        stats = core.cache.statistics()
        assert stats.lower_bytes == lower, "the second read must not reach the lower mount"
        assert stats.served_disk > SIZE // 2


async def test_a_model_that_fits_in_memory_is_not_written_until_unmount(
        tmp_path: Path, implementation: str) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, disk, implementation) as core:
        await read_settled(tmp_path, core)
        assert disk.used == 0
        await core.cache.flush_to_disk()  # what a clean unmount does
        assert disk.used == SIZE
    again = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 64 * MiB, again, implementation) as core:
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, SIZE) == ramp(0, SIZE)
        assert core.cache.statistics().lower_bytes == 0


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
        await core.cache.wait_idle()
        lower = core.cache.statistics().lower_bytes
        assert bytes(await core.read(fh, 0, MiB)) == ramp(0, MiB)  # left memory, not on disk yet
        assert core.cache.statistics().lower_bytes == lower
        gate.set()
        with trio.fail_after(20):
            await core.cache.wait_spilled()


async def test_corrupted_disk_block_is_refetched(tmp_path: Path, implementation: str) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    (tmp_path / "src").mkdir()
    write_ramp(tmp_path / "src" / "f", 4 * MiB)
    async with make_core(tmp_path, 1 * MiB, disk, implementation) as core:
        fh = await open_file(core, b"f")
        await read_all(core, fh, 4 * MiB)
        await core.cache.wait_idle()
        await core.cache.flush_to_disk()
    for path in (tmp_path / "cache").glob(f"{FORMAT}/*/*.blk"):  # damage every block on disk
        fd = os.open(path, os.O_RDWR)
        os.pwrite(fd, b"\xff", os.fstat(fd).st_size - 1)
        os.close(fd)
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 1 * MiB, disk, implementation) as core:
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, 4 * MiB) == ramp(0, 4 * MiB)
        assert disk.validation_failures >= 1
        assert core.cache.statistics().lower_bytes > 0


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
    # Read-ahead brings blocks from disk into memory, so some count as memory hits.
    assert stats["lower_bytes"] == 0
    assert stats["served_disk"] > 0 and stats["served_disk"] + stats["served_memory"] >= SIZE


@needs_fuse
def test_kill_9_mid_read_leaves_no_bad_block(tmp_path: Path, mount_factory) -> None:
    import signal
    import threading

    from fusecache.mount import pidfile_for
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
    while not any(cache.glob(f"{FORMAT}/*/*.blk")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)  # mid-read, disk writes under way
    reader.join(10)
    res = fusecache_cmd("umount", str(m.mnt))  # clears the stale mount
    assert res.returncode == 0, res.stderr
    m2 = mount_factory(src, cache_dir=cache)
    assert (m2.mnt / "model.bin").read_bytes() == ramp(0, size, seed=4)
    assert m2.stats()["validation_failures"] == 0
