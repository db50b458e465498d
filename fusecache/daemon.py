"""The mount's process: how it starts, is found, and stops.

A daemon is forked and detached, tells the CLI on a pipe once its mount answers,
and keeps a pid file; `unmount` sends it SIGTERM, with a deadline and a lazy
fallback, and a stale mount left by a killed daemon is recognised here.
`mount.serve` is what the process runs, in a daemon or in the foreground.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from fusecache.config import MountConfig
from fusecache.mount import MountError, serve

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds the CLI waits for the daemon to answer on its mount
# `fusecache umount` waits this long for a signalled daemon to unmount itself
# (mount.REQUEST_GRACE says why 5 s); one still mounted after it is unmounted
# lazily and killed, so no stale mount is left.
UNMOUNT_DEADLINE = 5.0


def runtime_dir() -> Path:
    """Where pid files and daemon logs go: /run/fusecache as root, else the user's own.

    A user's is $XDG_RUNTIME_DIR/fusecache when that is a directory of theirs
    (a variable inherited across a user switch names someone else's), else
    /tmp/fusecache-UID.
    """
    if os.geteuid() == 0:
        return Path("/run/fusecache")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and _owned_dir(Path(xdg)) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg) / "fusecache"
    return Path(tempfile.gettempdir()) / f"fusecache-{os.getuid()}"


def _owned_dir(path: Path) -> bool:
    """Whether *path* is a directory (not a link) of this user that nobody else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def runtime_dir_problem() -> str | None:
    """Why the runtime dir cannot hold our pid file and log, if it cannot; changes nothing.

    In /tmp, anyone could have made it first to read or swap our files.
    """
    path = runtime_dir()
    if os.path.lexists(path) and not _owned_dir(path):
        return (f"runtime dir {path} is not a private directory of this user (uid "
                f"{os.geteuid()}); remove it, or set XDG_RUNTIME_DIR to a directory of yours")
    ancestor = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"runtime dir {path} cannot be made: {ancestor} is not writable"
    return None


def make_runtime_dir() -> Path:
    """The runtime dir, made private to this user if missing (see runtime_dir_problem)."""
    path = runtime_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _owned_dir(path):
        raise MountError(runtime_dir_problem() or f"runtime dir {path} is not private")
    return path


def pidfile_for(mountpoint: Path) -> Path:
    """The pid file of the daemon serving *mountpoint*."""
    digest = hashlib.sha1(os.fsencode(mountpoint.resolve())).hexdigest()[:16]
    return runtime_dir() / f"{digest}.pid"


def run_foreground(config: MountConfig) -> int:
    """Serve in this process until unmounted; log to stderr."""
    def ready(err: str | None) -> None:
        if err is None:
            print(f"fusecache: {config.source} mounted at {config.mountpoint}", file=sys.stderr)

    try:
        trio.run(serve, config, ready)
    except MountError as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return 1
    return 0


def run_daemon(config: MountConfig, log_file: Path, setup_logging: Callable[[], None]) -> int:
    """Fork a daemon that serves the mount; return once it answers, or fail with one line."""
    make_runtime_dir()  # the pid file's, and the default log's
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        _detach(log_file)
        setup_logging()
        code = 0

        def ready(err: str | None) -> None:
            os.write(wfd, b"ok\n" if err is None else f"{err}\n".encode())

        pidfile = pidfile_for(config.mountpoint)
        try:
            pidfile.write_text(f"{os.getpid()}\n")
            trio.run(serve, config, ready)
        except MountError as exc:
            ready(str(exc))
            code = 1
        except BaseException as exc:
            log.exception("daemon failed")
            ready(f"daemon failed: {exc!r} (see {log_file})")
            code = 1
        finally:
            _remove_pidfile(pidfile, os.getpid())
        os._exit(code)
    os.close(wfd)
    answer = _read_answer(rfd, READY_TIMEOUT)
    os.close(rfd)
    if answer == "ok":
        print(f"fusecache: {config.source} mounted at {config.mountpoint} (log: {log_file})",
              file=sys.stderr)
        return 0
    if answer is None:
        os.kill(pid, signal.SIGTERM)
        answer = f"the mount did not answer within {READY_TIMEOUT:.0f} s (see {log_file})"
    elif answer == "":
        answer = f"the daemon exited before mounting (see {log_file})"
    os.waitpid(pid, 0)
    print(f"fusecache: {answer}", file=sys.stderr)
    return 1


def _read_answer(fd: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _detach(log_file: Path) -> None:
    os.setsid()
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)


def is_stale_mount(path: Path) -> bool:
    """True if *path* is a FUSE mount whose daemon is gone."""
    try:
        # statfs always reaches the daemon; stat may be answered from cached attributes.
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def fusermount_unmount(mountpoint: Path, lazy: bool = False) -> str | None:
    """Unmount with fusermount3; return its complaint, or None on success."""
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
    return None


def unmount(mountpoint: Path, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon to exit; raise MountError with the reason.

    A daemon of ours is asked with SIGTERM, so it unmounts itself within
    seconds even with readers blocked on a hung lower mount, and busy files do
    not stop it; then it writes its memory cache to disk and exits (*timeout*).
    """
    pidfile = pidfile_for(mountpoint)
    try:
        pid: int | None = int(pidfile.read_text())
    except (OSError, ValueError):
        pid = None
    # Our daemon, alive: nothing here may call the mount (a statfs would reach a
    # daemon whose lower mount hangs, and wait on it).
    if pid is not None and _is_our_daemon(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not _mounted(mountpoint), UNMOUNT_DEADLINE):
            fusermount_unmount(mountpoint, lazy=True)
            os.kill(pid, signal.SIGKILL)
            raise MountError(f"daemon {pid} did not unmount {mountpoint} within "
                             f"{UNMOUNT_DEADLINE:.0f} s; unmounted it lazily and killed it")
    else:
        err = fusermount_unmount(mountpoint, lazy=is_stale_mount(mountpoint))
        if err is not None:
            raise MountError(f"cannot unmount {mountpoint}: {err}")
    if pid is None:
        return
    if not _wait(lambda: not _alive(pid), timeout):
        raise MountError(f"unmounted {mountpoint}, but daemon {pid} is still running")
    _remove_pidfile(pidfile, pid)


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _mounted(path: Path) -> bool:
    """Whether *path* is a mount point, from the mount table: nothing asks the mount."""
    return mount_type(path) is not None


def mount_type(path: Path) -> str | None:
    """The type of what is mounted at *path* (fuse.fusecache for ours), from the mount table.

    Nothing asks the mount, so a hung or dead daemon's mount is named too.
    """
    target = os.fsencode(Path(os.path.realpath(path.parent)) / path.name)
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            field = line.split(b" ")[4]
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
            if point == target:  # the last one listed is the one on top
                found = line.split(b" - ", 1)[1].split(b" ")[0].decode(errors="replace")
    return found


def _is_our_daemon(pid: int) -> bool:
    """Whether *pid* runs fusecache (a pid file can outlive its daemon, and pids are reused)."""
    try:
        return b"fusecache" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid)
    except OSError:
        return False


def _remove_pidfile(pidfile: Path, pid: int) -> None:
    """Remove *pidfile* if it still names *pid*, gone or going.

    A daemon that exits removes its own; one that was killed leaves it behind for
    `unmount`. Either way, a file a newer daemon wrote at the same mountpoint stays.
    """
    try:
        if int(pidfile.read_text()) == pid:
            pidfile.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    """True while *pid* runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"
