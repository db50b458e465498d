"""The C block copy against its pure-Python twin: daemon CPU per GB and throughput, same run.

    python -m fusecache.bench.native [--size-mib 1024] [--rounds 3] [--lower DIR]

Needs root (drop_caches). The file lives on tmpfs unless --lower says otherwise, so the
lower mount is not the bottleneck and the figures are the daemon's. For each
implementation, in alternating order, three passes through a fresh mount:

- cold: nothing cached; blocks come from the lower file;
- memory: after drop_caches, the daemon serves every block from its memory tier;
- disk: after a remount on the same cache dir (the unmount wrote memory to disk) and
  drop_caches, from the disk tier.

Every pass is checked against the file's sha256 (from the page cache, untimed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fusecache.daemon import pidfile_for

from .common import daemon_stats, drop_caches, fusecache_mount, process_cpu_seconds
from .workload import sha256_file

IMPLEMENTATIONS = {"native": {}, "python": {"FUSECACHE_NATIVE": "0"}}
PASSES = ("cold", "memory", "disk")


def _timed_read(path: Path, pid: int, want: str) -> tuple[float, float]:
    """(MB/s, daemon CPU s/GB) of one pass; raises on wrong bytes."""
    size = path.stat().st_size
    buf = bytearray(1 << 20)
    cpu0, t0 = process_cpu_seconds(pid), time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    elapsed, cpu = time.perf_counter() - t0, process_cpu_seconds(pid) - cpu0
    if sha256_file(path) != want:
        raise SystemExit(f"bench.native: WRONG BYTES through fusecache ({path})")
    return size / elapsed / 1e6, cpu / (size / 1e9)


def run_implementation(lower: Path, name: str, want: str, size: int
                       ) -> dict[str, tuple[float, float]]:
    env = IMPLEMENTATIONS[name]
    out = {}
    with tempfile.TemporaryDirectory(prefix="fusecache-native-") as cache:
        with fusecache_mount(lower, [], Path(cache), env) as mnt:
            pid = int(pidfile_for(mnt).read_text())
            out["cold"] = _timed_read(mnt / "blob", pid, want)
            drop_caches(1)
            out["memory"] = _timed_read(mnt / "blob", pid, want)
        # The unmount wrote the memory tier to disk.
        with fusecache_mount(lower, [], Path(cache), env) as mnt:
            pid = int(pidfile_for(mnt).read_text())
            if daemon_stats(mnt)["disk_used"] < size:
                raise SystemExit("bench.native: the disk tier did not fill; see the daemon log")
            drop_caches(1)
            out["disk"] = _timed_read(mnt / "blob", pid, want)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fusecache.bench.native",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lower", type=Path, help="directory for the file (default: tmpfs)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/native.json"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.native: needs root (drop_caches)", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    base = args.lower or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {n: [] for n in IMPLEMENTATIONS}
    with contextlib.ExitStack() as stack:
        lower = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=base)))
        with open(lower / "blob", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        want = sha256_file(lower / "blob")
        for r in range(args.rounds):
            order = list(IMPLEMENTATIONS) if r % 2 == 0 else list(reversed(IMPLEMENTATIONS))
            for name in order:
                res = run_implementation(lower, name, want, size)
                runs[name].append(res)
                print(f"[round {r + 1}] {name:6} " + "  ".join(
                    f"{p} {mbs:,.0f} MB/s {cpu:.2f} s/GB" for p, (mbs, cpu) in res.items()),
                    file=sys.stderr, flush=True)
    median = {n: {p: (statistics.median(r[p][0] for r in rs),
                      statistics.median(r[p][1] for r in rs)) for p in PASSES}
              for n, rs in runs.items()}
    print(f"\n{args.size_mib} MiB file, median of {args.rounds} rounds; "
          f"daemon CPU is user+system seconds per GB served\n")
    print(f"{'pass':8} {'C MB/s':>9} {'twin MB/s':>10} {'C/twin':>7}   "
          f"{'C s/GB':>7} {'twin s/GB':>10} {'C/twin':>7}")
    for p in PASSES:
        (cm, cc), (pm, pc) = median["native"][p], median["python"][p]
        print(f"{p:8} {cm:9,.0f} {pm:10,.0f} {cm / pm:7.2f}   {cc:7.2f} {pc:10.2f} {cc / pc:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m fusecache.bench.native " + " ".join(sys.argv[1:]),
        "size_mib": args.size_mib, "lower": str(base or "tempdir"), "runs": runs,
        "median": median}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
