"""Which fusecache mount a path lies under, and its daemon's counters.

The mount is found in the mount table, so a path that is not under one is told
apart without asking any daemon; the counters come from the stats xattr of the
mount's root (fs/core.py, fs/stats.py).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

# Our mounts' type in the mount table: mount.py mounts with subtype=fusecache.
FSTYPE = b"fuse.fusecache"
STATS_XATTR = "user.fusecache.stats"


class NotMounted(Exception):
    """The path is not under a fusecache mount; the message is one line for the user."""


class NoAnswer(Exception):
    """The mount's daemon did not answer; the message is one line for the user."""


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def fusecache_mounts() -> list[Path]:
    """The mount points of every fusecache mount this process can see."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields, _, rest = line.partition(b" - ")
            if rest.split(b" ", 1)[0] == FSTYPE:
                points.append(Path(os.fsdecode(_unescape(fields.split(b" ")[4]))))
    return points


def mount_of(path: Path) -> Path:
    """The fusecache mount point *path* lies under (the mount itself counts)."""
    if not os.path.lexists(path):
        raise NotMounted(f"{path} does not exist")
    real = Path(os.path.realpath(path))
    under = [m for m in fusecache_mounts() if m == real or m in real.parents]
    if not under:
        raise NotMounted(f"{path} is not under a fusecache mount")
    return max(under, key=lambda m: len(m.parts))  # the innermost, for mounts within mounts


# The daemon answers the stats xattr from its loop at once; one that has not in
# this long is wedged, and a FUSE request to it would wait for ever.
STATS_TIMEOUT = 10.0


def read_stats(mountpoint: Path, timeout: float = STATS_TIMEOUT) -> dict[str, int]:
    """The daemon's counters, as its stats xattr has them; NoAnswer after *timeout* s.

    The xattr is read in a daemon thread, so a wedged daemon leaves a stuck
    thread behind, not a stuck command.
    """
    got: list[bytes] = []
    failed: list[OSError] = []

    def ask() -> None:
        try:
            got.append(os.getxattr(mountpoint, STATS_XATTR))
        except OSError as exc:
            failed.append(exc)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(timeout)
    if failed:
        raise NoAnswer(f"{mountpoint}: the fusecache daemon does not answer "
                       f"({failed[0].strerror})")
    if not got:
        raise NoAnswer(f"{mountpoint}: the fusecache daemon did not answer in {timeout:g} s")
    return dict(json.loads(got[0]))
