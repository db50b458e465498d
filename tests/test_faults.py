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
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import needs_fuse
from tests.faultfs import FaultFSController, is_mounted
from tests.ramp import ramp, write_ramp

pytestmark = needs_fuse

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


@pytest.fixture
def probe(faultfs: FaultFSController, tmp_path: Path) -> Iterator[Callable[..., Probe]]:
    """Starts probes; at the end kills them and sees them gone, whatever they wait on.

    A process killed while its request is with a FUSE daemon dies only once the
    daemon answers: so faults are cleared first, and a FUSE connection under
    tmp_path is aborted as a last resort.
    """
    made: list[Probe] = []

    def start(*steps: list[Any]) -> Probe:
        made.append(Probe(list(steps)))
        return made[-1]

    try:
        yield start
    finally:
        for p in made:
            p.kill()
        faultfs.clear()
        stuck = [p for p in made if not _reaped(p.proc, 15)]
        if stuck:
            _abort_fuse_connections(tmp_path)
            for p in stuck:
                _reaped(p.proc, 10)
        for p in made:
            if p.proc.stdout is not None:
                p.proc.stdout.close()


def _reaped(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _abort_fuse_connections(under: Path) -> None:
    """Abort the FUSE connection of every mount under *under*: its requests fail at once."""
    prefix = os.fsencode(under.resolve()) + b"/"
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if fields[4].startswith(prefix) and b"fuse" in line.split(b" - ")[1]:
                minor = fields[2].split(b":")[1].decode()
                try:
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
                except OSError:
                    pass


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
def test_faultfs_hang_waits_until_cleared(faultfs: FaultFSController, probe, kind: str) -> None:
    _backing_files(faultfs)
    a = str(faultfs.mount / "a.bin")
    faultfs.set(hang=kind)
    p = probe(["stat", a], ["readall", a, 1])
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


if __name__ == "__main__":
    run_probe(json.loads(sys.argv[1]))
