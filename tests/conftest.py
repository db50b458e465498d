"""Fixtures: a core over a temporary directory (no kernel) and real mounts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from fusecache import blockio
from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache
from fusecache.cache.disk import DiskTier
from fusecache.config import CacheConfig, MiB
from fusecache.fs.core import FilesystemCore
from fusecache.source import LowerSource

HAVE_FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
needs_fuse = pytest.mark.skipif(
    not HAVE_FUSE, reason="/dev/fuse or fusermount3 is missing: real-mount tests cannot run"
)


def pool_class(implementation: str) -> type:
    """The C block pool or its pure-Python twin; the C one must exist where it is required."""
    if implementation == "python":
        return blockio.PyBlockPool
    try:
        from fusecache._native import BlockPool
    except ImportError:
        if os.environ.get("FUSECACHE_REQUIRE_NATIVE") == "1":
            raise
        pytest.skip("the C module fusecache._native is not built")
    return BlockPool


IMPLEMENTATIONS = ["native", "python"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    """Each test of the copy path runs against both block pools."""
    pool_class(request.param)  # skips a missing C module unless it is required
    return str(request.param)


@pytest.fixture
def pool(implementation: str) -> blockio.BlockPool:
    pool: blockio.BlockPool = pool_class(implementation)(CacheConfig().block_size)
    return pool


@asynccontextmanager
async def make_core(tmp_path: Path, mem: int, disk: DiskTier | None = None,
                    implementation: str = "native",
                    store: Callable[[int, int, Block], None] | None = None,
                    source: LowerSource | None = None,
                    ) -> AsyncIterator[FilesystemCore]:
    """A FilesystemCore over tmp_path/src (through *source*, a LowerSource of it, if given)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    source = source or LowerSource(src)
    config = replace(CacheConfig(), mem_bytes=mem)
    pool = pool_class(implementation)(config.block_size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        cache = BlockCache(config, source, nursery, disk, pool)
        core = FilesystemCore(source, cache, nursery, store=store)
        yield core
        await core.close_kept_fds()
        nursery.cancel_scope.cancel()


@pytest.fixture
async def core(tmp_path: Path, implementation: str) -> AsyncIterator[FilesystemCore]:
    """A FilesystemCore over tmp_path/src with a 64 MiB memory cache and no disk tier."""
    async with make_core(tmp_path, 64 * MiB, implementation=implementation) as c:
        yield c


def fusecache_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusecache", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def force_unmount(path: Path) -> None:
    """Last-resort cleanup for a test that failed with a mount up."""
    if os.path.ismount(path) or _stale(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True, check=False)


def abort_fuse_connections(under: Path) -> None:
    """Abort every FUSE connection mounted under *under*: its requests fail at once."""
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


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False


@dataclass
class Mount:
    src: Path
    mnt: Path

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.mnt, "user.fusecache.stats"))

    def settled(self, timeout: float = 20) -> dict[str, int]:
        """The stats once no fetch, whole-file fetch or hash is under way."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["fetches_in_flight"] == 0 and stats["background_jobs"] == 0:
                return stats
            assert time.monotonic() < deadline, f"still busy after {timeout} s: {stats}"
            time.sleep(0.05)

    def unmount(self) -> None:
        res = fusecache_cmd("umount", str(self.mnt))
        assert res.returncode == 0, res.stderr


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:
    """Mounts SRC at a fresh mountpoint through the real CLI; unmounts all of them at the end."""
    made: list[Path] = []

    def make(src: Path, *options: str, cache_dir: Path | None = None) -> Mount:
        mnt = tmp_path / f"mnt{len(made)}"
        mnt.mkdir(exist_ok=True)
        made.append(mnt)
        cache = cache_dir or tmp_path / f"cache{len(made)}"
        res = fusecache_cmd("mount", str(src), str(mnt), "--cache-dir", str(cache),
                            "--log-file", str(tmp_path / "fusecache.log"), *options)
        assert res.returncode == 0, res.stderr
        return Mount(src, mnt)

    try:
        yield make
    finally:
        for mnt in made:
            if os.path.ismount(mnt):
                fusecache_cmd("umount", str(mnt))
            force_unmount(mnt)


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator:
    """tests/faultfs.py serving tmp_path/backing at tmp_path/lower, switched by the test.

    Yields its FaultFSController; at the end, even after a failure, hung operations
    are released, the mount is gone and the process stopped.
    """
    from tests.faultfs import FaultFSController

    (tmp_path / "backing").mkdir()
    (tmp_path / "lower").mkdir()
    fs = FaultFSController(tmp_path / "backing", tmp_path / "lower",
                           tmp_path / "faultfs.json", tmp_path / "faultfs.log")
    try:
        yield fs
    finally:
        fs.close()
