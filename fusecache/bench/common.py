"""What the bench tools share: a fusecache mount to time, the machine's counters, progress lines."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def progress(msg: str, tag: str = "bench") -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def fusecache_mount(source: Path | str, extra: list[str], cache_dir: Path | None = None,
                    env: dict[str, str] | None = None) -> Iterator[Path]:
    """Mount fusecache over *source* (a directory or a store URL) at a temporary mountpoint.

    Always unmounts. Without *cache_dir* the disk cache is fresh: a cold first
    switch must not hit an earlier run's blocks.
    """
    with tempfile.TemporaryDirectory(prefix="fusecache-bench-") as tmp:
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        cmd = [sys.executable, "-m", "fusecache", "mount", str(source), str(mnt),
               "--log-file", str(Path(tmp) / "fusecache.log"),
               "--cache-dir", str(cache_dir or Path(tmp) / "cache"), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             env={**os.environ, **(env or {})})
        if res.returncode != 0:
            raise RuntimeError(f"fusecache mount failed: {res.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run([sys.executable, "-m", "fusecache", "umount", str(mnt)],
                           capture_output=True, check=False)
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


def daemon_pid(mnt: Path) -> int | None:
    """The pid of the fusecache daemon serving *mnt*, from its pid file."""
    from fusecache.daemon import pidfile_for

    try:
        return int(pidfile_for(mnt).read_text())
    except (OSError, ValueError):
        return None


def daemon_stats(mnt: Path) -> dict[str, int]:
    """The counters of the fusecache daemon serving *mnt*."""
    stats: dict[str, int] = json.loads(os.getxattr(mnt, "user.fusecache.stats"))
    return stats


def drop_caches(level: int = 3) -> None:
    """Write back, then drop the kernel's caches (1: page cache; 3: also dentries, inodes)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text(f"{level}\n")


def timed(fn: Callable[[Path], object], path: Path, counter: Callable[[], int | None]
          ) -> tuple[float, int | None]:
    """Seconds *fn(path)* took, and how far *counter* moved meanwhile (None if it cannot count)."""
    before = counter()
    t0 = time.perf_counter()
    fn(path)
    elapsed = time.perf_counter() - t0
    after = counter()
    return elapsed, (after - before) if before is not None and after is not None else None


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle or waiting on I/O) since boot.

    Machine-wide, because a read through fusecache spends CPU in the reader, the
    daemon, the kernel's FUSE and block layers, s3fs and the S3 server alike.
    """
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time process *pid* has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def direct_reclaim() -> int:
    """Pages the kernel scanned to free memory while a process waited for it (/proc/vmstat)."""
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f)
                   if k.startswith("pgscan_direct"))


DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def proactive_reclaim() -> int:
    """Bytes DAMON schemes have applied their action to since they started (0 without DAMON)."""
    total = 0
    for kdamond in DAMON.glob("[0-9]*"):
        try:  # the counters are refreshed on request
            (kdamond / "state").write_text("update_schemes_stats\n")
        except OSError:
            continue
        for applied in kdamond.glob("contexts/*/schemes/*/stats/sz_applied"):
            total += int(applied.read_text())
    return total
