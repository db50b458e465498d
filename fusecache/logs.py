"""Where the log goes: stderr in the foreground, a few capped files for a daemon.

A daemon's log defaults to /run/fusecache, which is RAM, and a daemon runs for
the life of its container: its log must never grow without bound.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from fusecache.config import MiB

FORMAT = "%(asctime)s fusecache[%(process)d] %(levelname)s %(name)s: %(message)s"
# 4 MiB a file, three files: at most 12 MiB of RAM in /run. A line is about 200
# bytes, so a file holds some 20,000 lines: a healthy daemon logs a few lines
# per mount, and one in trouble (a store timing out on every read, a full disk)
# logs at most a line per failure and summaries, so the current file spans
# hours of trouble and the two older ones keep how it began.
LOG_BYTES = 4 * MiB
LOG_FILES = 3


class _CappedLog(logging.handlers.RotatingFileHandler):
    """A rotating log whose files are private, and whose current file also takes fds 1 and 2.

    The daemon's stdout and stderr are dup2'ed onto its log file (daemon._detach),
    so that stray output (a traceback, a C library's complaint) lands there too.
    After a rollover they follow to the new file; left on the renamed one, they
    would keep writing to a file the cap no longer counts, and to a deleted one
    after the next rollovers. Their output counts against the current file's
    size, checked at the next record.
    """

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # what Python buffered for fds 1 and 2 goes to the old file
            except (OSError, ValueError):
                pass
        super().doRollover()
        if self.stream is not None:
            os.dup2(self.stream.fileno(), 1)
            os.dup2(self.stream.fileno(), 2)


def to_stderr(verbose: bool) -> None:
    """Log to stderr (the foreground, and the CLI itself)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT,
                        stream=sys.stderr, force=True)


def to_capped_file(path: Path, verbose: bool, max_bytes: int = LOG_BYTES,
                   files: int = LOG_FILES) -> None:
    """Log to *path* and at most *files* - 1 older ones (*path*.1, ...), each under *max_bytes*.

    For a daemon whose fds 1 and 2 are on *path* already.
    """
    assert files >= 2, "with no older file to roll over to, the one file would grow forever"
    handler = _CappedLog(path, maxBytes=max_bytes, backupCount=files - 1, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        force=True)
