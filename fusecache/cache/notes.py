"""Notes: a small value kept per source identity beside its disk blocks (its sha256).

A note is <dir>/<name>.note in the identity's block directory, so discarding
the identity's blocks takes its notes too. Notes are not checksummed: the
reader checks the value's form.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from fusecache.cache.slots import NOTE_SUFFIX, TMP_SUFFIX
from fusecache.cache.writestop import WriteStop

log = logging.getLogger(__name__)


def read_note(directory: Path, name: str) -> bytes | None:
    try:
        return (directory / f"{name}{NOTE_SUFFIX}").read_bytes()
    except OSError:
        return None


def write_note(directory: Path, name: str, value: bytes, stop: WriteStop) -> None:
    """Write a note whole or not at all (a rename); a failure is told to *stop*."""
    path = directory / f"{name}{NOTE_SUFFIX}"
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        log.debug("cannot keep the %s of %s: %s", name, directory, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        stop.failed(exc)
