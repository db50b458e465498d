"""The daemon's counters, flat, for the stats xattr (`getfattr -n user.fusecache.stats MNT`)."""

from __future__ import annotations

import dataclasses
import os

from fusecache.cache.blocks import BlockCache
from fusecache.cache.disk import DiskStatistics
from fusecache.cache.passes import FilePasses
from fusecache.fs.answers import KnownAnswers
from fusecache.source_api import Source


def daemon_counters(read_requests: int, source: Source, cache: BlockCache,
                    passes: FilePasses, answers: KnownAnswers, fed_bytes: int = 0
                    ) -> dict[str, int]:
    """Every counter of the daemon, flat, for stats output.

    `lower_bytes` (read from the lower mount) and `served_bytes` (replied to
    readers) are the keys `fusecache stats --json` promises to keep.
    """
    src = source.statistics()
    blocks = cache.statistics()
    return {"read_requests": read_requests,
            "served_bytes": blocks.served_memory + blocks.served_disk + blocks.served_lower,
            "fed_bytes": fed_bytes,
            # What the caches can keep (the LRU without its passing part, and the disk):
            # a set of files bigger than this cannot all be warm at once.
            "cache_capacity": cache.capacity + (cache.disk.capacity if cache.disk else 0),
            **dataclasses.asdict(blocks),
            "background_jobs": passes.underway,  # whole-file fetches, hashes and warms, now
            "source_healthy": int(src.healthy),
            "source_timeouts": src.timeouts,
            "source_failed_fast": src.failed_fast,
            "abandoned_threads": src.abandoned_threads,
            "stale_answers": answers.stale_answers,
            "rss_bytes": _rss_bytes(),
            "cpu_ms": _cpu_ms(),
            **_disk_counters(cache)}


def _disk_counters(cache: BlockCache) -> dict[str, int]:
    """The disk tier's counters, from one snapshot of them (zeros without a disk tier)."""
    d = cache.disk.statistics() if cache.disk is not None else DiskStatistics.none()
    return {"disk_used": d.used,
            "disk_capacity": d.capacity,
            "validation_failures": d.validation_failures,
            "disk_write_errors": d.write_errors,
            "disk_writes_refused_full": d.writes_refused_full,
            "disk_full_episodes": d.full_episodes,
            "disk_full_now": int(d.full_now)}


def _cpu_ms() -> int:
    """CPU time the daemon has used, all its threads, user and system, in milliseconds."""
    t = os.times()
    return round((t.user + t.system) * 1000)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
