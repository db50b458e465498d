"""A fault-injecting read-only FUSE file system over a directory: the lower mount in tests.

Run it in its own process (pyfuse3 serves one file system per process, and a
hung file system must not hang the test):

    python -m tests.faultfs BACKING_DIR MOUNTPOINT CONTROL_FILE

It passes lookups, attributes, listings, reads, links, xattrs and statfs
through to BACKING_DIR, reporting the backing files' own attributes (inode
numbers too), with entry and attribute timeouts of 0 and every file opened
direct_io, as s3fs does. Switches come from CONTROL_FILE, a JSON object that
the controller (`FaultFS`) replaces atomically; the file system re-reads it
when its inode or mtime changes, checked on every operation:

- ``hang``: null, "all", an operation's name ("read") or a list of names: the
  operation waits, without blocking the event loop, until the switch is cleared,
  then proceeds;
- ``eio``: the same values: the operation fails with EIO;
- ``enotconn``: every operation fails with ENOTCONN (the store vanished);
- ``short_reads``: a read returns at most half of what was asked (at least 1 byte);
- ``read_delay``: seconds every read sleeps first (a slow store);
- ``mutate``: {"path": REL, "after_reads": N, "size": S or null, "seed": K,
  "keep_mtime": false}: after N more reads of REL, the next read first rewrites
  the backing file in place (same inode) as tests.ramp data of size S (null:
  unchanged) and seed K, with its old mtime put back if keep_mtime. A new value
  arms it once.

Operation counts go to CONTROL_FILE.counters (JSON, replaced atomically at most
every 50 ms), so they can be read while every operation hangs: one count per
operation name, and ``hung`` (waiting now), ``hangs``, ``eio``, ``enotconn``,
``short``, ``mutations``, ``read_bytes`` and ``pid``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from tests.ramp import ramp

log = logging.getLogger("faultfs")
T = TypeVar("T")

SWITCHES = {"hang": None, "eio": None, "enotconn": False, "short_reads": False,
            "read_delay": 0.0, "mutate": None}
POLL = 0.05  # seconds between looks at the control file while an operation hangs


def counters_path(control: Path) -> Path:
    return control.with_name(control.name + ".counters")


def _matches(spec: object, kind: str) -> bool:
    return spec == "all" or spec == kind or (isinstance(spec, list) and kind in spec)


class FaultFS(pyfuse3.Operations):
    """The file system: passthrough, with the control file's faults before each operation."""

    def __init__(self, backing: str, control: str):
        super().__init__()
        self.backing = os.fsencode(os.path.abspath(backing))
        self.control = Path(control)
        self.switches: dict[str, Any] = dict(SWITCHES)
        self._control_key: tuple[int, int] | None = None
        self._paths: dict[int, bytes] = {pyfuse3.ROOT_INODE: self.backing}
        self._files: dict[int, int] = {}  # fh (the backing fd) -> inode
        self._dirs: dict[int, list[tuple[bytes, os.stat_result]]] = {}
        self._next_dir = 1
        self._armed: str | None = None  # the mutate spec in force, as JSON
        self._reads_left = 0
        self._mutated = False  # the armed spec has been carried out
        self.counts: Counter[str] = Counter(pid=os.getpid())
        self.stopping = False

    # --- the control file and the faults ----------------------------------

    def _refresh(self) -> None:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            key, loaded = None, {}
        else:
            key = (st.st_ino, st.st_mtime_ns)
            if key == self._control_key:
                return
            loaded = json.loads(self.control.read_bytes() or b"{}")
        unknown = set(loaded) - set(SWITCHES)
        if unknown:
            log.error("unknown switches ignored: %s", sorted(unknown))
        self._control_key = key
        self.switches = {**SWITCHES, **{k: v for k, v in loaded.items() if k in SWITCHES}}
        spec = self.switches["mutate"]
        armed = json.dumps(spec, sort_keys=True) if spec else None
        if armed != self._armed:
            self._armed, self._mutated = armed, False
            self._reads_left = int(spec.get("after_reads", 0)) if spec else 0

    async def _gate(self, kind: str) -> None:
        """Count the operation and apply enotconn, eio and hang to it."""
        self.counts[kind] += 1
        hung = False
        try:
            while True:
                self._refresh()
                if self.switches["enotconn"]:
                    self.counts["enotconn"] += 1
                    raise pyfuse3.FUSEError(errno.ENOTCONN)
                if _matches(self.switches["eio"], kind):
                    self.counts["eio"] += 1
                    raise pyfuse3.FUSEError(errno.EIO)
                if not _matches(self.switches["hang"], kind):
                    return
                if self.stopping:  # a hung operation would keep the main loop from ending
                    raise pyfuse3.FUSEError(errno.EIO)
                if not hung:
                    hung = True
                    self.counts["hangs"] += 1
                    self.counts["hung"] += 1
                await trio.sleep(POLL)
        finally:
            if hung:
                self.counts["hung"] -= 1

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """A blocking call on the backing directory, in a worker thread."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    # --- passthrough ------------------------------------------------------

    def _path(self, inode: int) -> bytes:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _entry(self, st: os.stat_result, inode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        e.st_ino = inode
        e.generation = 0
        e.entry_timeout = 0  # honest about changes, like a store that is asked every time
        e.attr_timeout = 0
        return e

    def _inode_of(self, path: bytes, st: os.stat_result) -> int:
        if path == self.backing:
            return pyfuse3.ROOT_INODE
        self._paths[st.st_ino] = path
        return st.st_ino

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        await self._gate("lookup")
        path = os.path.join(self._path(parent_inode), name)
        st = await self._call(os.lstat, path)
        return self._entry(st, self._inode_of(path, st))

    async def getattr(self, inode: int, ctx: Any) -> Any:
        await self._gate("getattr")
        return self._entry(await self._call(os.lstat, self._path(inode)), inode)

    async def readlink(self, inode: int, ctx: Any) -> Any:
        await self._gate("readlink")
        return await self._call(os.readlink, self._path(inode))

    async def opendir(self, inode: int, ctx: Any) -> Any:
        await self._gate("opendir")
        path = self._path(inode)

        def listing() -> list[tuple[bytes, os.stat_result]]:
            return [(n, os.lstat(os.path.join(path, n))) for n in sorted(os.listdir(path))]

        fh, self._next_dir = self._next_dir, self._next_dir + 1
        self._dirs[fh] = await self._call(listing)
        for n, st in self._dirs[fh]:
            self._inode_of(os.path.join(path, n), st)
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        await self._gate("readdir")
        entries = self._dirs[fh]
        for pos in range(start_id, len(entries)):
            name, st = entries[pos]
            if not pyfuse3.readdir_reply(token, name, self._entry(st, st.st_ino), pos + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        await self._gate("open")
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = await self._call(os.open, self._path(inode), os.O_RDONLY | os.O_CLOEXEC)
        self._files[fd] = inode
        return pyfuse3.FileInfo(fh=fd, direct_io=True)  # no page cache, as s3fs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self._gate("read")
        if self.switches["read_delay"]:
            await trio.sleep(float(self.switches["read_delay"]))
        await self._maybe_mutate(self._files[fh])
        if self.switches["short_reads"] and size > 1:
            size //= 2
            self.counts["short"] += 1
        data = await self._call(os.pread, fh, size, off)
        self.counts["read_bytes"] += len(data)
        return data

    async def _maybe_mutate(self, inode: int) -> None:
        spec = self.switches["mutate"]
        path = os.path.join(self.backing, os.fsencode(spec["path"])) if spec else None
        if path is None or self._mutated or self._paths.get(inode) != path:
            return
        if self._reads_left > 0:
            self._reads_left -= 1
            return
        self._mutated = True  # once per spec: a new spec arms again
        await self._call(_rewrite, path, spec.get("size"), int(spec.get("seed", 0)),
                         bool(spec.get("keep_mtime", False)))
        self.counts["mutations"] += 1

    async def release(self, fh: int) -> None:
        await self._gate("release")
        self._files.pop(fh, None)
        await self._call(os.close, fh)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> Any:
        await self._gate("getxattr")
        return await self._call(_getxattr, self._path(inode), name)

    async def listxattr(self, inode: int, ctx: Any) -> Any:
        await self._gate("listxattr")
        return [os.fsencode(n) for n in await self._call(_listxattr, self._path(inode))]

    async def statfs(self, ctx: Any) -> Any:
        await self._gate("statfs")
        sv = await self._call(os.statvfs, self.backing)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out

    # --- the process ------------------------------------------------------

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_counters)
            nursery.start_soon(self._stop_on_signals)
            await pyfuse3.main(max_tasks=1000)  # each hung operation holds a task
            nursery.cancel_scope.cancel()

    async def _stop_on_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.stopping = True  # hung operations fail, so the main loop can end
                pyfuse3.terminate()
                return

    async def _write_counters(self) -> None:
        path = counters_path(self.control)
        written = None
        while True:
            snapshot = dict(self.counts)
            if snapshot != written:
                await trio.to_thread.run_sync(_replace, path, json.dumps(snapshot).encode())
                written = snapshot
            await trio.sleep(POLL)


def _rewrite(path: bytes, size: int | None, seed: int, keep_mtime: bool) -> None:
    """Rewrite a backing file in place (same inode) as ramp data of *seed*."""
    st = os.stat(path)
    size = st.st_size if size is None else size
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, 8 << 20):
            os.pwrite(fd, ramp(off, min(8 << 20, size - off), seed), off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _getxattr(path: bytes, name: bytes) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def _listxattr(path: bytes) -> list[str]:
    return os.listxattr(path, follow_symlinks=False)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the controller, for tests -------------------------------------------------


def is_mounted(path: Path) -> bool:
    """Whether *path* is a mount point, from mountinfo: never asks the file system there."""
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split(b" ")[4]
            for code in (b"\\040", b"\\011", b"\\012", b"\\134"):
                point = point.replace(code, bytes([int(code[1:], 8)]))
            if point == target:
                return True
    return False


def unmount(path: Path) -> None:
    """Unmount a FUSE mount, lazily if it is busy; nothing if it is not mounted."""
    for flags in ("-u", "-uz"):
        if not is_mounted(path):
            return
        subprocess.run(["fusermount3", flags, str(path)], capture_output=True, check=False,
                       timeout=30)


class FaultFSController:
    """A running faultfs process: switch its faults, read its counters, stop it."""

    def __init__(self, backing: Path, mount: Path, control: Path, log_file: Path):
        self.backing, self.mount, self.control, self.log_file = backing, mount, control, log_file
        self._switches: dict[str, Any] = {}
        self._stamp = 0
        self._write()
        root = Path(__file__).resolve().parent.parent
        with open(log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.faultfs", str(backing), str(mount), str(control)],
                cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while not (is_mounted(mount) and counters_path(control).exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"faultfs did not mount: {log_file.read_text()[-2000:]}")
            time.sleep(0.02)

    def set(self, **switches: Any) -> None:
        """Change the named switches; the others keep their values."""
        unknown = set(switches) - set(SWITCHES)
        assert not unknown, f"unknown faultfs switches {sorted(unknown)}"
        self._switches.update(switches)
        self._write()

    def clear(self) -> None:
        """Every switch off: hung operations proceed."""
        self._switches = {}
        self._write()

    def _write(self) -> None:
        # The mtime is set, strictly increasing, so that the file system sees every
        # version even when a new file gets the inode number of the one it replaces.
        tmp = self.control.with_name(self.control.name + ".tmp")
        tmp.write_text(json.dumps(self._switches))
        self._stamp = max(time.time_ns(), self._stamp + 1)
        os.utime(tmp, ns=(self._stamp, self._stamp))
        os.replace(tmp, self.control)

    def counters(self) -> Counter[str]:
        """The operation counts as of at most 50 ms ago."""
        return Counter(json.loads(counters_path(self.control).read_bytes()))

    def wait_counters(self, pred: Callable[[Counter[str]], bool], timeout: float = 5) -> bool:
        """Wait until *pred* holds for the counters; say whether it did."""
        deadline = time.monotonic() + timeout
        while not pred(self.counters()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def kill(self) -> None:
        """SIGKILL the file system: its mount stays, and every call on it gets ENOTCONN."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        """Release hung operations, unmount and stop the process; safe to call twice."""
        if self.proc.poll() is None:
            self.clear()
        unmount(self.mount)
        for stop in (lambda: None, self.proc.terminate, self.proc.kill):
            if self.proc.poll() is not None:
                break
            stop()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        unmount(self.mount)  # a mount left by a killed process


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m tests.faultfs BACKING_DIR MOUNTPOINT CONTROL_FILE",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="faultfs %(levelname)s: %(message)s")
    backing, mountpoint, control = argv
    fs = FaultFS(backing, control)
    options = set(pyfuse3.default_options) | {"ro", "fsname=faultfs", "subtype=faultfs"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(fs.serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
