"""Faults of the lower mount (tests/faultfs.py): first faultfs alone, then fusecache over it.

Whatever could hang on a mount runs in a probe, a child process that runs a list of
steps and prints one JSON line per step with the time it took; a hang is then a
failed assertion after a bounded wait, never a hung test session.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fusecache.daemon import pidfile_for
from tests.conftest import Mount, abort_fuse_connections, needs_fuse
from tests.faultfs import FaultFSController, is_mounted
from tests.ramp import ramp, write_ramp

pytestmark = [needs_fuse, pytest.mark.mount]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# --- the probe: runs in a child process -------------------------------------------


def first_wrong(data: bytes, offset: int, seed: int | None) -> int | None:
    """The offset of the first byte of *data* (read at *offset*) that is not the ramp's."""
    if seed is None:
        return None
    want = ramp(offset, len(data), seed)
    if data == want:
        return None
    diff = np.frombuffer(data, np.uint8) != np.frombuffer(want, np.uint8)
    return offset + int(np.argmax(diff))


class _Prober:
    """The steps a probe can run; each returns the fields of its result line."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def open(self, path: str) -> dict[str, Any]:
        self.fd = os.open(path, os.O_RDONLY)
        return {}

    def read(self, offset: int, size: int, seed: int | None) -> dict[str, Any]:
        assert self.fd is not None, "read before open"
        data = os.pread(self.fd, size, offset)
        return {"len": len(data), "bad": first_wrong(data, offset, seed)}

    def scan(self, size: int, chunk: int, seed: int) -> dict[str, Any]:
        """pread [0, size) in chunks, going on after errors: [offset, length or -errno, bad]."""
        assert self.fd is not None, "scan before open"
        chunks, slowest = [], 0.0
        for off in range(0, size, chunk):
            start = time.monotonic()
            try:
                data = os.pread(self.fd, chunk, off)
            except OSError as exc:
                chunks.append([off, -(exc.errno or 0), None])
            else:
                chunks.append([off, len(data), first_wrong(data, off, seed)])
            slowest = max(slowest, time.monotonic() - start)
        return {"chunks": chunks, "slowest": slowest}

    def readall(self, path: str, seed: int | None) -> dict[str, Any]:
        got, bad = 0, None
        with open(path, "rb", buffering=0) as f:
            while data := f.read(MiB):
                bad = bad if bad is not None else first_wrong(data, got, seed)
                got += len(data)
        return {"len": got, "bad": bad}

    def stat(self, path: str) -> dict[str, Any]:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}

    def listdir(self, path: str) -> dict[str, Any]:
        return {"names": sorted(os.listdir(path))}

    def drop(self, path: str) -> dict[str, Any]:
        """Drop the kernel's pages of a file."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return {}

    def stats(self, mountpoint: str) -> dict[str, Any]:
        return {"stats": json.loads(os.getxattr(mountpoint, "user.fusecache.stats"))}

    def wait_stats(self, mountpoint: str, want: dict[str, int], timeout: float) -> dict[str, Any]:
        """Poll the stats until each key in *want* has its value; ok says whether it came."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stats = self.stats(mountpoint)["stats"]
            except OSError as exc:
                stats = {"errno": exc.errno}
            if all(stats.get(k) == v for k, v in want.items()):
                return {"ok": True, "stats": stats}
            if time.monotonic() > deadline:
                return {"ok": False, "stats": stats}
            time.sleep(0.1)

    def wait_file(self, path: str, timeout: float) -> dict[str, Any]:
        """Wait for the test's go signal."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"no {path}")
            time.sleep(0.01)
        return {}


def run_probe(steps: list[list[Any]]) -> None:
    prober = _Prober()
    for op, *args in steps:
        start = time.monotonic()
        try:
            out = getattr(prober, op)(*args)
        except OSError as exc:
            out = {"errno": exc.errno, "error": str(exc)}
        print(json.dumps({"op": op, "t": time.monotonic() - start, **out}), flush=True)


class Probe:
    """A child process running *steps*; results come back one per step, in order."""

    def __init__(self, steps: list[list[Any]]):
        self.steps = steps
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_faults", json.dumps(steps)], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._buf = b""
        self._done = 0
        self.noise: list[str] = []  # anything not a result, e.g. a traceback

    def next_or_none(self, timeout: float) -> dict[str, Any] | None:
        """The next step's result, or None if it is not there within *timeout* seconds."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = rest
                if line.startswith(b"{"):
                    self._done += 1
                    result: dict[str, Any] = json.loads(line)
                    return result
                self.noise.append(line.decode(errors="replace"))
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self._buf += chunk

    def next(self, timeout: float) -> dict[str, Any]:
        """The next step's result; a step with no answer within *timeout* fails the test."""
        step = self.steps[self._done] if self._done < len(self.steps) else None
        result = self.next_or_none(timeout)
        assert result is not None, (f"probe step {step} gave no answer in {timeout} s "
                                    f"{' '.join(self.noise)[-2000:]}")
        return result

    def kill(self) -> None:
        self.proc.kill()


class Children:
    """The child processes of a test that may block on a mount: probes and commands."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def probe(self, *steps: list[Any]) -> Probe:
        p = Probe(list(steps))
        self.procs.append(p.proc)
        return p

    def command(self, args: list[str], timeout: float) -> tuple[int | None, float, str]:
        """Run a command: (exit code or None if it did not end in *timeout*, seconds, output).

        One that does not end is killed and left to the cleanup: waiting for it
        could mean waiting for a hung FUSE request (subprocess.run would).
        """
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return None, time.monotonic() - start, ""
        return proc.returncode, time.monotonic() - start, out.decode(errors="replace")

    def end(self, faultfs: FaultFSController, tmp_path: Path) -> None:
        """Kill every child and see it gone, whatever it waits on.

        A process killed while its request is with a FUSE daemon dies only once the
        daemon answers: so faults are cleared first, and the FUSE connections under
        tmp_path are aborted as a last resort.
        """
        for proc in self.procs:
            proc.kill()
        faultfs.clear()
        if not _reaped(self.procs, 15):
            abort_fuse_connections(tmp_path)
            _reaped(self.procs, 10)
        for proc in self.procs:
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def children(faultfs: FaultFSController, tmp_path: Path) -> Iterator[Children]:
    """Starts probes and commands; ends them all at the end of the test."""
    made = Children()
    try:
        yield made
    finally:
        made.end(faultfs, tmp_path)


def _reaped(procs: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    """Wait for every process in *procs*, *timeout* seconds in all; say whether all ended."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return True


# --- faultfs alone ----------------------------------------------------------------------


def _backing_files(faultfs: FaultFSController) -> None:
    (faultfs.backing / "sub").mkdir()
    write_ramp(faultfs.backing / "a.bin", 3 * MiB + 5, seed=1)
    write_ramp(faultfs.backing / "sub" / "b.bin", 5000, seed=2)
    os.symlink("a.bin", faultfs.backing / "link")
    os.setxattr(faultfs.backing / "a.bin", "user.etag", b"e1")


def test_faultfs_passes_through(faultfs: FaultFSController) -> None:
    _backing_files(faultfs)
    low, back = faultfs.mount, faultfs.backing
    assert sorted(os.listdir(low)) == ["a.bin", "link", "sub"]
    for name in ("a.bin", "sub/b.bin", "sub"):
        st, want = os.lstat(low / name), os.lstat(back / name)
        for field in ("st_ino", "st_size", "st_mode", "st_mtime_ns", "st_ctime_ns"):
            assert getattr(st, field) == getattr(want, field), (name, field)
    assert (low / "a.bin").read_bytes() == ramp(0, 3 * MiB + 5, seed=1)
    assert os.readlink(low / "link") == "a.bin"
    assert os.getxattr(low / "a.bin", "user.etag") == b"e1"
    assert os.listxattr(low / "a.bin") == ["user.etag"]
    assert os.statvfs(low).f_blocks == os.statvfs(back).f_blocks
    write_ramp(back / "sub" / "b.bin", 7000, seed=3)  # timeouts of 0: seen at once
    assert (low / "sub" / "b.bin").read_bytes() == ramp(0, 7000, seed=3)
    assert faultfs.wait_counters(lambda c: c["read"] > 0 and c["open"] >= 2 and c["lookup"] > 0)


@pytest.mark.parametrize("kind", ["all", "read"])
def test_faultfs_hang_waits_until_cleared(faultfs: FaultFSController, children: Children,
                                          kind: str) -> None:
    _backing_files(faultfs)
    a = str(faultfs.mount / "a.bin")
    faultfs.set(hang=kind)
    p = children.probe(["stat", a], ["readall", a, 1])
    if kind == "read":
        assert p.next(10)["size"] == 3 * MiB + 5  # only reads hang
    assert p.next_or_none(1.5) is None, "the operation should hang"
    assert faultfs.wait_counters(lambda c: c["hung"] >= 1 and c["hangs"] >= 1)
    faultfs.clear()
    if kind == "all":
        assert p.next(5)["size"] == 3 * MiB + 5
    r = p.next(5)
    assert (r["op"], r.get("len"), r.get("bad")) == ("readall", 3 * MiB + 5, None), r
    assert faultfs.wait_counters(lambda c: c["hung"] == 0)


@pytest.mark.parametrize("kind", ["all", "read"])
def test_faultfs_eio(faultfs: FaultFSController, kind: str) -> None:
    _backing_files(faultfs)
    faultfs.set(eio=kind)
    with pytest.raises(OSError) as info:
        (faultfs.mount / "a.bin").read_bytes()
    assert info.value.errno == errno.EIO
    if kind == "read":
        assert os.stat(faultfs.mount / "a.bin").st_size == 3 * MiB + 5
    else:
        with pytest.raises(OSError) as info:
            os.stat(faultfs.mount / "sub")
        assert info.value.errno == errno.EIO
    faultfs.clear()
    assert (faultfs.mount / "a.bin").read_bytes() == ramp(0, 3 * MiB + 5, seed=1)


def test_faultfs_short_and_slow_reads(faultfs: FaultFSController) -> None:
    _backing_files(faultfs)
    faultfs.set(short_reads=True)
    with open(faultfs.mount / "a.bin", "rb", buffering=0) as f:
        for off, n in [(0, 65536), (12345, 4096), (3 * MiB + 4, 100), (7, 1)]:
            data = os.pread(f.fileno(), n, off)
            assert 1 <= len(data) <= max(1, n // 2)
            assert data == ramp(off, len(data), seed=1)
        faultfs.set(short_reads=False, read_delay=0.3)
        start = time.monotonic()
        assert os.pread(f.fileno(), 4096, 0) == ramp(0, 4096, seed=1)
        assert time.monotonic() - start >= 0.3
    assert faultfs.wait_counters(lambda c: c["short"] == 3)  # not the 1-byte one


@pytest.mark.parametrize("size", [None, 4 * MiB, 1000])
def test_faultfs_rewrites_a_file_mid_read(faultfs: FaultFSController, size: int | None) -> None:
    _backing_files(faultfs)
    old = os.stat(faultfs.backing / "a.bin")
    faultfs.set(mutate={"path": "a.bin", "after_reads": 2, "size": size, "seed": 9})
    with open(faultfs.mount / "a.bin", "rb", buffering=0) as f:
        for i in range(2):
            assert os.pread(f.fileno(), 4096, i * 4096) == ramp(i * 4096, 4096, seed=1)
        new_size = old.st_size if size is None else size
        n = min(4096, new_size)
        assert os.pread(f.fileno(), 4096, 0) == ramp(0, n, seed=9)
    st = os.stat(faultfs.mount / "a.bin")
    assert (st.st_ino, st.st_size) == (old.st_ino, new_size)  # in place
    faultfs.set(read_delay=0)  # the same mutate value does not fire again
    assert (faultfs.mount / "a.bin").read_bytes() == ramp(0, new_size, seed=9)
    assert faultfs.wait_counters(lambda c: c["mutations"] == 1)


@pytest.mark.parametrize("how", ["enotconn", "kill"])
def test_faultfs_vanishes(faultfs: FaultFSController, how: str) -> None:
    _backing_files(faultfs)
    if how == "kill":
        faultfs.kill()
    else:
        faultfs.set(enotconn=True)
    for action in (lambda: os.stat(faultfs.mount / "a.bin"),
                   lambda: os.listdir(faultfs.mount)):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == errno.ENOTCONN
    assert is_mounted(faultfs.mount)  # gone, not unmounted: the fixture clears it
    if how == "enotconn":
        faultfs.clear()
        assert (faultfs.mount / "sub" / "b.bin").read_bytes() == ramp(0, 5000, seed=2)


# --- fusecache over faultfs ---------------------------------------------------------

TIMEOUT = 2.0  # --source-timeout of every fusecache mount below
ATTR_TIMEOUT = 1.0  # --attr-timeout: after this the kernel asks the daemon again
PROMPT = 1.0  # seconds: cached data, and any call while the source is known unhealthy
DEADLINE = 5.0  # seconds for umount or SIGTERM to leave no mount
SLACK = 5.0  # a probe step's answer is awaited this much longer than its bound
FILES = {  # under the lower mount: (size, ramp seed)
    "models/a.bin": (3 * MiB + 123, 1),  # read whole before a fault: cached
    "models/b.bin": (24 * MiB + 777, 2),  # not cached; a reader opens it before the fault
    "models/c.bin": (5 * MiB + 5, 3),  # not cached, never opened before the fault
    "small.txt": (5000, 4),  # read whole before a fault: cached
}
CACHED = ["models/a.bin", "small.txt"]


class Rig:
    """fusecache mounted over faultfs (`lower`), with FILES in it."""

    def __init__(self, lower: FaultFSController, mount: Mount, go: Path):
        self.lower, self.m, self.go = lower, mount, go

    def path(self, name: str) -> str:
        return str(self.m.mnt / name)

    def readall(self, name: str) -> list[Any]:
        return ["readall", self.path(name), FILES[name][1]]

    def warm(self) -> None:
        """Before any fault: list the directories, read CACHED whole, let the fetches end."""
        assert sorted(os.listdir(self.m.mnt)) == ["models", "small.txt"]
        assert sorted(os.listdir(self.m.mnt / "models")) == ["a.bin", "b.bin", "c.bin"]
        for name in CACHED:
            assert (self.m.mnt / name).read_bytes() == ramp(0, *FILES[name])
        self.m.settled()

    def pid(self) -> int:
        return int(pidfile_for(self.m.mnt).read_text())


@pytest.fixture
def rig(faultfs: FaultFSController, mount_factory, tmp_path: Path) -> Iterator[Rig]:
    (faultfs.backing / "models").mkdir()
    for name, (size, seed) in FILES.items():
        write_ramp(faultfs.backing / name, size, seed)
    m = mount_factory(faultfs.mount, "--source-timeout", str(TIMEOUT),
                      "--attr-timeout", str(ATTR_TIMEOUT))
    yield Rig(faultfs, m, tmp_path / "go")
    faultfs.clear()  # fusecache unmounts (next) over a lower mount that answers


def assert_whole(r: dict[str, Any], name: str, within: float | None = None) -> None:
    """A readall result holds exactly the file's bytes, read within *within* seconds."""
    assert "errno" not in r and r["len"] == FILES[name][0] and r["bad"] is None, (name, r)
    if within is not None:
        assert r["t"] <= within, f"{name}: took {r['t']:.2f} s, bound {within} s"


def assert_fails(r: dict[str, Any], within: float, errnos: tuple[int, ...] = (errno.EIO,)) -> None:
    assert r.get("errno") in errnos, f"expected an error {errnos}, got {r}"
    assert r["t"] <= within, f"{r['op']} failed after {r['t']:.2f} s, bound {within} s"


def assert_recovers(rig: Rig, children: Children) -> None:
    """With the fault cleared, the source turns healthy and every file reads back whole."""
    want = {"source_healthy": 1, "abandoned_threads": 0}
    p = children.probe(["wait_stats", rig.path(""), want, 20], *(rig.readall(n) for n in FILES))
    r = p.next(20 + SLACK)
    assert r.get("ok"), f"the source did not recover: {r}"
    for name in FILES:
        assert_whole(p.next(30), name)


@pytest.mark.parametrize("kind", ["all", "read"])
def test_hang_fails_uncached_reads_within_twice_the_timeout(rig: Rig, children: Children,
                                                            kind: str) -> None:
    b_seed = FILES["models/b.bin"][1]
    p = children.probe(["open", rig.path("models/b.bin")], ["wait_file", str(rig.go), 30],
                       ["read", 0, 65536, b_seed], ["read", 16 * MiB, 65536, b_seed],
                       rig.readall("models/c.bin"), ["stats", rig.path("")])
    assert "errno" not in p.next(10)
    rig.lower.set(hang=kind)
    rig.go.touch()
    assert "errno" not in p.next(5)
    # The kernel retries a failed read once: two timeouts at worst.
    assert_fails(p.next(2 * TIMEOUT + SLACK), within=2 * TIMEOUT)
    assert_fails(p.next(PROMPT + SLACK), within=PROMPT)  # known unhealthy: at once
    r = p.next(PROMPT + SLACK)  # a new file fails at its open or its first read
    assert_fails(r, within=PROMPT, errnos=(errno.EIO, errno.ETIMEDOUT, errno.ENOTCONN))
    stats = p.next(PROMPT + SLACK)["stats"]
    assert stats["source_healthy"] == 0 and stats["source_timeouts"] >= 1, stats
    assert stats["abandoned_threads"] >= 1 and stats["rss_bytes"] > 0, stats
    assert rig.lower.counters()["hung"] >= 1  # the daemon really waited on the lower mount
    rig.lower.clear()
    assert_recovers(rig, children)


def test_hang_serves_cached_files(rig: Rig, children: Children) -> None:
    rig.warm()
    rig.lower.set(hang="all")
    time.sleep(ATTR_TIMEOUT + 0.2)  # the kernel's names and attributes have expired
    a = rig.path("models/a.bin")
    p = children.probe(["stat", a], ["listdir", rig.path("")], ["listdir", rig.path("models")],
                       rig.readall("models/a.bin"), ["drop", a], rig.readall("models/a.bin"),
                       rig.readall("small.txt"), ["stats", rig.path("")])
    st = p.next(PROMPT + SLACK)
    assert st.get("size") == FILES["models/a.bin"][0] and st["t"] <= PROMPT, st
    for names in (["models", "small.txt"], ["a.bin", "b.bin", "c.bin"]):
        r = p.next(PROMPT + SLACK)
        assert r.get("names") == names and r["t"] <= PROMPT, r
    assert_whole(p.next(PROMPT + SLACK), "models/a.bin", within=PROMPT)
    r = p.next(PROMPT + SLACK)
    assert "errno" not in r and r["t"] <= PROMPT, r  # the drop opens the file
    assert_whole(p.next(PROMPT + SLACK), "models/a.bin", within=PROMPT)  # from the daemon
    assert_whole(p.next(PROMPT + SLACK), "small.txt", within=PROMPT)
    r = p.next(PROMPT + SLACK)
    assert "stats" in r and r["t"] <= PROMPT, r
    rig.lower.clear()
    assert_recovers(rig, children)


@pytest.mark.parametrize("how", ["umount", "sigterm"])
def test_unmount_during_hang_with_a_blocked_reader(rig: Rig, children: Children, how: str) -> None:
    pid = rig.pid()
    p = children.probe(["open", rig.path("models/b.bin")], ["wait_file", str(rig.go), 30],
                       ["read", 0, 65536, FILES["models/b.bin"][1]])
    assert "errno" not in p.next(10)
    rig.lower.set(hang="all")
    rig.go.touch()
    assert "errno" not in p.next(5)
    assert rig.lower.wait_counters(lambda c: c["hung"] >= 1), "the read never reached below"
    start = time.monotonic()
    if how == "umount":
        code, took, out = children.command(umount_cmd(rig), timeout=DEADLINE + 10)
        assert code == 0, f"umount: exit {code} after {took:.1f} s: {out}"
    else:
        os.kill(pid, signal.SIGTERM)
    while (is_mounted(rig.m.mnt) or _alive(pid)) and time.monotonic() - start < DEADLINE + 10:
        time.sleep(0.05)
    took = time.monotonic() - start
    assert not is_mounted(rig.m.mnt), f"still mounted {took:.1f} s after {how}"
    assert not _alive(pid), f"the daemon still runs {took:.1f} s after {how}"
    assert took <= DEADLINE, f"{how} took {took:.1f} s"
    r = p.next(SLACK)  # the blocked reader is let go, with an error
    # EIO from the source timeout, or ECONNABORTED for a request the unmount dropped
    assert r.get("errno") in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED), r


def umount_cmd(rig: Rig) -> list[str]:
    return [sys.executable, "-m", "fusecache", "umount", str(rig.m.mnt)]


def _alive(pid: int) -> bool:
    """True while *pid* runs; a zombie counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_eio_fails_uncached_reads_and_serves_cached(rig: Rig, children: Children) -> None:
    rig.warm()
    rig.lower.set(eio="read")
    p = children.probe(rig.readall("models/b.bin"), rig.readall("models/a.bin"),
                       rig.readall("small.txt"), ["stats", rig.path("")])
    assert_fails(p.next(2 * TIMEOUT + SLACK), within=2 * TIMEOUT)
    assert_whole(p.next(PROMPT + SLACK), "models/a.bin", within=PROMPT)
    assert_whole(p.next(PROMPT + SLACK), "small.txt", within=PROMPT)
    assert "stats" in p.next(PROMPT + SLACK)
    assert _alive(rig.pid())
    rig.lower.clear()
    assert_recovers(rig, children)


def test_short_reads_give_whole_bytes_or_eio(rig: Rig, children: Children) -> None:
    rig.lower.set(short_reads=True)
    size, seed = FILES["models/b.bin"]
    p = children.probe(["open", rig.path("models/b.bin")], ["scan", size, MiB, seed],
                       ["read", 5 * MiB + 3, 100_000, seed], ["read", size - 5, 4096, seed],
                       rig.readall("models/c.bin"))
    assert "errno" not in p.next(10)
    chunks = p.next(60)["chunks"]
    for off, got, bad in chunks:
        assert bad is None, f"wrong bytes at {bad}"
        assert got in (min(MiB, size - off), -errno.EIO), f"{got} bytes at {off}"
    for want in (100_000, 5):
        r = p.next(10)
        assert r.get("errno") == errno.EIO or (r["len"] == want and r["bad"] is None), r
    r = p.next(30)
    assert r.get("errno") == errno.EIO or (r["len"], r["bad"]) == (FILES["models/c.bin"][0],
                                                                   None), r
    assert rig.lower.counters()["short"] > 0
    rig.lower.clear()
    assert_recovers(rig, children)


def test_slow_store_reads_correctly_and_stays_healthy(rig: Rig, children: Children) -> None:
    rig.lower.set(read_delay=0.05)  # per lower read of up to 1 MiB: 0.4 s per 8 MiB fetch
    p = children.probe(rig.readall("models/b.bin"), rig.readall("models/c.bin"),
                       ["stats", rig.path("")])
    assert_whole(p.next(60), "models/b.bin")
    assert_whole(p.next(60), "models/c.bin")
    stats = p.next(10)["stats"]
    assert stats["source_healthy"] == 1 and stats["source_timeouts"] == 0, stats
    assert rig.lower.counters()["read"] >= 29  # every byte came through the delay


@pytest.mark.parametrize("new_size", [None, 30 * MiB, 10 * MiB], ids=["same", "grown", "shrunk"])
def test_rewrite_mid_read_never_mixes_versions(rig: Rig, children: Children,
                                               new_size: int | None) -> None:
    size, seed = FILES["models/b.bin"]
    rig.lower.set(mutate={"path": "models/b.bin", "after_reads": 4, "size": new_size,
                          "seed": 9})
    p = children.probe(["open", rig.path("models/b.bin")], ["scan", size, 256 * 1024, seed])
    assert "errno" not in p.next(10)
    for off, got, bad in p.next(60)["chunks"]:
        assert bad is None, f"bytes at {bad} are not the old version's"
        want = min(256 * 1024, size - off)
        if new_size is not None and new_size < size:  # the kernel may learn the new size
            assert got == -errno.EIO or 0 <= got <= want, f"{got} bytes at {off}"
        else:
            assert got in (want, -errno.EIO), f"{got} bytes at {off}"
    assert rig.lower.wait_counters(lambda c: c["mutations"] == 1), "not rewritten mid-read"
    time.sleep(ATTR_TIMEOUT + 0.2)
    p = children.probe(["readall", rig.path("models/b.bin"), 9])
    r = p.next(30)
    assert "errno" not in r and r["bad"] is None, r
    assert r["len"] == (size if new_size is None else new_size), r


@pytest.mark.parametrize("how", ["enotconn", "kill"])
def test_vanished_store_serves_cached_files(rig: Rig, children: Children, how: str) -> None:
    rig.warm()
    pid = rig.pid()
    b_seed = FILES["models/b.bin"][1]
    p = children.probe(["open", rig.path("models/b.bin")], ["wait_file", str(rig.go), 30],
                       rig.readall("models/a.bin"), ["stat", rig.path("small.txt")],
                       ["read", 0, 65536, b_seed], rig.readall("models/c.bin"),
                       ["stats", rig.path("")])
    assert "errno" not in p.next(10)
    if how == "kill":
        rig.lower.kill()
    else:
        rig.lower.set(enotconn=True)
    time.sleep(ATTR_TIMEOUT + 0.2)
    rig.go.touch()
    assert "errno" not in p.next(5)
    assert_whole(p.next(PROMPT + SLACK), "models/a.bin", within=PROMPT)
    r = p.next(PROMPT + SLACK)
    assert r.get("size") == FILES["small.txt"][0] and r["t"] <= PROMPT, r
    assert_fails(p.next(PROMPT + SLACK), within=PROMPT)
    assert_fails(p.next(PROMPT + SLACK), within=PROMPT,
                 errnos=(errno.EIO, errno.ENOTCONN, errno.ENOENT))
    assert "stats" in p.next(PROMPT + SLACK)
    assert _alive(pid)
    if how == "enotconn":
        rig.lower.clear()
        assert_recovers(rig, children)
    code, took, out = children.command(umount_cmd(rig), timeout=DEADLINE + 10)
    assert code == 0, f"umount: exit {code} after {took:.1f} s: {out}"
    assert took <= DEADLINE and not is_mounted(rig.m.mnt), f"umount took {took:.1f} s"


if __name__ == "__main__":
    run_probe(json.loads(sys.argv[1]))
