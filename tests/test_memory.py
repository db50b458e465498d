"""Many readers at once: no wrong bytes, RSS within --mem-cache plus the documented overhead,
and no fds or threads left behind."""

from __future__ import annotations

import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest

from fusecache.config import MiB, SourceConfig
from tests.conftest import Mount, needs_fuse
from tests.ramp import ramp, write_ramp

pytestmark = [needs_fuse, pytest.mark.mount]

MEM = 64 * MiB
# docs/design.md, "Memory": the interpreter and its libraries (about 35 MiB), empty pool
# arenas kept for reuse (64 MiB), blocks waiting for a disk writer (256 MiB) and fetches on
# their way (8 read-ahead units of 8 MiB, 16 demand blocks).
OVERHEAD = 35 * MiB + 64 * MiB + 256 * MiB + 8 * 8 * MiB + 16 * MiB
READERS = 32
SECONDS = 15.0


def _daemon_pid(m: Mount) -> int:
    from fusecache.daemon import pidfile_for

    return int(pidfile_for(m.mnt).read_text())


def _fds_and_threads(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_many_readers_stay_within_memory_and_leak_nothing(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sizes = {f"f{i}": 40 * MiB + 4096 * i + 123 for i in range(6)}  # 4.5x the memory cache
    for i, (name, size) in enumerate(sizes.items()):
        write_ramp(src / name, size, seed=i)
    m = mount_factory(src, "--mem-cache", str(MEM))
    pid = _daemon_pid(m)
    fds_before, _ = _fds_and_threads(pid)
    wrong: list[str] = []
    deadline = time.monotonic() + SECONDS

    def reader(n: int) -> None:
        rng = random.Random(n)
        buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
        while time.monotonic() < deadline:
            i = rng.randrange(len(sizes))
            name, size = f"f{i}", sizes[f"f{i}"]
            # A quarter of the readers bypass the page cache: the daemon keeps their blocks.
            fd = os.open(m.mnt / name, os.O_RDONLY | (os.O_DIRECT if n % 4 == 0 else 0))
            try:
                offsets = (range(0, size, MiB) if rng.random() < 0.3 else
                           [rng.randrange(0, size) & ~4095 for _ in range(64)])
                for off in offsets:
                    got = os.preadv(fd, [buf], off)
                    if bytes(buf[:got]) != ramp(off, min(MiB, size - off), seed=i):
                        wrong.append(f"{name}@{off}")
                    if time.monotonic() > deadline:
                        break
            finally:
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, m.stats()["rss_bytes"])
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert not wrong, wrong[:10]
    print(f"RSS peak {peak / MiB:.0f} MiB with --mem-cache {MEM / MiB:.0f} MiB")
    assert 0 < peak <= MEM + OVERHEAD, f"RSS peaked at {peak / MiB:.0f} MiB"
    m.settled()
    # The lower fds stay open a while after their last reader (SourceConfig.keep_open).
    end = time.monotonic() + SourceConfig.keep_open + 5
    while _fds_and_threads(pid)[0] != fds_before and time.monotonic() < end:
        time.sleep(0.2)
    assert _fds_and_threads(pid)[0] == fds_before, "the daemon holds fds it did not before"
    # Idle worker threads leave after trio's 10 s; none stays stuck.
    end = time.monotonic() + 20
    while _fds_and_threads(pid)[1] > 2 and time.monotonic() < end:
        time.sleep(0.5)
    assert _fds_and_threads(pid)[1] <= 2, "worker threads outlived the workload"
