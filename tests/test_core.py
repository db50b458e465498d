"""The filesystem core called directly, without a kernel."""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path

import pytest
import trio

from fusecache.config import MiB
from fusecache.errors import FsError
from fusecache.fs.core import ROOT_INODE, FilesystemCore
from tests.ramp import ramp, write_ramp, write_sparse_ramp

pytestmark = pytest.mark.core


def src_of(core: FilesystemCore) -> str:
    return os.fsdecode(core.source.root)


async def open_file(core: FilesystemCore, name: bytes, flags: int = os.O_RDONLY) -> int:
    attr = await core.lookup(ROOT_INODE, name)
    fh, _ = await core.open(attr.ino, flags)
    return fh


async def read_all(core: FilesystemCore, fh: int, size: int, chunk: int = 128 * 1024) -> bytes:
    out = bytearray()
    for off in range(0, size, chunk):
        out += await core.read(fh, off, chunk)
    return bytes(out)


async def test_lookup_getattr_and_stable_inodes(core: FilesystemCore) -> None:
    write_ramp(core.source.root.decode() + "/f", 1000)
    a = await core.lookup(ROOT_INODE, b"f")
    b = await core.lookup(ROOT_INODE, b"f")
    assert a.ino == b.ino != ROOT_INODE
    assert a.size == 1000 and stat.S_ISREG(a.mode)
    assert a.mode & 0o222 == 0, "the core must advertise a read-only file"
    assert (await core.getattr(a.ino)).size == 1000


async def test_missing_name_is_enoent(core: FilesystemCore) -> None:
    with pytest.raises(FileNotFoundError):
        await core.lookup(ROOT_INODE, b"nope")


async def test_nested_dirs_symlinks_and_odd_names(core: FilesystemCore) -> None:
    src = core.source.root
    odd = b"caf\xe9 \n\xff name"  # not UTF-8, with a newline
    os.makedirs(src + b"/a/b")
    write_ramp(os.fsdecode(src + b"/a/b/" + odd), 10)
    os.symlink(b"b/" + odd, src + b"/a/link")
    a = await core.lookup(ROOT_INODE, b"a")
    fh = await core.opendir(a.ino)
    names = [n for n, _ in core.readdir(fh, 0)]
    assert names == [b"b", b"link"]
    assert [n for n, _ in core.readdir(fh, 1)] == [b"link"]
    core.releasedir(fh)
    link = await core.lookup(a.ino, b"link")
    assert stat.S_ISLNK(link.mode)
    assert await core.readlink(link.ino) == b"b/" + odd
    b = await core.lookup(a.ino, b"b")
    f = await core.lookup(b.ino, odd)
    fh = (await core.open(f.ino, os.O_RDONLY))[0]
    assert bytes(await core.read(fh, 0, 100)) == ramp(0, 10)


async def test_reads_at_random_offsets_are_exact(core: FilesystemCore) -> None:
    size = 5 * MiB + 12345
    write_ramp(src_of(core) + "/f", size)
    fh = await open_file(core, b"f")
    rng = random.Random(1)
    for _ in range(300):
        off = rng.randrange(0, size + 10)
        n = rng.choice([1, 7, 4096, 131072, 1 << 20, 3 << 20])
        want = ramp(off, max(0, min(n, size - off)))
        assert bytes(await core.read(fh, off, n)) == want, (off, n)
    core.release(fh)


async def test_write_opens_are_erofs(core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/f", 10)
    a = await core.lookup(ROOT_INODE, b"f")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(FsError) as info:
            await core.open(a.ino, flags)
        assert info.value.errno == errno.EROFS


async def test_concurrent_readers_fetch_each_block_once(core: FilesystemCore) -> None:
    size = 16 * MiB
    write_ramp(src_of(core) + "/f", size)
    want = ramp(0, size)
    results: list[bytes] = []

    async def reader() -> None:
        fh = await open_file(core, b"f")
        results.append(await read_all(core, fh, size))
        core.release(fh)

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(reader)
    assert all(r == want for r in results) and len(results) == 8
    stats = core.cache.statistics()
    assert stats.lower_bytes == size, "each byte must cross from the lower mount once"


async def test_changed_file_gives_new_bytes(core: FilesystemCore) -> None:
    path = src_of(core) + "/f"
    write_ramp(path, 3 * MiB, seed=1)
    fh = await open_file(core, b"f")
    assert bytes(await core.read(fh, 0, 4096)) == ramp(0, 4096, seed=1)
    core.release(fh)
    write_ramp(path, 2 * MiB, seed=2)
    os.utime(path, ns=(1, 10**18))
    attr = await core.lookup(ROOT_INODE, b"f")
    fh, keep_cache = await core.open(attr.ino, os.O_RDONLY)
    assert not keep_cache, "the kernel must drop the pages of the old version"
    assert bytes(await core.read(fh, 0, 3 * MiB)) == ramp(0, 2 * MiB, seed=2)


async def test_second_open_of_unchanged_file_keeps_cache(core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/f", 100)
    attr = await core.lookup(ROOT_INODE, b"f")
    fh1, keep1 = await core.open(attr.ino, os.O_RDONLY)
    fh2, keep2 = await core.open(attr.ino, os.O_RDONLY)
    assert keep1 and keep2


async def test_lower_read_error_is_eio_not_data(core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/f", 2 * MiB)
    fh = await open_file(core, b"f")
    # Break the lower fd under the handle: the read must fail, not invent bytes.
    os.close(core._handles[fh].file.fd)
    with pytest.raises(FsError) as info:
        await core.read(fh, 0, 4096)
    assert info.value.errno == errno.EIO
    assert core.cache.statistics().lower_errors == 1


async def test_stats_xattr_on_root(core: FilesystemCore) -> None:
    import json

    stats = json.loads(await core.getxattr(ROOT_INODE, b"user.fusecache.stats"))
    assert stats["read_requests"] == 0 and "lower_bytes" in stats


async def test_sequential_reader_gets_read_ahead(core: FilesystemCore) -> None:
    size = 24 * MiB
    write_ramp(src_of(core) + "/f", size)
    fh = await open_file(core, b"f")
    for off in range(0, 4 * MiB, MiB):
        assert bytes(await core.read(fh, off, MiB)) == ramp(off, MiB)
    await core.wait_idle()
    # Read-ahead fetched beyond what was read, and every block only once.
    stats = core.cache.statistics()
    assert stats.lower_bytes > 4 * MiB
    assert bytes(await read_all(core, fh, size)) == ramp(0, size)
    assert core.cache.statistics().lower_bytes == size


async def test_random_small_reads_move_their_pages_not_whole_blocks(
        core: FilesystemCore) -> None:
    size = 32 * MiB + 5
    write_ramp(src_of(core) + "/f", size)
    fh = await open_file(core, b"f")
    offsets = random.Random(7).sample(range(MiB, size - 4096, 4096), 40)  # past the head
    for off in offsets:
        assert bytes(await core.read(fh, off, 4096)) == ramp(off, 4096)
    await core.wait_idle()
    # The first read may be where a sequential reader starts: its block; after
    # that a random reader's reads move their pages only, and nothing is cached.
    stats = core.cache.statistics()
    assert stats.lower_bytes <= MiB + 39 * 4096
    assert stats.memory_used <= MiB


async def test_file_over_4gib(core: FilesystemCore) -> None:
    size = 5 * 1024 * MiB + 3
    marks = [0, (4 << 30) - 2048, 4 << 30, size - 4096 - 3]
    write_sparse_ramp(src_of(core) + "/huge", size, marks)
    fh = await open_file(core, b"huge")
    assert (await core.lookup(ROOT_INODE, b"huge")).size == size
    for off in marks:
        assert bytes(await core.read(fh, off, 4096)) == ramp(off, 4096)
    assert bytes(await core.read(fh, size - 3, 100)) == b"\0\0\0"


async def test_hung_lower_read_is_eio_not_a_hang(core: FilesystemCore, monkeypatch) -> None:
    import threading

    release = threading.Event()

    class HangingPool:
        def read(self, *args: object) -> list[bytes]:
            release.wait(30)
            return []

    write_ramp(src_of(core) + "/f", 2 * MiB)
    fh = await open_file(core, b"f")
    monkeypatch.setattr(core.cache._flights, "_pool", HangingPool())
    core.source.timeout = 0.2
    try:
        with trio.fail_after(5), pytest.raises(FsError) as info:
            await core.read(fh, 0, 4096)
        assert info.value.errno == errno.EIO
    finally:
        release.set()


async def test_an_open_answered_after_its_caller_gave_up_leaves_no_fd_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For s3fs a leaked fd keeps the file's state loaded, which every later open shares."""
    import threading

    from fusecache import source as source_module
    from fusecache.config import SourceConfig
    from fusecache.source import LowerSource
    from fusecache.source_api import SourceUnavailable

    (tmp_path / "f").write_bytes(b"x")
    gate, opened = threading.Event(), []
    real_open = source_module._open_file

    def late_open(full: bytes, path: bytes) -> tuple[int, object]:
        gate.wait(10)
        fd, ident = real_open(full, path)
        opened.append(fd)
        return fd, ident

    def still_open(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path / "f")
        except OSError:
            return False

    monkeypatch.setattr(source_module, "_open_file", late_open)
    source = LowerSource(tmp_path, SourceConfig(timeout=0.2))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            with trio.fail_after(5), pytest.raises(SourceUnavailable):
                await source.open(b"f")
            gate.set()  # it answers at last
            for _ in range(500):
                if opened and not still_open(opened[0]):
                    break
                await trio.sleep(0.01)
            assert opened and not still_open(opened[0]), "the late open's fd was closed"
            nursery.cancel_scope.cancel()
    finally:
        gate.set()


async def test_a_call_given_up_before_its_thread_started_is_not_counted_as_abandoned() -> None:
    """Only a thread left in the source counts: one that never started would count for good."""
    import threading

    import trio.testing

    from fusecache.config import SourceConfig
    from fusecache.source_api import SourceUnavailable
    from fusecache.threads import ThreadPolicy
    from fusecache.timedcalls import TimedCalls

    config = SourceConfig(timeout=1.0, metadata_threads=1)
    calls = TimedCalls(config, ThreadPolicy(config), "the test source")
    gate = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            async def held() -> None:
                with pytest.raises(SourceUnavailable):
                    await calls._meta(gate.wait, 10)

            nursery.start_soon(held)
            await trio.testing.wait_all_tasks_blocked()  # it holds the one thread
            with pytest.raises(SourceUnavailable, match="no thread free"):
                await calls._meta(lambda: None)
        assert calls.statistics().abandoned_threads == 1  # the held one, still in the source
        gate.set()
        for _ in range(500):  # the held thread ends once the source answers
            if not calls.statistics().abandoned_threads:
                break
            await trio.sleep(0.01)
        assert calls.statistics().abandoned_threads == 0
    finally:
        gate.set()
