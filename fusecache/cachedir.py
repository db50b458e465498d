"""The cache dir is ours alone: fusecache keeps its disk cache in a directory it made and tagged.

`--cache-dir DIR` names where the cache may go, not what fusecache owns. It
makes DIR/blocks, tags it with the standard CACHEDIR.TAG
(https://bford.info/cachedir/: backup tools skip it, and we can tell it is
ours), and only ever changes modes or deletes inside that directory. DIR itself
is made if missing but never changed: a DIR holding anything but our tagged
directory is refused, so a user's /data with model folders named v1/ and v2/ is
never taken for an old cache. One daemon at a time holds an exclusive flock on
the tagged directory's lock file; two on one cache would evict each other's files.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import weakref
from pathlib import Path

# DIR/blocks: the default DIR (/var/cache/fusecache, ~/.cache/fusecache) already
# names fusecache, and the tag inside names it for any other DIR.
SUBDIR = "blocks"
TAG = "CACHEDIR.TAG"
SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
TAG_TEXT = SIGNATURE + (
    b"\n# This file is a cache directory tag created by fusecache.\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n"
)
LOCK = "lock"
# The root of a file system made for the cache holds this from mkfs; it is not a user's data.
LOST_FOUND = "lost+found"


class CacheDirError(OSError):
    """The cache dir cannot be used; the message is one line for the user."""

    def __str__(self) -> str:
        return str(self.args[0])


def check(cache_dir: Path, source: Path, mountpoint: Path) -> None:
    """Raise CacheDirError unless a daemon may keep its cache in *cache_dir*; change nothing."""
    where = cache_dir.resolve()
    for name, other in (("source", source), ("mountpoint", mountpoint)):
        other = other.resolve()
        if where == other or other in where.parents:
            raise CacheDirError(f"cache dir {cache_dir} must be outside the {name} {other}")
    if _usable(where):
        _check_free(where)


def _usable(cache_dir: Path) -> bool:
    """Raise CacheDirError unless *cache_dir* may hold our tagged directory; True if it does.

    Reads only: nothing is made, changed or locked.
    """
    try:
        st = os.stat(cache_dir)
    except (FileNotFoundError, NotADirectoryError):
        ancestor = next(p for p in cache_dir.parents if os.path.lexists(p))
        if not ancestor.is_dir():
            raise CacheDirError(f"cannot make cache dir {cache_dir}: {ancestor} is not a "
                                "directory") from None
        if not _writable(ancestor):
            raise CacheDirError(f"cannot make cache dir {cache_dir}: {ancestor} is "
                                "read-only") from None
        return False
    except OSError as exc:
        raise CacheDirError(f"cannot use cache dir {cache_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"cache dir {cache_dir} is not a directory")
    try:
        names = set(os.listdir(cache_dir))
    except OSError as exc:
        raise CacheDirError(f"cannot read cache dir {cache_dir}: {exc.strerror}") from None
    if os.path.ismount(cache_dir):
        names.discard(LOST_FOUND)
    ours = is_tagged(cache_dir / SUBDIR)
    if names and not ours and not _unfinished(cache_dir, names):
        older = _older_cache(cache_dir, names)
        if older is not None:
            raise CacheDirError(f"cache dir {cache_dir} holds an untagged cache of an older "
                                f"fusecache ({older}); delete it, or use an empty or new "
                                "directory")
        raise CacheDirError(f"cache dir {cache_dir} is not empty and is not fusecache's (no "
                            f"tagged {SUBDIR}/ in it); use an empty or new directory")
    if ours and os.lstat(cache_dir / SUBDIR).st_uid != os.geteuid():
        # Its owner could put blocks there that this mount would serve.
        raise CacheDirError(f"cache dir {cache_dir} holds another user's fusecache cache; "
                            "use a directory of your own")
    if not _writable(cache_dir / SUBDIR if ours else cache_dir):
        raise CacheDirError(f"cache dir {cache_dir} is read-only")
    return ours


def _check_free(cache_dir: Path) -> None:
    """Raise CacheDirError if a daemon holds the lock of our tagged directory in *cache_dir*."""
    try:
        fd = os.open(cache_dir / SUBDIR / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a daemon holds LOCK_EX
    except BlockingIOError:
        raise CacheDirError(f"cache dir {cache_dir} is in use by another fusecache "
                            "mount") from None
    finally:
        os.close(fd)


def is_tagged(path: Path) -> bool:
    """Whether *path* is a directory (not a link to one) that fusecache made and tagged."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return False
        with open(path / TAG, "rb") as f:
            head = f.read(len(TAG_TEXT))
    except OSError:
        return False
    return head.startswith(SIGNATURE + b"\n") and b"fusecache" in head


def _unfinished(cache_dir: Path, names: set[str]) -> bool:
    """Whether all *cache_dir* holds is an empty SUBDIR: ours, made by a daemon that died
    before it wrote the tag. Finishing it touches no byte anyone wrote."""
    path = cache_dir / SUBDIR
    try:
        return names == {SUBDIR} and not os.path.islink(path) and not os.listdir(path)
    except OSError:
        return False


def _older_cache(cache_dir: Path, names: set[str]) -> Path | None:
    """The format directory (v1, v2, v3) an older fusecache kept right in *cache_dir*, if
    that is all it holds; only to name it: it is not tagged, so it is not ours to delete."""
    if not names or not all(re.fullmatch(r"v\d+", n) for n in names):
        return None
    for name in sorted(names):
        try:
            entries = os.listdir(cache_dir / name)
        except OSError:
            return None
        if not all(re.fullmatch(r"[0-9a-f]{64}|\.direct-probe-\d+\.tmp", e) for e in entries):
            return None
    return cache_dir / max(names, key=lambda n: int(n[1:]))


def _writable(path: Path) -> bool:
    """Whether files can be made in directory *path*.

    access() sees a read-only mount (EROFS) and an immutable directory (EPERM)
    even for root, whom the mode bits do not stop.
    """
    return os.access(path, os.W_OK | os.X_OK)


class TaggedDir:
    """Our directory in a cache dir: made and tagged if need be, locked while open.

    Raises CacheDirError (an OSError) when *cache_dir* holds what is not ours,
    or another daemon holds it.
    """

    def __init__(self, cache_dir: Path) -> None:
        ours = _usable(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)  # made, never chmod'ed
        self.path = cache_dir / SUBDIR
        if not ours:
            self.path.mkdir(mode=0o700, exist_ok=True)
            self._write_tag()
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheDirError(f"cache dir {cache_dir} is in use by another fusecache "
                                "mount") from None
        # The lock goes with the fd: at close(), when this object is collected, or
        # when the daemon dies, however it dies.
        self._release = weakref.finalize(self, os.close, fd)
        os.chmod(self.path, 0o700)

    def _write_tag(self) -> None:
        tmp = self.path / f"{TAG}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, TAG_TEXT)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / TAG)

    def close(self) -> None:
        """Release the lock: another daemon may use the cache dir now."""
        self._release()
