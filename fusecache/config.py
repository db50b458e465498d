"""Settings: one frozen dataclass per part, every default explained."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusecache.objectstore.location import StoreLocation

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str) -> int:
    """Parse '512M', '4GiB', '1.5g' or a plain byte count; raise ValueError otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 512M, 4G, 1.5GiB)")
    number, unit, _ = m.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_size(n: float) -> str:
    """Human-readable binary size, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def memory_limit() -> int:
    """The memory this container may use: cgroup v2 or v1 limit, else physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def default_cache_dir() -> Path:
    """Where the disk tier lives unless --cache-dir says otherwise.

    A user's cache home, or /var/tmp/fusecache-UID for a user without a
    writable home (nobody's is /nonexistent): /var/tmp outlives reboots, like a cache.
    """
    if os.geteuid() == 0:
        return Path("/var/cache/fusecache")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = Path(base) / "fusecache"
    if path.is_absolute():
        ancestor = next(p for p in (path, *path.parents) if os.path.lexists(p))
        if os.access(ancestor, os.W_OK | os.X_OK):
            return path
    return Path("/var/tmp") / f"fusecache-{os.getuid()}"


@dataclass(frozen=True)
class CacheConfig:
    """The daemon's block cache."""

    # 1 MiB blocks: the kernel's largest FUSE read is 1 MiB (max_pages 256), so a
    # kernel request touches at most two blocks, and a 6 GB model is ~6000 entries.
    block_size: int = 1 * MiB
    # A quarter of the container's memory: the model server needs the rest to hold
    # the model it loads. Computed at mount time (see mount.build_config).
    mem_bytes: int = 256 * MiB
    # One lower-mount read fills this many bytes of consecutive blocks (one preadv).
    # Large reads amortize the per-request cost of a remote store.
    fetch_size: int = 8 * MiB
    # The disk tier: None turns it off. Its size is also held under 90% of the
    # free space (see DiskTier).
    cache_dir: Path | None = None
    # 100 GiB holds the study's ten models (about 40 GB) twice over.
    disk_bytes: int = 100 * GiB
    # Memory spills to disk as it evicts; on a clean unmount the daemon also
    # writes what memory still holds, so a remount starts warm. 20 s writes
    # about 12 GB here and stays within the 30 s `fusecache umount` waits.
    flush_on_unmount: float = 20.0

    # --- derived numbers: each computed here and nowhere else ---------------

    @property
    def passing_bytes(self) -> int:
        """Memory for blocks the scan rule turns away until their reader comes (an eighth).

        The LRU gets the rest (`lru_bytes`), so a second pass over a file 1.5x the
        budget still hits 58%; both stay within mem_bytes (in a container, more is
        an OOM kill).
        """
        return self.mem_bytes // 8

    @property
    def lru_bytes(self) -> int:
        return self.mem_bytes - self.passing_bytes

    @property
    def fetch_bytes(self) -> int:
        """Bytes per lower read: --fetch-size, in whole blocks, at most half of passing.

        A fetch's blocks must all fit in passing until their readers come, with a
        second fetch behind them.
        """
        fetch = min(self.fetch_size, self.passing_bytes // 2)
        return max(1, fetch // self.block_size) * self.block_size

    @property
    def fetch_blocks(self) -> int:
        return self.fetch_bytes // self.block_size

    @property
    def readahead_reach(self) -> int:
        """How far read-ahead may run past its reader: one more fetch still fits in passing."""
        return max(self.block_size, self.passing_bytes - self.fetch_bytes)

    @property
    def whole_file_in_memory(self) -> int:
        """The largest file a whole-file fetch keeps in memory until its reader comes.

        Half the LRU: a bigger one would evict its own head (or other files)
        before the next pass reads it.
        """
        return self.lru_bytes // 2


@dataclass(frozen=True)
class MemoryShares:
    """How the block memory the daemon may hold is shared out (see cache/budget.py)."""

    # The memory tier, LRU and passing: --mem-cache.
    cached: int
    # Blocks on their way: each read-ahead thread reads one fetch unit at a time,
    # each demand thread one block, each disk reader one block.
    fetching: int
    # Blocks waiting for a disk writer. 256 MiB: four writers keep up with a
    # 240 MB/s reader with this much queued (one fell behind: 117 of 400 blocks
    # dropped), and it is an eighth of what the loader itself needs for a 2 GB model.
    spilling: int = 256 * MiB

    @property
    def total(self) -> int:
        return self.cached + self.fetching + self.spilling


@dataclass(frozen=True)
class SourceConfig:
    """How the lower mount is called."""

    # Demand reads are what a reader is blocked on; 16 in flight keeps several
    # readers going without letting one burst take every worker thread.
    demand_threads: int = 16
    # stat/listdir/open on an object-store mount are HEAD/LIST requests that can
    # take a second each; 8 in flight keeps `ls -l` of a model folder quick.
    metadata_threads: int = 8
    # Read-ahead fetches in flight at once. Measured on the stand-in (8 MiB fetches,
    # one cold reader): 4 -> 286 MB/s, 8 -> 313 MB/s, 16 -> 276-290 MB/s.
    readahead_threads: int = 8
    # Every call on the lower mount (open, stat, listdir, readlink, xattrs, statfs,
    # reads) that takes longer fails with EIO, and marks the source unhealthy until
    # a probe gets an answer. 30 s: an 8 MiB read of a working store at a mere
    # 1 MB/s still fits, while a reader of a dead one gets its error within a
    # minute, counting the kernel's one retry, well inside a function's
    # invocation timeout. ossfs and s3fs retry a stalled request for minutes on
    # their own, so without a bound a dead store hangs every reader that long.
    timeout: float = 30.0
    # A question the lower mount answered before (a stat, a listing, which
    # version of a file is current) waits this long for a fresh answer, then gets
    # the last one while the fresh one is still asked for. A HEAD or LIST of a
    # working store takes tens of milliseconds; a cached model stays readable
    # within a second however the store fares.
    stale_after: float = 0.3
    # The object-store source (s3://, oss://) believes a directory's listing, and
    # so the sizes, dates and ETags of its objects, this long (--list-ttl): a
    # replaced object is read as new content at most this late. 60 s, as the
    # kernel's attribute timeout: model stores change rarely, and each LIST is a
    # request.
    list_ttl: float = 60.0
    # A lower file's fd stays open this long after its last reader and fetch are
    # done: s3fs and ossfs drop what they fetched for a file (50 MiB around each
    # read at a new place) at its last close, and a loader opens a model twice,
    # for its header and then to map it, within milliseconds (fs/keptfds.py).
    keep_open: float = 5.0
    # At most this many kept at once, the one idle longest closed first: well
    # within the daemon's fd limit (1024) beside handles, fetches and the disk tier.
    keep_open_files: int = 64
    # Never kept once open this long: s3fs answers stat from its cache while a file
    # is open, so a file reopened every few seconds would never show a new version.
    keep_open_max: float = 30.0


@dataclass(frozen=True)
class KernelConfig:
    """What the kernel is told after mounting."""

    # Seconds the kernel may trust a name or attributes without asking: model
    # stores change rarely, and every stat on the lower mount is a remote request.
    entry_timeout: float = 60.0
    attr_timeout: float = 60.0
    # 4 MiB kernel read-ahead makes the kernel send 1 MiB requests, several ahead.
    read_ahead_kb: int = 4096
    # The kernel's default of 12 background requests starves parallel read-ahead.
    max_background: int = 64
    congestion_threshold: int = 48


@dataclass(frozen=True)
class ReadaheadConfig:
    """Knobs of the read-ahead; see SequentialStream for how they combine."""

    # The first window is small so a reader that only wants a header (safetensors
    # reads 8 bytes and a JSON header first) does not pull megabytes it never uses.
    initial_window: int = 2 * MiB
    # The window doubles per sequential read up to this; at the stand-in's few
    # hundred MB/s, 128 MiB keeps the lower mount busy for about half a second.
    # It is also held within what the memory cache can hold for readers on their
    # way (CacheConfig.readahead_reach).
    max_window: int = 128 * MiB
    # The kernel's own read-ahead (4 MiB) sends several requests at once, and they
    # arrive out of order; a jump within this distance is still the same stream.
    slack: int = 8 * MiB
    # A file read in order from its start up to here is wanted whole: a web UI's
    # hash pass, then its load. 16 MiB is a few hundred milliseconds of a hash
    # pass, and more than any header a loader reads before the tensors.
    whole_file_after: int = 16 * MiB
    # Or: its head was read, then this many reads landed elsewhere in it (a
    # safetensors header, then tensors faulted in through mmap). Four scattered
    # reads is a loader at work, not a tool peeking at a header or a zip's
    # directory: one fault's read-around is four 1 MiB requests (the kernel's
    # 4 MiB). Eight waited for a second fault, some 130 ms on the stand-in
    # (mmap of a 512 MiB model: 0.98-1.03x plain with four, 0.97-0.99x with eight).
    whole_file_scattered_reads: int = 4
    # A reader that read this much in order since its last jump streams through
    # the file: it asks for what lies ahead of it itself, so a whole-file fetch
    # does not also push that into the page cache (fs/pagecache.py). 16 MiB, as
    # whole_file_after: four times the kernel's read-ahead (a mapped loader's
    # read-around of one fault), more than any header a loader reads.
    streaming_after: int = 16 * MiB
    # Within that, a read may skip this far ahead of the last and the reader
    # still streams: the kernel's read-ahead (4 MiB) sends its requests out of
    # order. A loader's faults skip further.
    stream_holes: int = 4 * MiB
    # A streaming reader that has not read for this long has stopped (or is
    # left open after its last read): what lies ahead of it is fed again.
    streaming_idle: float = 1.0
    # Also hash every file fetched whole as it streams, so the user.fusecache.sha256
    # xattr answers at once. Off: the xattr hashes a file when first asked, from
    # the cache (fetching what is missing, once), and only a tool that asks pays.
    # Hashing everything costs 0.6 CPU-s per GB, 5-8% of a cold stream on a 2-core
    # box that is CPU-bound (seq-1: 295-311 MB/s on, 305-325 off).
    sha256: bool = False
    # Push the blocks a whole-file fetch brings into the kernel's page cache
    # (FUSE notify_store), so a loader that maps the file finds them there instead
    # of asking the daemon fault by fault. Measured on the stand-in, a cold 512 MiB
    # model loaded through mmap in shuffled tensor order, six rounds: 594 -> 160-224
    # requests to the daemon, 177-245 -> 238-282 MB/s (plain mount: 219-290).
    feed_page_cache: bool = True


@dataclass(frozen=True)
class MountConfig:
    """Everything one mount needs."""

    source: Path | StoreLocation  # a directory, or a bucket read directly
    mountpoint: Path
    cache: CacheConfig = CacheConfig()
    lower: SourceConfig = SourceConfig()
    kernel: KernelConfig = KernelConfig()
    readahead: ReadaheadConfig = ReadaheadConfig()
    allow_other: bool = False
    # --metrics: where the daemon serves Prometheus text (host, port); None: nowhere.
    metrics: tuple[str, int] | None = None

    @property
    def memory_shares(self) -> MemoryShares:
        return memory_shares(self.cache, self.lower)


DISK_READERS = 4  # disk-tier reads a reader waits on, at once (threads.ThreadPolicy)


def memory_shares(cache: CacheConfig, lower: SourceConfig) -> MemoryShares:
    """The block memory of a mount, by holder; see MemoryShares."""
    return MemoryShares(
        cached=cache.mem_bytes,
        fetching=lower.readahead_threads * cache.fetch_bytes
        + (lower.demand_threads + DISK_READERS) * cache.block_size,
    )
