"""fusecache over the real OSS stand-in: an S3 server on loopback mounted with s3fs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusecache.bench.standin import BUCKET, Standin, running_standin
from fusecache.config import MiB
from tests.conftest import fusecache_cmd, needs_fuse
from tests.ramp import ramp, write_ramp
from tests.test_mount import drop_kernel_cache

pytestmark = [
    pytest.mark.standin,
    needs_fuse,
    pytest.mark.skipif(shutil.which("s3fs") is None, reason="s3fs is not installed"),
]

SIZE = 24 * MiB + 4321
REPLACED, REPLACED_SIZE, NEW_SIZE = "replaced.bin", 16 * MiB + 99, 6 * MiB + 7


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    # The object exists before s3fs mounts: a lookup that comes before the server
    # lists a new object can leave s3fs taking the name for a directory.
    data = tmp_path_factory.mktemp("oss")
    (data / BUCKET).mkdir()
    write_ramp(data / BUCKET / "model.safetensors", SIZE, seed=5)
    write_ramp(data / BUCKET / REPLACED, REPLACED_SIZE, seed=21)
    with running_standin(data_dir=data) as s:
        _wait_for_object(s.mount / "model.safetensors", SIZE)
        yield s


def _wait_for_object(path: Path, size: int) -> None:
    """Wait until s3fs lists *path* as a regular file of *size* bytes.

    The server's listing cache may lag a new object by up to a second.
    """
    deadline = time.monotonic() + 20
    while True:
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size == size:
                return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"{path} never showed up as a {size}-byte file"
        time.sleep(0.3)


def test_plain_standin_has_no_page_cache(standin: Standin) -> None:
    before = standin.bytes_sent()
    for _ in range(2):
        assert (standin.mount / "model.safetensors").read_bytes() == ramp(0, SIZE, seed=5)
    after = standin.bytes_sent()
    if before is not None and after is not None:
        assert after - before >= 2 * SIZE, "each read of the plain mount must cross the network"


def test_hash_then_load_crosses_the_network_once(standin: Standin, mount_factory) -> None:
    m = mount_factory(standin.mount)
    path = m.mnt / "model.safetensors"
    before = standin.bytes_sent()
    with open(path, "rb") as f:  # the hash pass
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    assert digest == hashlib.sha256(ramp(0, SIZE, seed=5)).hexdigest()
    drop_kernel_cache(path)  # the kernel forgets; the daemon's cache must not
    fd = os.open(path, os.O_RDONLY)  # the load pass, at scattered offsets
    try:
        for off in range(SIZE - 4096, 0, -3 * MiB + 17):
            assert os.pread(fd, 4096, off) == ramp(off, min(4096, SIZE - off), seed=5)
    finally:
        os.close(fd)
    assert m.stats()["lower_bytes"] == SIZE, "the daemon reads each byte from below once"
    _assert_about_once_over_the_network(standin, before, SIZE)


def _assert_about_once_over_the_network(standin: Standin, before: int | None, size: int) -> None:
    """What the server sent is the file once, give or take s3fs's own doings.

    HTTP headers and s3fs's HEAD requests add a little on top of the data, and
    when reads race, s3fs's own read-ahead sometimes fetches a range twice: up to
    3.3% of this 24 MiB file in 1 of 35 runs, though the daemon asked for each
    byte once (lower_bytes, checked exactly).
    """
    after = standin.bytes_sent()
    if before is not None and after is not None:
        assert after - before <= 1.05 * size


def test_a_tool_that_asks_for_the_sha256_then_loads_moves_the_model_once(
        standin: Standin, mount_factory) -> None:
    m = mount_factory(standin.mount)
    path = m.mnt / "model.safetensors"
    before = standin.bytes_sent()
    digest = os.getxattr(path, "user.fusecache.sha256").decode()  # instead of its hash pass
    assert digest == hashlib.sha256(ramp(0, SIZE, seed=5)).hexdigest()
    assert path.read_bytes() == ramp(0, SIZE, seed=5)  # the load
    assert m.stats()["lower_bytes"] == SIZE
    _assert_about_once_over_the_network(standin, before, SIZE)


def test_warm_then_a_first_switch_moves_nothing_more(standin: Standin, mount_factory) -> None:
    m = mount_factory(standin.mount)
    path = m.mnt / "model.safetensors"
    before = standin.bytes_sent()
    res = fusecache_cmd("warm", str(path))
    assert res.returncode == 0, res.stderr
    assert m.settled()["lower_bytes"] == SIZE
    with open(path, "rb") as f:  # the web UI's first switch: hash, then load
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    assert digest == hashlib.sha256(ramp(0, SIZE, seed=5)).hexdigest()
    drop_kernel_cache(path)
    assert path.read_bytes() == ramp(0, SIZE, seed=5)
    assert m.settled()["lower_bytes"] == SIZE, "warm fetched it all, once"
    _assert_about_once_over_the_network(standin, before, SIZE)


def test_an_object_replaced_while_a_reader_holds_it_is_read_as_the_new_one(
        standin: Standin, mount_factory) -> None:
    """s3fs hands every open of a path still open somewhere the bytes it loaded for it,
    under the new stat: fusecache must not cache those as the new version's."""
    m = mount_factory(standin.mount)
    path = m.mnt / REPLACED
    _wait_for_object(standin.mount / REPLACED, REPLACED_SIZE)
    old = os.open(path, os.O_RDONLY)  # a model server's mapping of the old version
    try:
        assert os.pread(old, 4096, 0) == ramp(0, 4096, seed=21)
        time.sleep(1.1)  # a new mtime, to the second
        write_ramp(standin.bucket_dir / REPLACED, NEW_SIZE, seed=22)
        deadline = time.monotonic() + 60
        while True:  # until the lower mount shows the new object, to an open of ours
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size == NEW_SIZE:
                    got = b"".join(os.pread(fd, MiB, off) for off in range(0, NEW_SIZE, MiB))
                    break
            finally:
                os.close(fd)
            assert time.monotonic() < deadline, "the new object never showed"
            time.sleep(0.5)
        assert got == ramp(0, NEW_SIZE, seed=22), "the new version, not what the old fd loaded"
    finally:
        os.close(old)


# --- the S3 server stops answering mid-read ---------------------------------------

SOURCE_TIMEOUT = 3
CACHED, CACHED_SIZE, CACHED_SEED = "cached.bin", 8 * MiB + 99, 11
# Large enough that the reader's first 64 KiB (one fetch, plus read-ahead) leaves
# most of it unfetched when the server stops.
UNCACHED, UNCACHED_SIZE, UNCACHED_SEED = "uncached.bin", 64 * MiB + 4321, 12

# Runs in a child process: a call on a hung FUSE mount can sleep uninterruptibly,
# so the test waits on the child with a deadline and is never stuck itself.
# Each message is one JSON line; "seconds" times the call on the mount itself.
_PROBE = r"""
import hashlib, json, os, sys, time

def say(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

op, path = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
try:
    if op == "stat":
        say(size=os.stat(path).st_size, seconds=time.monotonic() - t0)
    elif op == "stats":
        say(stats=json.loads(os.getxattr(path, "user.fusecache.stats")),
            seconds=time.monotonic() - t0)
    elif op == "read":
        with open(path, "rb", buffering=0) as f:
            opened = time.monotonic() - t0
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        say(sha256=digest, open_seconds=opened, seconds=time.monotonic() - t0)
    elif op == "reader":  # reads 64 KiB, waits for a line on stdin, reads the rest
        with open(path, "rb", buffering=0) as f:
            head = f.read(64 * 1024)
            say(started=len(head), seconds=time.monotonic() - t0)
            sys.stdin.readline()
            t0 = time.monotonic()
            while f.read(1 << 20):
                pass
        say(finished=True, seconds=time.monotonic() - t0)
except OSError as e:
    say(errno=e.errno, error=str(e), seconds=time.monotonic() - t0)
"""


class _Probe:
    """One child process running _PROBE on a path of the mount."""

    def __init__(self, op: str, path: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE, op, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.what = f"{op} {path.name}"
        self._buf = b""

    def message(self, timeout: float) -> dict[str, Any]:
        """The child's next message; fails the test if none comes within *timeout*."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.what}: still blocked after {timeout:.0f} s"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"{self.what}: the child exited with {self.proc.wait()}"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()


@pytest.fixture
def two_objects(tmp_path: Path) -> Iterator[Standin]:
    """A stand-in of its own holding two objects, since its server will be paused."""
    data = tmp_path / "oss"
    (data / BUCKET).mkdir(parents=True)
    write_ramp(data / BUCKET / CACHED, CACHED_SIZE, seed=CACHED_SEED)
    write_ramp(data / BUCKET / UNCACHED, UNCACHED_SIZE, seed=UNCACHED_SEED)
    with running_standin(data_dir=data) as s:
        _wait_for_object(s.mount / CACHED, CACHED_SIZE)
        _wait_for_object(s.mount / UNCACHED, UNCACHED_SIZE)
        yield s


@pytest.fixture
def probes(two_objects: Standin, mount_factory) -> Iterator[Callable[[str, Path], _Probe]]:
    """Starts probes; on teardown, before the mount's, resumes the server and ends them all."""
    started: list[_Probe] = []

    def start(op: str, path: Path) -> _Probe:
        started.append(_Probe(op, path))
        return started[-1]

    try:
        yield start
    finally:
        two_objects.resume_server()  # a hung probe needs an answering store to end
        for probe in started:
            probe.proc.kill()
        for probe in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                probe.proc.wait(timeout=20)  # else the mount's teardown aborts its call


def _sha256(size: int, seed: int) -> str:
    return hashlib.sha256(ramp(0, size, seed=seed)).hexdigest()


def test_the_s3_server_is_stopped_mid_read(two_objects: Standin, mount_factory, probes) -> None:
    # --attr-timeout 1: by the time the cached file is checked, the kernel has
    # forgotten its attributes and asks the daemon, as it would after 60 s.
    m = mount_factory(two_objects.mount, "--source-timeout", str(SOURCE_TIMEOUT),
                      "--attr-timeout", "1")
    cached, uncached = m.mnt / CACHED, m.mnt / UNCACHED
    assert probes("read", cached).message(30)["sha256"] == _sha256(CACHED_SIZE, CACHED_SEED)
    m.settled()
    drop_kernel_cache(cached)  # served by the daemon from its cache, not the page cache
    reader = probes("reader", uncached)
    assert reader.message(30)["started"] == 64 * 1024
    deadline = 2 * SOURCE_TIMEOUT + 2  # the daemon's timeout, the kernel's retry's, slack
    with two_objects.server_paused():
        reader.tell()
        failed = reader.message(deadline + 5)
        assert "errno" in failed, f"the uncached reader got no error: {failed}"
        assert failed["seconds"] <= deadline, failed

        whole = probes("read", cached).message(10)
        assert whole.get("sha256") == _sha256(CACHED_SIZE, CACHED_SEED), whole
        assert whole["seconds"] < 1, whole
        st = probes("stat", cached).message(10)
        assert st.get("size") == CACHED_SIZE, st
        assert st["seconds"] < 1, st

        stats = probes("stats", m.mnt).message(10)["stats"]
        assert not stats["source_healthy"], stats
        assert stats["source_timeouts"] >= 1, stats
        assert "abandoned_threads" in stats, stats

    recovered_by = time.monotonic() + 30
    while True:
        left = recovered_by - time.monotonic()
        again = probes("read", uncached).message(max(left, 0.1))
        if again.get("sha256") == _sha256(UNCACHED_SIZE, UNCACHED_SEED):
            break
        assert "errno" in again, f"wrong bytes after the server resumed: {again}"
        assert time.monotonic() < recovered_by, f"no recovery 30 s after the resume: {again}"
        time.sleep(0.5)
    assert m.stats()["source_healthy"]
