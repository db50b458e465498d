"""Which version of each regular file is current: as last shown, and as last opened."""

from __future__ import annotations

from fusecache.fs.lowerfile import LowerFile
from fusecache.source_api import Version


class Versions:
    """For each inode of a regular file: the version the lower mount last showed (a stat
    or an open), and the newest version opened (its LowerFile).

    `Opener` alone changes them; the page cache and the sha256 xattr read them.
    """

    def __init__(self) -> None:
        self._shown: dict[int, Version] = {}
        self._opened: dict[int, LowerFile] = {}

    def shown(self, ino: int) -> Version | None:
        """The version the lower mount last showed; None: not a regular file we know of."""
        return self._shown.get(ino)

    def show(self, ino: int, version: Version) -> Version | None:
        """Record the version the lower mount shows now; return the one it showed before."""
        old = self._shown.get(ino)
        self._shown[ino] = version
        return old

    def opened(self, ino: int) -> LowerFile | None:
        """The newest version of *ino* opened, if any."""
        return self._opened.get(ino)

    def set_opened(self, ino: int, f: LowerFile) -> None:
        """Make *f* the newest version of *ino* opened."""
        self._opened[ino] = f

    def is_current(self, ino: int, f: LowerFile) -> bool:
        """Whether *f* is the newest version of *ino* opened, and the one last shown."""
        return self._opened.get(ino) is f and self._shown.get(ino) == f.ident.version
