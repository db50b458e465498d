"""fusecache reading a real S3 server directly (s3://), through its CLI and a real mount.

The server is the stand-in's `rclone serve s3` on loopback, over a local directory
whose subdirectories are buckets (no s3fs here): objects are put and replaced by
writing files under it.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusecache.bench.standin import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server, running_s3_server
from fusecache.config import GiB, MiB
from tests.conftest import Mount, fusecache_cmd, needs_fuse
from tests.ramp import ramp, write_ramp, write_sparse_ramp
from tests.test_cli import assert_usage_error
from tests.test_mount import drop_kernel_cache
from tests.test_standin import _Probe

pytestmark = [pytest.mark.standin, needs_fuse]

SIZE = 24 * MiB + 4321
BIG = 5 * GiB + 12345  # past 4 GiB: offsets that need 64 bits; sparse on the server's disk
BIG_MARKS = [0, 4 * GiB - 4096, 4 * GiB, 4 * GiB + 3 * MiB + 17, BIG - 4096]
TREE = {  # key: (size, seed)
    "model.safetensors": (SIZE, 5),
    "empty.bin": (0, 0),
    "sd/checkpoints/v1 final (2).ckpt": (3 * MiB + 7, 6),
    "sd/lora/stilübung 画.safetensors": (100_000, 7),
    "sd/lora/deeper/nested/leaf.bin": (1, 8),
}


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's keys, where the client looks for them: the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def _put_tree(bucket: Path) -> None:
    for key, (size, seed) in TREE.items():
        (bucket / key).parent.mkdir(parents=True, exist_ok=True)
        write_ramp(bucket / key, size, seed=seed)
    write_sparse_ramp(bucket / "big.bin", BIG, BIG_MARKS, seed=9)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("s3")
    _put_tree(root / BUCKET)
    with running_s3_server(root) as s:
        yield s


@pytest.fixture(params=[""])
def own_server(tmp_path: Path, request: pytest.FixtureRequest
               ) -> Iterator[tuple[S3Server, Path]]:
    """A server of the test's own (it is paused, or its objects replaced), and its bucket.

    Its ETags: none by default (as the stand-in runs), MD5 when the test asks.
    """
    root = tmp_path / "s3"
    (root / BUCKET).mkdir(parents=True)
    with running_s3_server(root, etag_hash=request.param) as s:
        yield s, root / BUCKET


def _mount(mount_factory: Callable[..., Mount], server: S3Server, url: str = f"s3://{BUCKET}",
           *options: str) -> Mount:
    return mount_factory(url, "--endpoint", server.url, *options)  # type: ignore[arg-type]


def test_the_tree_reads_as_the_bucket_holds_it(server: S3Server, mount_factory) -> None:
    m = _mount(mount_factory, server)
    found = {str(p.relative_to(m.mnt)) for p in m.mnt.rglob("*") if p.is_file()}
    assert found == {*TREE, "big.bin"}
    for key, (size, seed) in TREE.items():
        path = m.mnt / key
        st = path.stat()
        assert st.st_size == size and st.st_mode & 0o222 == 0, key
        assert path.read_bytes() == ramp(0, size, seed=seed), key
    assert sorted(os.listdir(m.mnt / "sd")) == ["checkpoints", "lora"]
    assert (m.mnt / "sd" / "lora" / "deeper").is_dir()
    with pytest.raises(FileNotFoundError):
        (m.mnt / "sd" / "nothing").stat()
    with pytest.raises(OSError):
        (m.mnt / "new").write_bytes(b"x")  # read-only


def test_a_prefix_is_the_root(server: S3Server, mount_factory) -> None:
    m = _mount(mount_factory, server, f"s3://{BUCKET}/sd/lora")
    assert sorted(os.listdir(m.mnt)) == ["deeper", "stilübung 画.safetensors"]
    assert (m.mnt / "deeper/nested/leaf.bin").read_bytes() == ramp(0, 1, seed=8)


def test_ranged_reads_match_byte_for_byte(server: S3Server, mount_factory) -> None:
    m = _mount(mount_factory, server)
    path = m.mnt / "model.safetensors"
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in [(0, 8), (SIZE - 1, 1), (SIZE - 4321, 10_000), (MiB - 3, 7),
                       (7 * MiB + 11, 3 * MiB), (SIZE, 10), (12_345_678, 1)]:
            assert os.pread(fd, n, off) == ramp(off, max(0, min(n, SIZE - off)), seed=5), off
    finally:
        os.close(fd)
    digest = os.getxattr(path, "user.fusecache.sha256").decode()
    assert digest == hashlib.sha256(ramp(0, SIZE, seed=5)).hexdigest()


def test_an_object_over_4_gib(server: S3Server, mount_factory) -> None:
    m = _mount(mount_factory, server)
    path = m.mnt / "big.bin"
    assert path.stat().st_size == BIG
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in BIG_MARKS:
            assert os.pread(fd, 4096, off) == ramp(off, 4096, seed=9), off
        assert os.pread(fd, 100, 4 * GiB - 50) == ramp(4 * GiB - 50, 100, seed=9)  # across
        assert os.pread(fd, 100_000, BIG - 10) == ramp(BIG - 10, 10, seed=9)  # cut at the end
        assert os.pread(fd, 4096, 4 * GiB + 64 * MiB) == bytes(4096)  # a hole between marks
    finally:
        os.close(fd)


def test_hash_then_load_reads_each_byte_once(server: S3Server, mount_factory) -> None:
    m = _mount(mount_factory, server)
    path = m.mnt / "model.safetensors"
    with open(path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").digest() == hashlib.sha256(
            ramp(0, SIZE, seed=5)).digest()
    drop_kernel_cache(path)
    assert path.read_bytes() == ramp(0, SIZE, seed=5)
    assert m.settled()["lower_bytes"] == SIZE


def test_random_small_reads_move_their_pages_not_whole_blocks(server: S3Server,
                                                              mount_factory) -> None:
    """A random reader's 4 KiB preads move at most twice what they read (issue 19's target).

    Its first read may be a sequential reader's start and fetches its block whole;
    from the second in a row out of order on, each read moves its pages only.
    """
    m = _mount(mount_factory, server, f"s3://{BUCKET}", "--disk-cache", "0")
    rng = random.Random(4)
    offsets = [rng.randrange(0, BIG - 4096) // 4096 * 4096 for _ in range(300)]
    fd = os.open(m.mnt / "big.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # the kernel reads just the pages
        for off in offsets:
            assert os.pread(fd, 4096, off) == _big_bytes(off, 4096), off
    finally:
        os.close(fd)
    read = 4096 * len(offsets)
    assert m.settled()["lower_bytes"] <= 2 * read


def _big_bytes(offset: int, size: int) -> bytes:
    """Bytes [offset, offset+size) of big.bin: zeros, but 4 KiB of ramp at each mark."""
    out = bytearray(size)
    for mark in BIG_MARKS:
        lo, hi = max(offset, mark), min(offset + size, mark + 4096)
        if lo < hi:
            out[lo - offset:hi - offset] = ramp(mark, 4096, seed=9)[lo - mark:hi - mark]
    return bytes(out)


def _read_until(path: Path, want: bytes, what: str) -> None:
    """Read *path* until it holds *want*: the TTL, the kernel's attributes, the server's 1 s."""
    deadline = time.monotonic() + 15
    while True:
        try:
            if path.read_bytes() == want:
                return
        except OSError:  # EIO: the object changed under a read; the next open sees it
            pass
        assert time.monotonic() < deadline, f"{what} was never read as new content"
        time.sleep(0.3)


def test_a_replaced_object_is_new_content_after_the_ttl(own_server, mount_factory) -> None:
    server, bucket = own_server
    write_ramp(bucket / "m.bin", 3 * MiB, seed=1)
    m = _mount(mount_factory, server, f"s3://{BUCKET}", "--list-ttl", "1",
               "--attr-timeout", "1")
    path = m.mnt / "m.bin"
    assert path.read_bytes() == ramp(0, 3 * MiB, seed=1)
    tmp = bucket / ".m.bin.new"
    write_ramp(tmp, 2 * MiB + 5, seed=2)
    os.replace(tmp, bucket / "m.bin")  # a new object under the same key
    _read_until(path, ramp(0, 2 * MiB + 5, seed=2), "a replaced object")


@pytest.mark.parametrize("own_server", ["MD5"], indirect=True)
def test_an_object_replaced_with_only_a_new_etag_is_new_content(own_server,
                                                                 mount_factory) -> None:
    server, bucket = own_server
    write_ramp(bucket / "m.bin", 3 * MiB, seed=1)
    when = (bucket / "m.bin").stat().st_mtime_ns
    m = _mount(mount_factory, server, f"s3://{BUCKET}", "--list-ttl", "1",
               "--attr-timeout", "1")
    path = m.mnt / "m.bin"
    assert path.read_bytes() == ramp(0, 3 * MiB, seed=1)
    tmp = bucket / ".m.bin.new"
    write_ramp(tmp, 3 * MiB, seed=3)  # the same size
    os.utime(tmp, ns=(when, when))  # and the same Last-Modified: only the ETag tells
    os.replace(tmp, bucket / "m.bin")
    _read_until(path, ramp(0, 3 * MiB, seed=3), "an object with a new ETag")


SOURCE_TIMEOUT = 3


def test_the_server_stopped_mid_read_is_eio_then_recovers(own_server, mount_factory) -> None:
    server, bucket = own_server
    size = 64 * MiB + 4321
    write_ramp(bucket / "u.bin", size, seed=12)
    m = _mount(mount_factory, server, f"s3://{BUCKET}", "--source-timeout",
               str(SOURCE_TIMEOUT))
    path = m.mnt / "u.bin"
    probes: list[_Probe] = []
    try:
        reader = _Probe("reader", path)
        probes.append(reader)
        assert reader.message(30)["started"] == 64 * 1024
        deadline = 2 * SOURCE_TIMEOUT + 2  # the daemon's timeout, the kernel's retry's, slack
        server.pause()
        try:
            reader.tell()
            failed = reader.message(deadline + 5)
            assert "errno" in failed, f"the reader got no error: {failed}"
            assert failed["seconds"] <= deadline, failed
            stats = _Probe("stats", m.mnt)
            probes.append(stats)
            got = stats.message(10)["stats"]
            assert not got["source_healthy"] and got["source_timeouts"] >= 1, got
        finally:
            server.resume()
        want = hashlib.sha256(ramp(0, size, seed=12)).hexdigest()
        recovered_by = time.monotonic() + 30
        while True:
            again = _Probe("read", path)
            probes.append(again)
            answer = again.message(max(recovered_by - time.monotonic(), 0.1))
            if answer.get("sha256") == want:
                break
            assert "errno" in answer, f"wrong bytes after the server resumed: {answer}"
            assert time.monotonic() < recovered_by, f"no recovery 30 s after: {answer}"
            time.sleep(0.5)
        assert m.stats()["source_healthy"]
    finally:
        server.resume()
        for probe in probes:
            probe.proc.kill()
            probe.proc.wait(timeout=20)


def test_bad_credentials_are_refused_at_mount_time(server: S3Server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    res = fusecache_cmd("mount", f"s3://{BUCKET}", str(mnt), "--endpoint", server.url,
                        "--cache-dir", str(tmp_path / "cache"))
    assert_usage_error(res, "refused our credentials")
    assert "not-the-secret" not in res.stderr
    assert not os.path.ismount(mnt) and not (tmp_path / "cache").exists()


def test_a_missing_bucket_or_credentials_are_refused(server: S3Server, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [str(mnt), "--endpoint", server.url, "--cache-dir", str(tmp_path / "cache")]
    assert_usage_error(fusecache_cmd("mount", "s3://no-such-bucket", *args), "NoSuchBucket")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert_usage_error(fusecache_cmd("mount", f"s3://{BUCKET}", *args),
                       "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    assert not os.path.ismount(mnt)


def test_an_endpoint_that_does_not_answer_fails_the_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = fusecache_cmd("mount", f"s3://{BUCKET}", str(mnt), "--endpoint",
                        "http://127.0.0.1:1", "--cache-dir", str(tmp_path / "cache"))
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Connection refused" in res.stderr
    assert not os.path.ismount(mnt)

