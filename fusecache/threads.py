"""Every pool of worker threads the daemon uses: what each guards, and how big it is.

The trio loop serves every FUSE request itself; only calls that block run in
worker threads, each kind behind its own trio.CapacityLimiter, so one kind can
never take the threads another needs. The lower mount's limiters keep a token
until their thread really ends, even when its caller gave up on it (a hung lower
mount), so they also bound the threads stuck there (see source.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from fusecache.config import DISK_READERS, SourceConfig


@dataclass
class ThreadPolicy:
    """The limiters, one per kind of blocking call; built once by the composition root."""

    config: SourceConfig = field(default_factory=SourceConfig)

    def __post_init__(self) -> None:
        c = self.config
        # Lower-mount reads a reader is waiting on.
        self.lower_demand = trio.CapacityLimiter(c.demand_threads)
        # Lower-mount reads for read-ahead and whole-file fills (--parallel): never
        # the threads a waiting reader needs.
        self.lower_readahead = trio.CapacityLimiter(c.readahead_threads)
        # Lower-mount stat, listdir, open, readlink, xattrs, statfs.
        self.lower_metadata = trio.CapacityLimiter(c.metadata_threads)
        # Closing lower fds: never refused, however the lower mount fares, or fds leak.
        self.lower_close = trio.CapacityLimiter(4)
        # The health probe of an unhealthy lower mount: one at a time.
        self.lower_probe = trio.CapacityLimiter(1)
        # Disk-tier reads a reader waits on; the disk writers are a fixed number of
        # tasks (SpillQueue.WRITERS), so they never take these.
        self.disk_read = trio.CapacityLimiter(DISK_READERS)
        # Disk writes, hashing, page-cache stores and invalidations, notes: trio's
        # default limiter (40), which no lower-mount call uses.
