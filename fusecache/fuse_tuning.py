"""Tuning the kernel's side of a FUSE mount through sysfs, after it is mounted."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from fusecache.config import KernelConfig

log = logging.getLogger(__name__)

FUSECTL = Path("/sys/fs/fuse/connections")


def _write(path: Path, value: int) -> bool:
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        # Expected without root: only a debug line then.
        level = logging.INFO if os.geteuid() == 0 else logging.DEBUG
        log.log(level, "could not set %s to %d (%s); keeping the kernel's default", path, value,
                exc.strerror)
        return False
    log.debug("set %s = %d", path, value)
    return True


def tune_connection(dev: int, config: KernelConfig) -> None:
    """Raise read-ahead and background-request limits for the mount on device *dev*.

    Read-ahead needs root; the background limits need the connection's owner (the
    mounting user), up to the kernel's max_user_bgreq without root. What cannot be
    set keeps the kernel's default, with an info line as root and a debug line
    otherwise.
    """
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}")
    if os.geteuid() == 0:
        _write(bdi / "read_ahead_kb", config.read_ahead_kb)
    else:
        log.debug("not root: keeping the kernel's read-ahead for the mount")
    conn = FUSECTL / str(os.minor(dev))
    if not conn.exists() and FUSECTL.is_dir() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)],
                       capture_output=True, check=False)
    if conn.exists():
        # congestion_threshold may not exceed max_background, so raise that first.
        _write(conn / "max_background", config.max_background)
        _write(conn / "congestion_threshold", config.congestion_threshold)
    else:
        log.log(logging.INFO if os.geteuid() == 0 else logging.DEBUG,
                "fusectl is not mounted; keeping the kernel's background-request limits")
