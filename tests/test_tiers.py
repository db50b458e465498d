"""Memory and disk tiers together, without a kernel, and across a real remount."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from fusecache.config import MiB
from fusecache.disktier import FORMAT, DiskTier
from tests.conftest import make_core, needs_fuse
from tests.ramp import ramp, write_ramp
from tests.test_core import open_file, read_all

SIZE = 20 * MiB + 99


async def test_blocks_evicted_from_memory_come_from_disk(tmp_path: Path, implementation: str
                                                         ) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    async with make_core(tmp_path, 4 * MiB, disk, implementation) as core:
        write_ramp(tmp_path / "src" / "f", SIZE)
        fh = await open_file(core, b"f")
        assert await read_all(core, fh, SIZE) == ramp(0, SIZE)
        await core.cache.wait_idle()
        with trio.fail_after(20):
            while disk.used < SIZE:  # noqa: ASYNC110 - the writer thread runs behind the reader
                await trio.sleep(0.01)
        assert core.cache.statistics().disk_writes_dropped == 0
        lower = core.cache.statistics().lower_bytes
        assert bytes(await read_all(core, fh, SIZE, chunk=3 * MiB + 5)) == ramp(0, SIZE)
        stats = core.cache.statistics()
        assert stats.lower_bytes == lower, "the second read must not reach the lower mount"
        assert stats.served_disk > SIZE // 2


async def test_corrupted_disk_block_is_refetched(tmp_path: Path, implementation: str) -> None:
    disk = DiskTier(tmp_path / "cache", 1 << 30)
    (tmp_path / "src").mkdir()
    write_ramp(tmp_path / "src" / "f", 4 * MiB)
    async with make_core(tmp_path, 1 * MiB, disk, implementation) as core:
        fh = await open_file(core, b"f")
        await read_all(core, fh, 4 * MiB)
        await core.cache.wait_idle()
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
    deadline = time.monotonic() + 20
    while m.stats()["disk_used"] < SIZE:  # disk writes run behind the reader
        assert time.monotonic() < deadline, m.stats()
        time.sleep(0.05)
    before = m.stats()["lower_bytes"]
    drop_kernel_cache(m.mnt / "model.bin")
    assert (m.mnt / "model.bin").read_bytes() == ramp(0, SIZE, seed=9)
    stats = m.stats()
    assert stats["lower_bytes"] == before, "after the kernel dropped its pages: no lower reads"
    m.unmount()
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
    m = mount_factory(src, cache_dir=cache)
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
