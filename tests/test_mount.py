"""Real mounts through the CLI, over a temporary directory."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fusecache.config import MiB
from fusecache.daemon import pidfile_for
from tests.conftest import needs_fuse
from tests.ramp import ramp, write_ramp

pytestmark = [needs_fuse, pytest.mark.mount]


def drop_kernel_cache(path: Path) -> None:
    """Drop the kernel's pages of one file (posix_fadvise works on FUSE files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "models" / "sub").mkdir(parents=True)
    write_ramp(src / "models" / "big.bin", 9 * MiB + 777, seed=1)
    write_ramp(src / "models" / "sub" / "small.bin", 5000, seed=2)
    (src / "empty").write_bytes(b"")
    os.symlink("models/big.bin", src / "link")
    return src


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_file_reads_identically(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    for root, _, files in os.walk(tree):
        for name in files:
            rel = Path(root, name).relative_to(tree)
            assert sha(m.mnt / rel) == sha(tree / rel), rel


def test_random_offsets_and_sizes(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    size = (tree / "models/big.bin").stat().st_size
    rng = random.Random(7)
    with open(m.mnt / "models/big.bin", "rb", buffering=0) as f:
        for _ in range(200):
            off = rng.randrange(0, size)
            n = rng.choice([1, 4095, 65536, 1 << 20, 3 << 20])
            assert os.pread(f.fileno(), n, off) == ramp(off, min(n, size - off), seed=1)
            if rng.random() < 0.1:
                drop_kernel_cache(m.mnt / "models/big.bin")


def test_numpy_memmap(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    n = (tree / "models/big.bin").stat().st_size // 8
    arr = np.memmap(m.mnt / "models/big.bin", dtype="<u8", mode="r", shape=(n,))
    idx = np.random.default_rng(3).integers(0, n, 1000)
    assert np.array_equal(arr[idx], idx.astype("<u8") + np.uint64(1 << 40))
    assert int(arr[-1]) == n - 1 + (1 << 40)
    del arr


def _sha_in_child(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_concurrent_readers_in_processes(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    want = sha(tree / "models/big.bin")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        got = pool.map(_sha_in_child, [str(m.mnt / "models/big.bin")] * 8)
    assert got == [want] * 8
    assert m.stats()["lower_bytes"] == (tree / "models/big.bin").stat().st_size


def test_listing_stat_and_symlinks(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    assert sorted(os.listdir(m.mnt)) == ["empty", "link", "models"]
    assert sorted(os.listdir(m.mnt / "models")) == ["big.bin", "sub"]
    st, lst = os.stat(m.mnt / "models/big.bin"), os.stat(tree / "models/big.bin")
    assert (st.st_size, st.st_mtime_ns) == (lst.st_size, lst.st_mtime_ns)
    assert st.st_ino == os.stat(m.mnt / "models/big.bin").st_ino
    assert stat.S_ISLNK(os.lstat(m.mnt / "link").st_mode)
    assert os.readlink(m.mnt / "link") == "models/big.bin"
    assert sha(m.mnt / "link") == sha(tree / "models/big.bin")
    assert (m.mnt / "empty").read_bytes() == b""


def test_xattrs_pass_through(tree: Path, mount_factory) -> None:
    os.setxattr(tree / "models/big.bin", "user.etag", b"abc123")
    m = mount_factory(tree)
    assert os.getxattr(m.mnt / "models/big.bin", "user.etag") == b"abc123"
    assert "user.etag" in os.listxattr(m.mnt / "models/big.bin")


def test_writes_are_erofs(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    for action in (
        lambda: open(m.mnt / "models/big.bin", "r+b"),
        lambda: open(m.mnt / "new", "wb"),
        lambda: os.mkdir(m.mnt / "d"),
        lambda: os.unlink(m.mnt / "empty"),
        lambda: os.setxattr(m.mnt / "empty", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == 30, info.value  # EROFS


def test_second_read_never_reaches_the_daemon(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    data = (m.mnt / "models/big.bin").read_bytes()
    before = m.stats()["read_requests"]
    assert (m.mnt / "models/big.bin").read_bytes() == data
    assert m.stats()["read_requests"] == before, "keep_cache must serve the second open"


def test_changed_source_file_gives_new_bytes(tree: Path, mount_factory) -> None:
    m = mount_factory(tree, "--attr-timeout", "0")
    f = tree / "models/sub/small.bin"
    assert (m.mnt / "models/sub/small.bin").read_bytes() == ramp(0, 5000, seed=2)
    write_ramp(f, 7000, seed=3)
    os.utime(f, ns=(1, 10**18))
    assert (m.mnt / "models/sub/small.bin").read_bytes() == ramp(0, 7000, seed=3)


def test_umount_leaves_no_mount_and_no_daemon(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    pid = int(pidfile_for(m.mnt).read_text())
    m.unmount()
    assert not os.path.ismount(m.mnt)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_sigterm_unmounts_cleanly(tree: Path, mount_factory) -> None:
    m = mount_factory(tree)
    pid = int(pidfile_for(m.mnt).read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.ismount(m.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(m.mnt)


def test_foreground_mode(tree: Path, tmp_path: Path) -> None:
    import sys

    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fusecache", "mount", "-f", str(tree),
                             str(mnt), "--cache-dir", str(tmp_path / "cache")],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "models/sub/small.bin").read_bytes() == ramp(0, 5000, seed=2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)


def test_file_over_4gib(tmp_path: Path, mount_factory) -> None:
    from tests.ramp import write_sparse_ramp

    src = tmp_path / "big"
    src.mkdir()
    size = (4 << 30) + 12 * MiB
    marks = [(4 << 30) - 4096, 4 << 30, size - 4096]
    write_sparse_ramp(src / "huge.bin", size, marks)
    m = mount_factory(src)
    assert os.stat(m.mnt / "huge.bin").st_size == size
    with open(m.mnt / "huge.bin", "rb") as f:
        for off in marks:
            f.seek(off)
            assert f.read(4096) == ramp(off, 4096)
