"""Where the daemon's CPU goes on one cold sequential read, per GB, over the OSS stand-in.

    python -m fusecache.bench.cpu [--size-mib 1024] [--direct] [--rate MB/S]
                                  [--profile FILE] [-- MOUNT OPTION ...]

Needs root (drop_caches, the stand-in's cap). Writes one file into the stand-in, reads
it in 1 MiB reads through the plain mount, then cold through a fresh fusecache mount
over it (or, with --direct, over the stand-in's server itself), and prints the rates
and CPU-seconds per GB: the whole machine's, and the daemon's, split into its main
thread (the trio loop: FUSE requests, replies, bookkeeping) and its worker threads
(lower reads, disk writes, page-cache stores), user and system. Threads that end
during the read are missing from the split, not from the daemon's total.

--profile FILE records the daemon with py-spy (`pip install py-spy`; --native, raw
format, a stack a line) while it reads: expect it to slow the read several times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import (
    busy_cpu_seconds,
    daemon_pid,
    drop_caches,
    fusecache_mount,
    process_cpu_seconds,
    progress,
)
from .standin import DEFAULT_RATE_MBPS, running_standin

FILE = "cpu.bin"
CHUNK = 1 << 20


@dataclass
class ThreadTimes:
    """CPU ticks of one process's threads, main thread and the others, user and system."""

    main_user: int = 0
    main_sys: int = 0
    workers_user: int = 0
    workers_sys: int = 0

    @classmethod
    def of(cls, pid: int) -> dict[str, tuple[int, int]]:
        ticks = {}
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            ticks[task.name] = (int(fields[11]), int(fields[12]))
        return ticks

    @classmethod
    def between(cls, pid: int, before: dict[str, tuple[int, int]],
                after: dict[str, tuple[int, int]]) -> ThreadTimes:
        t = cls()
        for tid, (user, system) in after.items():
            user0, system0 = before.get(tid, (0, 0))
            if tid == str(pid):
                t.main_user, t.main_sys = user - user0, system - system0
            else:
                t.workers_user += user - user0
                t.workers_sys += system - system0
        return t


def _wait_listed(path: Path, size: int, timeout: float = 20) -> None:
    """Wait until s3fs lists the object just put (its listing cache, the server's 1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path.stat().st_size == size:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear on the stand-in's mount")
        time.sleep(0.5)


def read_through(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    return n


def per_gb(seconds: float, size: int) -> str:
    return f"{seconds / size * 1e9:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusecache.bench.cpu", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument("--direct", action="store_true",
                        help="fusecache reads the stand-in's server (s3://), not its s3fs mount")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE_MBPS, metavar="MB/S",
                        help=f"the stand-in's cap (default {DEFAULT_RATE_MBPS})")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="record the daemon with py-spy into FILE")
    parser.add_argument("options", nargs="*", metavar="MOUNT OPTION",
                        help="options for the fusecache mount, after --")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rate < 1:
        parser.error("--size-mib and --rate must be at least 1")
    if os.geteuid() != 0:
        parser.error("needs root (drop_caches, the stand-in's cap)")
    spy_exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if args.profile is not None and not os.path.exists(spy_exe):
        parser.error("--profile needs py-spy: pip install py-spy")
    size = args.size_mib * CHUNK

    with running_standin(rate_mbps=args.rate) as standin:
        chunk = os.urandom(CHUNK)
        with open(standin.bucket_dir / FILE, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        _wait_listed(standin.mount / FILE, size)
        drop_caches()
        cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
        read_through(standin.mount / FILE)
        plain_s, plain_cpu = time.perf_counter() - t0, busy_cpu_seconds() - cpu0
        print(f"plain mount:  {size / plain_s / 1e6:5.0f} MB/s, machine "
              f"{per_gb(plain_cpu, size)} CPU-s/GB")

        source, options, env = (standin.direct() if args.direct
                                else (str(standin.mount), [], {}))
        with fusecache_mount(source, [*options, *args.options], env=env) as mnt:
            pid = daemon_pid(mnt)
            if pid is None:
                raise SystemExit("no pid file for the fusecache daemon")
            drop_caches()
            spy = None
            if args.profile is not None:
                spy = subprocess.Popen(
                    [spy_exe, "record", "-p", str(pid), "--native", "--threads", "-r", "100",
                     "-f", "raw", "-o", str(args.profile)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches
            threads0, own0 = ThreadTimes.of(pid), process_cpu_seconds(pid)
            cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
            read_through(mnt / FILE)
            took, cpu = time.perf_counter() - t0, busy_cpu_seconds() - cpu0
            t = ThreadTimes.between(pid, threads0, ThreadTimes.of(pid))
            daemon = process_cpu_seconds(pid) - own0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
                progress(f"profile in {args.profile}", "cpu")

        tick = os.sysconf("SC_CLK_TCK")
        print(f"fusecache:    {size / took / 1e6:5.0f} MB/s, machine {per_gb(cpu, size)} "
              f"CPU-s/GB, daemon {per_gb(daemon, size)} ({took / plain_s:.2f}x plain's time)")
        print(f"  daemon main thread:    user {per_gb(t.main_user / tick, size)}, "
              f"system {per_gb(t.main_sys / tick, size)} CPU-s/GB")
        print(f"  daemon worker threads: user {per_gb(t.workers_user / tick, size)}, "
              f"system {per_gb(t.workers_sys / tick, size)} CPU-s/GB (those still alive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
