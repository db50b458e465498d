"""Does the daemon's cache replace the page cache? A read, drop_caches, a read, a remount, a read.

    python -m fusecache.bench.cachecheck [--size-mib 400]

Runs on the OSS stand-in, as root (drop_caches and the byte counter need it), and prints for
each pass the bytes that crossed from the lower mount as a multiple of the file's size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import daemon_stats, drop_caches, fusecache_mount
from .standin import BUCKET, running_standin
from .workload import sha256_file


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fusecache.bench.cachecheck",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=400)
    size = parser.parse_args().size_mib << 20
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="fusecache-cache-"))
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fusecache-oss-")))
        (data / BUCKET).mkdir()
        (data / BUCKET / "model.safetensors").write_bytes(os.urandom(size))
        want = sha256_file(data / BUCKET / "model.safetensors")
        s = stack.enter_context(running_standin(data_dir=data))
        if s.bytes_sent() is None:
            print("cachecheck: needs root (tc byte counter, drop_caches)", file=sys.stderr)
            return 2

        def timed_pass(label: str, mnt: Path) -> None:
            before, t0 = s.bytes_sent() or 0, time.perf_counter()
            if sha256_file(mnt / "model.safetensors") != want:
                raise SystemExit(f"cachecheck: {label}: WRONG BYTES through fusecache")
            elapsed = time.perf_counter() - t0
            moved = (s.bytes_sent() or 0) - before
            print(f"{label:32} {moved / size:.4f}x the file from the lower mount, "
                  f"{size / elapsed / 1e6:,.0f} MB/s, bytes right")

        with fusecache_mount(s.mount, [], Path(cache)) as mnt:
            timed_pass("first read", mnt)
            drop_caches()
            timed_pass("after drop_caches", mnt)
            stats = daemon_stats(mnt)
        print(f"  disk writes dropped: {stats['disk_writes_dropped']}")
        with fusecache_mount(s.mount, [], Path(cache)) as mnt:
            drop_caches()
            timed_pass("after remount + drop_caches", mnt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
