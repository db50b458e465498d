"""The read-once rule: a wanted file is fetched whole, once, hashed on the way; scan resistance."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusecache.config import MiB, ReadaheadConfig
from fusecache.errors import FsError
from fusecache.fs.core import FilesystemCore
from fusecache.fs.readonce import SHA256_XATTR
from tests.conftest import Mount, force_unmount, fusecache_cmd, make_core, needs_fuse
from tests.ramp import ramp, write_ramp
from tests.test_core import open_file, src_of
from tests.test_mount import drop_kernel_cache

SIZE = 24 * MiB + 4321  # under half the core fixture's 64 MiB memory cache


@pytest.mark.core
async def test_sequential_head_fetches_the_rest(core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/m", SIZE)
    fh = await open_file(core, b"m")
    for off in range(0, 17 * MiB, MiB):  # a hash pass, stopped early
        await core.read(fh, off, MiB)
    core.release(fh)  # every handle closed: the fill goes on
    with trio.fail_after(20):
        while core.cache.statistics().lower_bytes < SIZE:  # noqa: ASYNC110 - the fill runs on
            await trio.sleep(0.01)
    await core.wait_idle()
    stats = core.cache.statistics()
    assert stats.lower_bytes == SIZE, "each byte crosses once"
    served = stats.served_memory + stats.served_disk + stats.served_lower
    assert served == 17 * MiB, "served counts replies to readers, not the daemon's fill"
    ino = (await core.lookup(1, b"m")).ino
    assert SHA256_XATTR not in await core.listxattr(ino), "hashed only when asked"


@pytest.mark.core
async def test_sha256_asked_of_a_cold_file_fetches_it_once_for_the_readers_after(
        core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/m", SIZE)
    ino = (await core.lookup(1, b"m")).ino
    with trio.fail_after(20):
        digest = await core.getxattr(ino, SHA256_XATTR)
    assert digest.decode() == hashlib.sha256(ramp(0, SIZE)).hexdigest()
    assert SHA256_XATTR in await core.listxattr(ino)
    await core.wait_idle()
    assert core.cache.statistics().lower_bytes == SIZE
    fh = await open_file(core, b"m")  # the load the tool then does comes from the cache
    for off in range(0, SIZE, MiB):
        assert bytes(await core.read(fh, off, MiB)) == ramp(off, min(MiB, SIZE - off))
    assert core.cache.statistics().lower_bytes == SIZE
    assert await core.getxattr(ino, SHA256_XATTR) == digest, "known now: answered at once"


@pytest.mark.core
async def test_sha256_of_a_file_bigger_than_the_fill_takes(core: FilesystemCore) -> None:
    size = 40 * MiB + 7  # over half the 64 MiB memory cache: no fill, the hash reads ahead
    write_ramp(src_of(core) + "/m", size)
    ino = (await core.lookup(1, b"m")).ino
    with trio.fail_after(20):
        digest = await core.getxattr(ino, SHA256_XATTR)
    assert digest.decode() == hashlib.sha256(ramp(0, size)).hexdigest()
    assert core.cache.statistics().lower_reads < size // MiB, "fetched in units, not block by block"


@pytest.mark.core
async def test_two_askers_share_one_hash(core: FilesystemCore,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    write_ramp(src_of(core) + "/m", SIZE)
    ino = (await core.lookup(1, b"m")).ino
    got = []
    # Two hashes would move no more bytes from below than one (the second reads the
    # cache), so count the walks over the file's blocks that hashes make.
    walks = []
    walk = core.readonce.passes.walk

    async def counted_walk(*args: Any, **kwargs: Any) -> None:
        walks.append(args)
        await walk(*args, **kwargs)

    monkeypatch.setattr(core.readonce.passes, "walk", counted_walk)

    async def ask() -> None:
        got.append(await core.getxattr(ino, SHA256_XATTR))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            nursery.start_soon(ask)
    assert got[0] == got[1] == hashlib.sha256(ramp(0, SIZE)).hexdigest().encode()
    assert len(walks) == 1, "one hash, shared by both askers"
    await core.wait_idle()
    assert core.cache.statistics().lower_bytes == SIZE


@pytest.mark.core
async def test_sha256_of_a_file_the_lower_mount_fails_to_read_is_eio(
        core: FilesystemCore, monkeypatch: pytest.MonkeyPatch) -> None:
    write_ramp(src_of(core) + "/m", SIZE)
    ino = (await core.lookup(1, b"m")).ino

    async def failing_read(*args: object, **kwargs: object) -> list[bytes]:
        raise OSError(errno.EIO, "the store is down")

    monkeypatch.setattr(core.source, "read_blocks", failing_read)
    for _ in range(2):  # a failed hash is not remembered: the next ask tries again
        with trio.fail_after(20), pytest.raises(FsError) as info:
            await core.getxattr(ino, SHA256_XATTR)
        assert info.value.errno == errno.EIO
    assert SHA256_XATTR not in await core.listxattr(ino)
    monkeypatch.undo()  # the store is back
    with trio.fail_after(20):
        digest = await core.getxattr(ino, SHA256_XATTR)
    assert digest.decode() == hashlib.sha256(ramp(0, SIZE)).hexdigest()


@pytest.mark.core
async def test_with_sha256_on_the_fill_hashes_as_it_streams(core: FilesystemCore) -> None:
    core.readonce.config = ReadaheadConfig(sha256=True)  # `fusecache mount --sha256`
    write_ramp(src_of(core) + "/m", SIZE)
    fh = await open_file(core, b"m")
    for off in range(0, 17 * MiB, MiB):
        await core.read(fh, off, MiB)
    core.release(fh)
    ino = (await core.lookup(1, b"m")).ino
    with trio.fail_after(20):
        await core.wait_idle()  # the fill and the walk that hashes behind it
    assert SHA256_XATTR in await core.listxattr(ino), "known without being asked"
    assert (await core.getxattr(ino, SHA256_XATTR)).decode() == hashlib.sha256(
        ramp(0, SIZE)).hexdigest()


@pytest.mark.core
async def test_sha256_of_a_directory_is_no_data(core: FilesystemCore) -> None:
    os.mkdir(src_of(core) + "/d")
    ino = (await core.lookup(1, b"d")).ino
    with pytest.raises(FsError) as info:
        await core.getxattr(ino, SHA256_XATTR)
    assert info.value.errno == errno.ENODATA


@pytest.mark.core
async def test_header_then_scattered_reads_fetch_the_rest(core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/m", SIZE)
    fh = await open_file(core, b"m")
    await core.read(fh, 0, 8)
    # Beyond the head's slack: each read counts as scattered and none extends the head.
    far = ReadaheadConfig().slack + MiB
    for off in random.Random(1).sample(range(far, SIZE - 4096, 4096), 8):
        assert bytes(await core.read(fh, off, 4096)) == ramp(off, 4096)
    # Nothing else wants the whole file (no sha256 asked, no sequential reader).
    with trio.fail_after(20):
        await core.wait_idle()  # the fill the trigger started
    # Once, and the pages of the reads that showed a random reader (they move
    # their pages only) before the fill.
    assert SIZE <= core.cache.statistics().lower_bytes <= SIZE + 8 * 4096


@pytest.mark.core
async def test_files_too_big_for_memory_are_not_fetched_whole(core: FilesystemCore) -> None:
    size = 40 * MiB  # over half the 64 MiB memory cache
    write_ramp(src_of(core) + "/m", size)
    fh = await open_file(core, b"m")
    for off in range(0, 20 * MiB, MiB):
        await core.read(fh, off, MiB)
    await core.wait_idle()
    assert core.cache.statistics().lower_bytes < size


@pytest.mark.core
async def test_changed_file_gets_the_new_sha256(core: FilesystemCore) -> None:
    write_ramp(src_of(core) + "/m", SIZE)
    ino = (await core.lookup(1, b"m")).ino
    with trio.fail_after(20):
        await core.getxattr(ino, SHA256_XATTR)
    write_ramp(src_of(core) + "/m", SIZE, seed=9)
    os.utime(src_of(core) + "/m", ns=(1, 1))
    with trio.fail_after(20):
        digest = await core.getxattr(ino, SHA256_XATTR)
    assert digest.decode() == hashlib.sha256(ramp(0, SIZE, seed=9)).hexdigest()


# --- through the kernel ---


def _tensor_order_mmap_load(path: Path, size: int) -> bytes:
    """Pages in shuffled 64 KiB "tensors" through mmap, as a safetensors load does."""
    chunk = 64 * 1024
    out = bytearray(size)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        offsets = list(range(0, size, chunk))
        random.Random(7).shuffle(offsets)
        for off in offsets:
            out[off : off + chunk] = m[off : off + chunk]
    return bytes(out)


@pytest.mark.mount
@needs_fuse
def test_hash_then_load_reads_each_block_from_below_once(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 40 * MiB + 5
    write_ramp(src / "model.safetensors", size, seed=3)
    want = ramp(0, size, seed=3)
    m: Mount = mount_factory(src, "--mem-cache", "128M", "--disk-cache", "0")
    path = m.mnt / "model.safetensors"
    with open(path, "rb") as f:  # the web UI's hash pass
        assert hashlib.file_digest(f, "sha256").hexdigest() == hashlib.sha256(want).hexdigest()
    drop_kernel_cache(path)  # the load must not be served by the kernel's pages alone
    assert _tensor_order_mmap_load(path, size) == want
    # Asked now, the daemon hashes the file from its cache: nothing more from below.
    assert os.getxattr(path, SHA256_XATTR).decode() == hashlib.sha256(want).hexdigest()
    stats = m.stats()
    assert stats["lower_bytes"] == size, "hash then load: every block crosses once"


@pytest.mark.core
async def test_passes_over_a_file_bigger_than_the_cache(tmp_path: Path, implementation: str
                                                      ) -> None:
    """Regression: read-ahead outran the passing FIFO and fetched the file's tail twice."""
    size = 48 * MiB  # 1.5x the memory budget
    async with make_core(tmp_path, 32 * MiB, implementation=implementation) as core:
        write_ramp(tmp_path / "src" / "big", size)
        fetched = []
        for _ in range(2):
            before = core.cache.statistics().lower_bytes
            fh = await open_file(core, b"big")
            for off in range(0, size, 128 * 1024):
                assert bytes(await core.read(fh, off, 128 * 1024)) == ramp(off, 128 * 1024)
            core.release(fh)
            await core.wait_idle()
            fetched.append(core.cache.statistics().lower_bytes - before)
        assert fetched[0] == size, "the first pass fetches each block once"
        assert fetched[1] <= size // 2, "the second pass hits at least half"
        assert core.cache.statistics().memory_used <= 32 * MiB


@pytest.mark.mount
@needs_fuse
def test_second_pass_over_a_file_bigger_than_the_cache_hits(tmp_path: Path, mount_factory
                                                            ) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 48 * MiB  # 1.5x the memory cache
    write_ramp(src / "big", size, seed=4)
    m: Mount = mount_factory(src, "--mem-cache", "32M", "--disk-cache", "0")
    path = m.mnt / "big"
    for _ in range(2):
        drop_kernel_cache(path)
        with open(path, "rb") as f:
            assert hashlib.file_digest(f, "sha256").digest() == hashlib.sha256(
                ramp(0, size, seed=4)).digest()
        if _ == 0:
            first = m.stats()["lower_bytes"]
    second = m.stats()["lower_bytes"] - first
    assert second <= size // 2, f"the second pass fetched {second / size:.2f}x the file again"


@pytest.fixture(scope="module")
def reference_mount(tmp_path_factory: pytest.TempPathFactory):
    """One small-cache mount for the reference test (hypothesis runs many examples)."""
    root = tmp_path_factory.mktemp("reference")
    src, mnt = root / "src", root / "mnt"
    src.mkdir()
    mnt.mkdir()
    write_ramp(src / "f", 13 * MiB + 77, seed=5)
    res = fusecache_cmd("mount", str(src), str(mnt), "--mem-cache", "4M", "--disk-cache", "0",
                        "--log-file", str(root / "log"))
    assert res.returncode == 0, res.stderr
    try:
        yield src / "f", mnt / "f"
    finally:
        fusecache_cmd("umount", str(mnt))
        force_unmount(mnt)


READ = st.tuples(st.integers(0, 13 * MiB + 200), st.integers(1, 3 * MiB))
RUN = st.tuples(st.integers(0, 13 * MiB), st.integers(1, 40), st.sampled_from([4096, 128 * 1024]))


@pytest.mark.mount
@needs_fuse
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(READ.map(lambda r: ("pread", r)), RUN.map(lambda r: ("run", r))),
                    min_size=1, max_size=12))
def test_reference_random_and_sequential_mixes(reference_mount, ops) -> None:
    direct, mounted = reference_mount
    drop_kernel_cache(mounted)  # make the daemon answer, not the kernel's pages
    with open(direct, "rb") as d, open(mounted, "rb", buffering=0) as m:
        for kind, args in ops:
            if kind == "pread":
                off, n = args
                assert os.pread(m.fileno(), n, off) == os.pread(d.fileno(), n, off), args
            else:
                start, count, chunk = args
                m.seek(start)
                d.seek(start)
                for _ in range(count):
                    assert m.read(chunk) == d.read(chunk), args


@pytest.mark.core
async def test_a_random_read_fetches_only_its_block(core: FilesystemCore) -> None:
    """Regression: a miss fetched a whole 8 MiB unit; a load pass over a file the
    page cache mostly held moved 4.2 GB from below to serve 77 MB (scale-0.2 bench)."""
    write_ramp(src_of(core) + "/m", SIZE)
    fh = await open_file(core, b"m")
    off = 10 * MiB + 5
    assert bytes(await core.read(fh, off, 4096)) == ramp(off, 4096)
    await core.wait_idle()
    assert core.cache.statistics().lower_bytes == core.cache.block_size
