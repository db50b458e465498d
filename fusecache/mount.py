"""The composition root: builds the source, cache and filesystem, mounts, serves, unmounts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pyfuse3
import trio

from fusecache import fuse_tuning
from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache
from fusecache.cachedir import CacheDirError
from fusecache.config import MountConfig
from fusecache.core import FilesystemCore
from fusecache.disktier import DiskTier
from fusecache.errors import FsError
from fusecache.fuse_ops import FuseOperations
from fusecache.source import LowerSource

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds the CLI waits for the daemon to answer on its mount
# Unmounting, by signal or `fusecache umount`, is done within 5 s even when calls
# on the lower mount hang (a container platform's grace period can be that
# short, and its SIGKILL would leave a stale mount): requests still waiting on
# the lower mount this long after the signal are dropped, and the kernel fails
# them when the session closes.
REQUEST_GRACE = 1.0
UNMOUNT_DEADLINE = 5.0
# A store into the page cache takes a millisecond or two; one still going after
# this is stuck on a page the kernel holds locked.
PAGE_CACHE_GRACE = 1.5


class MountError(Exception):
    """The mount could not be made; the message is one line for the user."""


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/fusecache")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fusecache-{os.getuid()}"
    return Path(base) / "fusecache" if "XDG_RUNTIME_DIR" in os.environ else Path(base)


def pidfile_for(mountpoint: Path) -> Path:
    digest = hashlib.sha1(os.fsencode(mountpoint.resolve())).hexdigest()[:16]
    return runtime_dir() / f"{digest}.pid"


async def serve(config: MountConfig, on_ready: Callable[[str | None], None]) -> None:
    """Mount, call on_ready(None) once the mount answers, serve until unmounted or signalled."""
    source = LowerSource(config.source, config.lower)
    disk = None
    if config.cache.cache_dir is not None and config.cache.disk_bytes > 0:
        try:
            disk = DiskTier(config.cache.cache_dir, config.cache.disk_bytes,
                            block_size=config.cache.block_size)
        except CacheDirError as exc:  # says which dir, and why
            raise MountError(str(exc)) from None
        except OSError as exc:
            raise MountError(f"cannot use cache dir {config.cache.cache_dir}: {exc}") from None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        cache = BlockCache(config.cache, source, nursery, disk)
        # notify_store takes any buffer (it gets a Py_buffer), whatever its stub says.
        store = cast(Callable[[int, int, Block], None], pyfuse3.notify_store)
        core = FilesystemCore(source, cache, nursery, readahead=config.readahead,
                              invalidate=pyfuse3.invalidate_inode, store=store)
        ops = FuseOperations(core, config.kernel.entry_timeout, config.kernel.attr_timeout)
        options = set(pyfuse3.default_options)
        options |= {"ro", "subtype=fusecache", f"fsname={config.source}"}
        if config.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, str(config.mountpoint), options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount at {config.mountpoint}: {exc}") from None
        try:
            with trio.CancelScope() as requests:
                nursery.start_soon(_stop_on_signals, core, requests)
                nursery.start_soon(_announce_when_ready, config, core, nursery, on_ready)
                await pyfuse3.main()
        finally:
            # No notify call may run into the session pyfuse3.close() frees.
            with trio.CancelScope(shield=True):
                await core.end_page_cache_calls(PAGE_CACHE_GRACE)
            pyfuse3.close(unmount=True)
        log.info("unmounted %s", config.mountpoint)
        with trio.move_on_after(config.cache.flush_on_unmount):
            await cache.flush_to_disk()
        nursery.cancel_scope.cancel()


async def _stop_on_signals(core: FilesystemCore, requests: trio.CancelScope) -> None:
    """On SIGTERM or SIGINT, unmount within a few seconds, however the lower mount fares."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            # While the main loop still answers the reads a page-cache store may wait on.
            await core.end_page_cache_calls(PAGE_CACHE_GRACE)
            pyfuse3.terminate()
            # pyfuse3.main() returns once every request under way has been answered;
            # one waiting on a hung lower mount would hold it up for the source
            # timeout.
            await trio.sleep(REQUEST_GRACE)
            if not requests.cancel_called:
                log.warning("dropping the requests still waiting on the lower mount")
                requests.cancel()
            return


async def _known_statfs(core: FilesystemCore) -> None:
    """Ask the lower mount's statfs once, so `df` answers while it hangs later."""
    with contextlib.suppress(OSError, FsError):
        await core.statfs()


async def _announce_when_ready(config: MountConfig, core: FilesystemCore,
                               nursery: trio.Nursery,
                               on_ready: Callable[[str | None], None]) -> None:
    # This stat is served by our own main loop, so it proves the mount answers.
    try:
        st = await trio.to_thread.run_sync(os.stat, config.mountpoint)
    except OSError as exc:
        on_ready(f"the mount does not answer: {exc.strerror} (is {config.source} answering?)")
        pyfuse3.terminate()
        return
    nursery.start_soon(_known_statfs, core)
    await trio.to_thread.run_sync(fuse_tuning.tune_connection, st.st_dev, config.kernel)
    log.info("serving %s at %s", config.source, config.mountpoint)
    on_ready(None)


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
            pidfile.parent.mkdir(parents=True, exist_ok=True)
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
    log_file.parent.mkdir(parents=True, exist_ok=True)
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
    target = os.fsencode(Path(os.path.realpath(path.parent)) / path.name)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            field = line.split(b" ")[4]
            point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
            if point == target:
                return True
    return False


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
