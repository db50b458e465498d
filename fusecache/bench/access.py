"""Access patterns on the OSS stand-in: plain mount, fusecache and the peers, same run.

    python -m fusecache.bench.access [--size-mib 512] [--targets ...] [--out DIR]

Needs root (drop_caches, the tc byte counter). Writes one safetensors model into the
stand-in, then for each access pattern and each target mounts the target fresh
(an empty cache), drops the kernel's caches and times the pattern cold:

- seq-1: one reader, 1 MiB reads, start to end;
- seq-4: four threads, each reading a quarter of the file;
- hash+load: the web UI's first switch (sha256 in 1 MiB reads, then the load);
- mmap: every tensor copied out of a shared mapping, in a shuffled order;
- rand-4k / rand-64k: preads at random aligned offsets;
- 8-procs: eight processes each reading the whole file at once.

Targets: plain (the s3fs direct_io stand-in itself), fusecache over it, fusecache
reading the same server directly (direct: s3://), and the caches a user would pick
instead over the same server: s3fs with use_cache, and rclone mount with
--vfs-cache-mode full. For fusecache's targets the daemon's own CPU-seconds per GB
are reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from . import models, workload
from .common import (
    busy_cpu_seconds,
    daemon_pid,
    drop_caches,
    fusecache_mount,
    process_cpu_seconds,
    progress,
)
from .standin import (
    ACCESS_KEY,
    BUCKET,
    DEFAULT_RATE_MBPS,
    SECRET_KEY,
    Standin,
    rclone_exe,
    running_standin,
    start_s3fs,
    unmount,
    wait_mounted,
)

MODEL = "model.safetensors"
RANDOM_READS = 400
TARGETS = ("plain", "fusecache", "direct", "s3fs-use_cache", "rclone-vfs-full")


@dataclass
class Figure:
    pattern: str
    target: str
    seconds: float
    wanted: int  # bytes the pattern reads
    lower: int | None  # bytes the server sent meanwhile
    ops: int  # reads issued (for the random patterns)
    cpu: float  # CPU-seconds the whole machine was busy meanwhile
    daemon_cpu: float | None = None  # CPU-seconds of the fusecache daemon (its targets)


# --- patterns: each takes the file and returns (bytes read, reads issued) ----------


def seq_1(path: Path) -> tuple[int, int]:
    return workload.read_whole(path), 0


def seq_4(path: Path) -> tuple[int, int]:
    return workload.read_parallel(path, 4), 0


def hash_then_load(path: Path) -> tuple[int, int]:
    workload.first_switch(path)
    return 2 * path.stat().st_size, 0


def _tensor_ranges(path: Path) -> list[tuple[int, int]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return [(base + t["data_offsets"][0], base + t["data_offsets"][1])
            for k, t in header.items() if k != "__metadata__"]


def mmap_shuffled(path: Path) -> tuple[int, int]:
    ranges = _tensor_ranges(path)
    random.Random(7).shuffle(ranges)
    # MAP_PRIVATE: s3fs with direct_io refuses a shared mapping (ENODEV).
    with (open(path, "rb") as f,
          mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as m):
        return sum(len(m[a:b]) for a, b in ranges), 0


def _random_reads(path: Path, size: int) -> tuple[int, int]:
    total = path.stat().st_size
    rng = random.Random(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = 0
        for _ in range(RANDOM_READS):
            got += len(os.pread(fd, size, rng.randrange(total // size) * size))
        return got, RANDOM_READS
    finally:
        os.close(fd)


def eight_procs(path: Path) -> tuple[int, int]:
    code = ("import hashlib,sys;f=open(sys.argv[1],'rb',buffering=0);"
            "print(hashlib.file_digest(f,'sha256').hexdigest())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(8)]
    digests = {p.communicate()[0].strip() for p in procs}
    if len(digests) != 1 or any(p.returncode for p in procs):
        raise RuntimeError(f"8 readers disagreed or failed: {digests}")
    return 8 * path.stat().st_size, 0


PATTERNS: dict[str, Callable[[Path], tuple[int, int]]] = {
    "seq-1": seq_1,
    "seq-4": seq_4,
    "hash+load": hash_then_load,
    "mmap": mmap_shuffled,
    "rand-4k": lambda p: _random_reads(p, 4096),
    "rand-64k": lambda p: _random_reads(p, 65536),
    "8-procs": eight_procs,
}


# --- targets: each mounts fresh over the stand-in and yields the model's folder ----


@contextlib.contextmanager
def _peer_mount(what: str, start: Callable[[Path, Path], subprocess.Popen[bytes]]
                ) -> Iterator[Path]:
    """A peer FUSE client, started by *start(mnt, cache_dir)* on an empty cache; unmounted."""
    with tempfile.TemporaryDirectory(prefix="fusecache-peer-") as tmp:
        mnt, cache = Path(tmp) / "mnt", Path(tmp) / "cache"
        mnt.mkdir()
        cache.mkdir()
        proc = start(mnt, cache)
        try:
            wait_mounted(mnt, proc, what)
            yield mnt
        finally:
            unmount(mnt, proc)


def _start_rclone_vfs_full(standin: Standin, mnt: Path, cache: Path
                           ) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [rclone_exe(), "mount", f":s3:{BUCKET}", str(mnt), "--s3-provider", "Other",
         "--s3-endpoint", standin.url, "--s3-access-key-id", ACCESS_KEY,
         "--s3-secret-access-key", SECRET_KEY, "--vfs-cache-mode", "full",
         "--cache-dir", str(cache), "--read-only", "--log-level", "ERROR"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)


def target_mount(name: str, standin: Standin) -> contextlib.AbstractContextManager[Path]:
    if name == "plain":
        return contextlib.nullcontext(standin.mount)
    if name == "fusecache":
        return fusecache_mount(standin.mount, [])
    if name == "direct":
        url, options, env = standin.direct()
        return fusecache_mount(url, options, env=env)
    if name == "s3fs-use_cache":
        return _peer_mount("s3fs", lambda mnt, cache: start_s3fs(
            mnt, standin.url, standin.passwd_file, [f"use_cache={cache}"]))
    if name == "rclone-vfs-full":
        return _peer_mount("rclone mount",
                           lambda mnt, cache: _start_rclone_vfs_full(standin, mnt, cache))
    raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")


def measure(pattern: str, target: str, standin: Standin, want_sha: str) -> Figure:
    with target_mount(target, standin) as root:
        path = root / MODEL
        path.stat()  # the lookup is not part of the timing
        drop_caches()
        pid = daemon_pid(root) if target in ("fusecache", "direct") else None
        before = standin.bytes_sent()
        own0 = process_cpu_seconds(pid) if pid else 0.0
        cpu0, t0 = busy_cpu_seconds(), time.perf_counter()
        wanted, ops = PATTERNS[pattern](path)
        seconds = time.perf_counter() - t0
        cpu = busy_cpu_seconds() - cpu0
        own = process_cpu_seconds(pid) - own0 if pid else None
        after = standin.bytes_sent()
        if pattern == "seq-1":  # one check of the bytes per target, untimed
            if workload.sha256_file(path) != want_sha:
                raise RuntimeError(f"{target}: wrong bytes")
    lower = after - before if before is not None and after is not None else None
    return Figure(pattern, target, seconds, wanted, lower, ops, cpu, own)


def format_table(figures: list[Figure], size: int, targets: list[str]) -> str:
    by = {(f.pattern, f.target): f for f in figures}
    head = f"{'pattern':10}" + "".join(f" | {t:>22}" for t in targets)
    lines = [head, "-" * len(head)]
    for pattern in PATTERNS:
        plain = by.get((pattern, "plain"))
        cells = []
        for t in targets:
            f = by.get((pattern, t))
            if f is None:
                cells.append(f"{'-':>22}")
                continue
            rate = (f"{f.ops / f.seconds:6.0f} r/s" if f.ops
                    else f"{f.wanted / f.seconds / 1e6:6.0f} MB/s")
            ratio = f"{plain.seconds / f.seconds:5.2f}x" if plain else ""
            moved = f"{f.lower / size:5.2f}F" if f.lower is not None else "    -"
            cells.append(f"{rate} {ratio} {moved}")
        lines.append(f"{pattern:10}" + "".join(f" | {c:>22}" for c in cells))
    lines.append("rate; speed vs plain (plain time / this time); bytes from the server in "
                 "file sizes (F)")
    lines += ["", f"{'CPU s/GB':10}" + "".join(f" | {t:>16}" for t in targets)]
    for pattern in PATTERNS:
        got = [by.get((pattern, t)) for t in targets]
        if any(got):
            lines.append(f"{pattern:10}" + "".join(
                f" | {f.cpu / f.wanted * 1e9:16.2f}" if f else f" | {'-':>16}" for f in got))
    lines.append("CPU-seconds the whole machine was busy per GB the pattern read (reader, "
                 "daemon, kernel, s3fs and the S3 server together)")
    ours = [t for t in targets if t in ("fusecache", "direct")]
    if ours:
        lines += ["", f"{'daemon CPU':10}" + "".join(f" | {t:>16}" for t in ours)]
        for pattern in PATTERNS:
            got = [by.get((pattern, t)) for t in ours]
            if any(got):
                lines.append(f"{pattern:10}" + "".join(
                    f" | {f.daemon_cpu / f.wanted * 1e9:16.2f}" if f and f.daemon_cpu is not None
                    else f" | {'-':>16}" for f in got))
        lines.append("CPU-seconds of the fusecache daemon alone per GB the pattern read")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fusecache.bench.access", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512, help="model size (default 512)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--out", type=Path, default=Path("bench/out/access"))
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE_MBPS, metavar="MB/S",
                        help=f"the stand-in's bandwidth cap (default {DEFAULT_RATE_MBPS})")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be a positive number of MB/s")
    if os.geteuid() != 0:
        parser.error("needs root: it drops the kernel's caches and counts bytes with tc")
    if "plain" not in args.targets:
        args.targets.insert(0, "plain")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fusecache-") as data:
        (Path(data) / BUCKET).mkdir()
        model = Path(data) / BUCKET / MODEL
        progress(f"writing a {args.size_mib} MiB model", "access")
        models.write_model(model, args.size_mib << 20, seed=1)
        os.sync()  # its dirty pages flushing would slow the first cells
        size = model.stat().st_size
        want_sha = workload.sha256_file(model)
        if "hash+load" in args.patterns:
            import safetensors.torch  # noqa: F401 - imported before the first timing, not in it
        figures = []
        with running_standin(data_dir=Path(data), rate_mbps=args.rate) as standin:
            for pattern in args.patterns:
                for target in args.targets:
                    fig = measure(pattern, target, standin, want_sha)
                    figures.append(fig)
                    progress(f"{pattern:9} {target:16} {fig.seconds:7.2f} s", "access")
    table = format_table(figures, size, args.targets)
    print(table)
    result = {
        "command": " ".join(["python -m fusecache.bench.access", *(argv or sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "size": size,
        "rate_mbps": args.rate,
        "figures": [asdict(f) for f in figures],
        "table": table,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    progress(f"wrote {args.out / 'result.json'}", "access")
    return 0


if __name__ == "__main__":
    sys.exit(main())
