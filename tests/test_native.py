"""The C block pool against its pure-Python twin: same bytes, same errors, no leaks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusecache.config import MiB
from tests.conftest import IMPLEMENTATIONS, pool_class
from tests.ramp import ramp

pytestmark = pytest.mark.unit

SLOT = 64 * 1024
FILE = 5 * SLOT + 123


@pytest.fixture(scope="module")
def ramp_fd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    path = tmp_path_factory.mktemp("native") / "ramp"
    path.write_bytes(ramp(0, FILE))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def pools() -> list[object]:
    return [pool_class(impl)(SLOT) for impl in IMPLEMENTATIONS]


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, FILE + SLOT),
       sizes=st.lists(st.integers(0, SLOT), min_size=0, max_size=8))
def test_read_matches_twin_and_file(ramp_fd: int, offset: int, sizes: list[int]) -> None:
    want = ramp(0, FILE)
    got = [[bytes(b) for b in p.read(ramp_fd, offset, sizes)] for p in pools()]
    assert got[0] == got[1]
    pos = offset
    for size, block in zip(sizes, got[0], strict=True):
        assert block == want[pos : pos + size]  # short at EOF, empty past it
        pos += size


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.binary(max_size=3 * SLOT // 2), max_size=5))
def test_join_matches_twin(parts: list[bytes]) -> None:
    views = [memoryview(p)[1:] for p in parts]  # slices, as replies are built
    got = [bytes(p.join(views)) for p in pools()]
    assert got[0] == got[1] == b"".join(views)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_errors_match(implementation: str, ramp_fd: int) -> None:
    pool = pool_class(implementation)(SLOT)
    with pytest.raises(OSError) as info:
        pool.read(987654, 0, [10])
    assert info.value.errno == errno.EBADF
    for offset, sizes in [(-1, [10]), (0, [-1])]:
        with pytest.raises(ValueError):
            pool.read(ramp_fd, offset, sizes)
    with pytest.raises(ValueError):
        pool_class(implementation)(1000)  # not a page multiple


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_offsets_past_4_gib(implementation: str, tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.seek(5 << 30)
        f.write(b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        [block] = pool_class(implementation)(SLOT).read(fd, (5 << 30) - 2, [SLOT])
        assert bytes(block) == b"\0\0tail"
    finally:
        os.close(fd)


def test_native_blocks_are_read_only_and_outlive_their_pool(ramp_fd: int) -> None:
    pool = pool_class("native")(SLOT)
    [block] = pool.read(ramp_fd, 0, [SLOT])
    view = memoryview(block)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    del pool
    assert bytes(view[:100]) == ramp(0, 100)


def test_native_pool_reuses_memory_and_gives_it_back(ramp_fd: int) -> None:
    pool = pool_class("native")(SLOT)
    blocks = pool.read(ramp_fd, 0, [SLOT] * 64)  # 4 MiB: two arenas
    stats = pool.statistics()
    assert stats["live_bytes"] == 64 * SLOT and stats["mapped_bytes"] >= 64 * SLOT
    del blocks
    assert pool.statistics()["live_bytes"] == 0
    reused = pool.statistics()["reused"]
    pool.read(ramp_fd, 0, [SLOT] * 8)
    assert pool.statistics()["reused"] >= reused + 8, "freed slots must be handed out again"
    small = pool_class("native")(SLOT, reserve_bytes=0)
    blocks = small.read(ramp_fd, 0, [SLOT] * 64)
    del blocks
    assert small.statistics()["mapped_bytes"] == 0, "no reserve: empty arenas are unmapped"


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_leak_over_many_calls(implementation: str, ramp_fd: int) -> None:
    pool = pool_class(implementation)(SLOT)

    def churn(n: int) -> None:
        for i in range(n):
            blocks = pool.read(ramp_fd, (i * 4096) % FILE, [SLOT, SLOT, 100])
            reply = pool.join([memoryview(b)[7:] for b in blocks])
            assert len(reply) == sum(max(0, len(b) - 7) for b in blocks)
            with pytest.raises(OSError):
                pool.read(-1, 0, [SLOT])

    churn(2000)  # warm up the allocator and the pool's reserve
    before = _rss()
    churn(20000)  # 2.6 GB of blocks through the pool
    assert _rss() - before < 8 * MiB


def test_version_names_the_implementation() -> None:
    out = subprocess.run([sys.executable, "-m", "fusecache", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert "block copy: native C" in out or "C module not built" in out
    env = {**os.environ, "FUSECACHE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-m", "fusecache", "--version"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "block copy: pure Python" in out


# Runs fusecache's CLI with the C module made unimportable.
_WITHOUT_NATIVE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "fusecache._native":
            raise ImportError("hidden by the test")
sys.meta_path.insert(0, Hide())
from fusecache.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_required_native_missing_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "FUSECACHE_REQUIRE_NATIVE": "1"}
    res = subprocess.run([sys.executable, "-c", _WITHOUT_NATIVE, "mount", str(tmp_path / "src"),
                          str(tmp_path / "mnt")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "FUSECACHE_REQUIRE_NATIVE=1" in res.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    env.pop("FUSECACHE_REQUIRE_NATIVE")
    res = subprocess.run([sys.executable, "-c", _WITHOUT_NATIVE, "--version"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    assert "C module not built" in res.stdout
