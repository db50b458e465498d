"""Where the daemon's CPU goes on one cold sequential read, per GB, over the OSS stand-in.

    python -m fusecache.bench.cpu [--size-mib 1024] [--direct] [--rate MB/S]
                                  [--profile FILE | --perf FILE] [-- MOUNT OPTION ...]

Needs root (drop_caches, the stand-in's cap). Writes one file into the stand-in, reads
it in 1 MiB reads through the plain mount, then cold through a fresh fusecache mount
over it (or, with --direct, over the stand-in's server itself), and prints the rates
and CPU-seconds per GB: the whole machine's, and the daemon's, split into its main
thread (the trio loop: FUSE requests, replies, bookkeeping) and its worker threads
(lower reads, disk writes, page-cache stores), user and system. Threads that end
during the read are missing from the split, not from the daemon's total.

--perf FILE records it with `perf record -g` instead: the kernel's frames, and each
worker thread by name (lower reads "run from ...Flights._fetch", disk writes "fusecache
disk write", page-cache stores "_store_all from ..."): `perf report -i FILE --sort comm,dso`.

--profile FILE records the daemon's Python stacks with py-spy (`pip install py-spy`;
raw format, a stack a line, per thread) while it reads, without stopping it
(--nonblocking: stopping it to sample slowed the read 2.4x).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..mounted import read_stats
from .common import (
    busy_cpu_seconds,
    daemon_pid,
    drop_caches,
    fusecache_mount,
    process_cpu_seconds,
    progress,
)
from .standin import BUCKET, DEFAULT_RATE_MBPS, running_standin
from .workload import CHUNK, read_whole

FILE = "cpu.bin"


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
    parser.add_argument("--perf", type=Path, default=None, metavar="FILE",
                        help="record the daemon with perf record -g into FILE (kernel frames)")
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
    if args.perf is not None and shutil.which("perf") is None:
        parser.error("--perf needs perf (Debian: linux-perf)")
    if args.profile is not None and args.perf is not None:
        parser.error("--profile and --perf each record the daemon: give one")
    size = args.size_mib * CHUNK

    with contextlib.ExitStack() as stack:
        # Written before s3fs mounts, as the other benches do: a lookup before the
        # server lists a new object can leave s3fs taking the name for a directory.
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fusecache-")))
        (data / BUCKET).mkdir()
        chunk = os.urandom(CHUNK)
        with open(data / BUCKET / FILE, "wb") as f:
            for _ in range(args.size_mib):
                f.write(chunk)
        os.sync()
        standin = stack.enter_context(running_standin(data_dir=data, rate_mbps=args.rate))
        drop_caches()
        cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
        read_whole(standin.mount / FILE)
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
            recorder = None  # py-spy or perf, recording the daemon while it reads
            if args.profile is not None:
                recorder = subprocess.Popen(
                    [spy_exe, "record", "-p", str(pid), "--nonblocking", "--threads", "-r", "200",
                     "-f", "raw", "-o", str(args.profile)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elif args.perf is not None:
                recorder = subprocess.Popen(
                    ["perf", "record", "-g", "-p", str(pid), "-o", str(args.perf)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if recorder is not None:
                time.sleep(1.0)  # it attaches
            threads0, own0 = ThreadTimes.of(pid), process_cpu_seconds(pid)
            cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
            read_whole(mnt / FILE)
            took, cpu = time.perf_counter() - t0, busy_cpu_seconds() - cpu0
            t = ThreadTimes.between(pid, threads0, ThreadTimes.of(pid))
            daemon = process_cpu_seconds(pid) - own0
            stats = read_stats(mnt)
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(60)
                progress(f"profile in {args.profile or args.perf}", "cpu")

        tick = os.sysconf("SC_CLK_TCK")
        print(f"fusecache:    {size / took / 1e6:5.0f} MB/s, machine {per_gb(cpu, size)} "
              f"CPU-s/GB, daemon {per_gb(daemon, size)} ({took / plain_s:.2f}x plain's time)")
        print(f"  daemon main thread:    user {per_gb(t.main_user / tick, size)}, "
              f"system {per_gb(t.main_sys / tick, size)} CPU-s/GB")
        print(f"  daemon worker threads: user {per_gb(t.workers_user / tick, size)}, "
              f"system {per_gb(t.workers_sys / tick, size)} CPU-s/GB (those still alive)")
        print(f"  daemon counters, in file sizes: served {stats['served_bytes'] / size:.2f} "
              f"in {stats['read_requests']} requests, fed {stats['fed_bytes'] / size:.2f}, "
              f"read from below {stats['lower_bytes'] / size:.2f}, "
              f"on disk {stats['disk_used'] / size:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
