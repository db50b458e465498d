"""fusecache warm: files fetched whole through the daemon, over real mounts."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from fusecache.config import MiB
from fusecache.errors import FsError
from fusecache.fs.core import ROOT_INODE, FilesystemCore
from fusecache.fs.warming import WARM_XATTR
from tests.conftest import fusecache_cmd, needs_fuse
from tests.faultfs import FaultFSController
from tests.ramp import ramp, write_ramp
from tests.test_mount import drop_kernel_cache

SIZES = {"models/a.safetensors": 9 * MiB + 777, "models/sub/b.bin": 3 * MiB + 5,
         "models/config.json": 1234}


def _tree(src: Path) -> int:
    for seed, (name, size) in enumerate(SIZES.items()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        write_ramp(src / name, size, seed=seed)
    os.symlink("a.safetensors", src / "models" / "link")  # the same file: warmed once
    return sum(SIZES.values())


@pytest.mark.unit
def test_warm_and_stats_refuse_a_path_not_under_a_fusecache_mount(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    for args in (["warm", str(tmp_path / "f")], ["warm", str(tmp_path / "missing")],
                 ["stats", str(tmp_path)], ["warm", str(tmp_path), "--parallel", "0"]):
        res = fusecache_cmd(*args)
        assert res.returncode == 2, (args, res)
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert res.stdout == ""


@needs_fuse
@pytest.mark.mount
def test_warm_then_read_moves_nothing_more_from_below(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    total = _tree(src)
    m = mount_factory(src)
    res = fusecache_cmd("warm", str(m.mnt / "models"))
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    # Not a terminal: plain lines, one per file, and a last one with the total.
    for name in SIZES:
        assert any(line.startswith(f"warm: cached {m.mnt / name} (") for line in lines), lines
    assert lines[-1].startswith("warm: 3 of 3 files cached"), lines
    assert not any("\r" in line for line in lines)
    stats = m.settled()
    assert stats["lower_bytes"] == total, "each byte from below once, the link's file once"
    # A web UI's first switch: hash the file, then load it; the kernel forgets between.
    for seed, (name, size) in enumerate(SIZES.items()):
        path = m.mnt / name
        with open(path, "rb") as f:
            assert hashlib.file_digest(f, "sha256").digest() == hashlib.sha256(
                ramp(0, size, seed=seed)).digest()
        drop_kernel_cache(path)
        assert path.read_bytes() == ramp(0, size, seed=seed)
    assert m.settled()["lower_bytes"] == total
    # Warming what is cached fetches nothing.
    assert fusecache_cmd("warm", str(m.mnt)).returncode == 0
    assert m.settled()["lower_bytes"] == total


@needs_fuse
@pytest.mark.mount
def test_warm_progress_over_the_xattr(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_ramp(src / "f.bin", 5 * MiB + 1, seed=3)
    m = mount_factory(src)
    answers = []
    deadline = time.monotonic() + 20
    while not answers or answers[-1]["state"] == "warming":
        answers.append(json.loads(os.getxattr(m.mnt / "f.bin", WARM_XATTR)))
        assert time.monotonic() < deadline, answers
        time.sleep(0.02)
    assert answers[-1] == {"state": "cached", "size": 5 * MiB + 1, "cached": 5 * MiB + 1,
                           "error": None, "timeout": 30.0}
    assert "user.fusecache.warm" not in os.listxattr(m.mnt / "f.bin"), "getfattr -d must not warm"
    with pytest.raises(OSError):
        os.getxattr(m.mnt, WARM_XATTR)  # a directory is warmed by the CLI, file by file


@needs_fuse
@pytest.mark.mount
def test_a_set_bigger_than_the_caches_is_said_up_front(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_ramp(src / f"{i}.bin", 5 * MiB, seed=i)
    # The LRU keeps 7/8 of the memory cache (14 MiB), the rest is for read-ahead.
    m = mount_factory(src, "--mem-cache", "16M", "--disk-cache", "0")
    res = fusecache_cmd("warm", str(m.mnt))
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0] == (f"fusecache: warm: the 3 files under {m.mnt} take 15.0 MiB, more "
                        "than its caches keep (14.0 MiB: memory 14.0 MiB + disk 0 B); warming "
                        "2 of them (10.0 MiB), not the other 1"), lines
    assert lines[-1] == (f"fusecache: not cached: {m.mnt / '2.bin'}: does not fit in the "
                         "caches with the files before it")
    assert m.settled()["lower_bytes"] == 10 * MiB, "the file left out was not fetched"


@needs_fuse
@pytest.mark.mount
def test_a_file_that_fails_is_named(faultfs: FaultFSController, mount_factory) -> None:
    write_ramp(faultfs.backing / "good.bin", 2 * MiB, seed=1)
    write_ramp(faultfs.backing / "bad.bin", 3 * MiB, seed=2)
    m = mount_factory(faultfs.mount, "--source-timeout", "2")
    assert fusecache_cmd("warm", str(m.mnt / "good.bin")).returncode == 0
    faultfs.set(eio="read")  # every read from below fails now: bad.bin cannot be warmed
    res = fusecache_cmd("warm", str(m.mnt))
    assert res.returncode == 1, res.stderr
    assert f"warm: cached {m.mnt / 'good.bin'}" in res.stderr
    failed = [line for line in res.stderr.splitlines() if line.startswith("fusecache: ")]
    assert len(failed) == 1 and failed[0].startswith(f"fusecache: not cached: {m.mnt}/bad.bin: ")
    assert "Input/output error" in failed[0], failed


@needs_fuse
@pytest.mark.mount
def test_warm_of_a_hung_lower_mount_ends(faultfs: FaultFSController, mount_factory) -> None:
    write_ramp(faultfs.backing / "f.bin", 3 * MiB, seed=1)
    m = mount_factory(faultfs.mount, "--source-timeout", "1")
    faultfs.set(hang="read")
    try:
        proc = subprocess.run([sys.executable, "-m", "fusecache", "warm", str(m.mnt)],
                              capture_output=True, text=True, timeout=30, check=False)
    finally:
        faultfs.clear()
    assert proc.returncode == 1
    assert f"fusecache: not cached: {m.mnt / 'f.bin'}: " in proc.stderr
    assert "no answer from the lower mount in 1 s" in proc.stderr


@pytest.mark.core
async def test_the_warm_xattr_in_the_core(core: FilesystemCore, tmp_path: Path) -> None:
    write_ramp(tmp_path / "src" / "f.bin", 3 * MiB + 7, seed=9)
    ino = (await core.lookup(ROOT_INODE, b"f.bin")).ino
    answers = []
    with trio.fail_after(10):
        while not answers or answers[-1]["state"] == "warming":
            answers.append(json.loads(await core.getxattr(ino, WARM_XATTR)))
            await trio.sleep(0.01)
    assert answers[-1]["state"] == "cached" and answers[-1]["cached"] == 3 * MiB + 7
    assert all(a["cached"] <= b["cached"] for a, b in zip(answers, answers[1:], strict=False))
    assert core.statistics()["lower_bytes"] == 3 * MiB + 7
    fh, _ = await core.open(ino, os.O_RDONLY)
    assert bytes(await core.read(fh, 0, 3 * MiB + 7)) == ramp(0, 3 * MiB + 7, seed=9)
    core.release(fh)
    stats = core.statistics()
    assert stats["lower_bytes"] == 3 * MiB + 7, "read from memory, not from below again"
    assert stats["served_bytes"] == stats["served_memory"] == 3 * MiB + 7
    assert stats["readahead_bytes"] == stats["readahead_used_bytes"] == 3 * MiB + 7
    with pytest.raises(FsError):
        await core.getxattr(ROOT_INODE, WARM_XATTR)  # a directory


@needs_fuse
@pytest.mark.mount
def test_warm_draws_a_bar_on_a_terminal(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_ramp(src / "f.bin", 4 * MiB, seed=1)
    m = mount_factory(src)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "fusecache", "warm", str(m.mnt)],
                              stderr=follower, stdout=subprocess.PIPE, timeout=60, check=False)
        os.close(follower)
        follower = -1
        out = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    text = out.decode()
    assert "\r" in text and "warm [##############################] 4.0 MiB of 4.0 MiB" in text
    assert "warm: 1 of 1 files cached" in text
