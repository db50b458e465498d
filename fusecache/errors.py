"""The exceptions the filesystem core raises, and their errno mapping."""

from __future__ import annotations

import errno


class FsError(Exception):
    """A filesystem error that carries the errno to report to the kernel."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(err, str(err)))
        self.errno = err


class LowerError(FsError):
    """The lower mount failed an I/O request; readers see EIO."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


# Errors of the lower mount that mean "this name is not there" (or not that kind
# of thing) and are passed through as they are. Everything else the lower mount
# says becomes EIO: a reader must never see a half-truth such as ENOMEM or EAGAIN
# from a remote store as if it were about our filesystem.
PASSTHROUGH_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
     errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.ENODATA, errno.ERANGE,
     errno.ENOTSUP}
)


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE reply should carry for *exc*."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno in PASSTHROUGH_ERRNOS:
        return exc.errno
    return errno.EIO
