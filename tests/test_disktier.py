"""The disk tier: persistence, validation, bounds, permissions, a full disk; without a kernel."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusecache.blockio import BlockPool
from fusecache.cache import disk, writestop
from fusecache.cache.disk import DATA_OFFSET, FORMAT, UNIT, DiskTier
from fusecache.cachedir import SUBDIR
from tests.ramp import ramp
from tests.test_cachedir import tmpfs

pytestmark = pytest.mark.unit

KEY = (b"models/a.safetensors", 3 << 20, 123456789, 42)
BLOCK = 64 * 1024


def block(idx: int) -> bytes:
    return ramp(idx * BLOCK, BLOCK)


def load(tier: DiskTier, pool: BlockPool, key: tuple[object, ...], idx: int,
         length: int = BLOCK) -> bytes | None:
    data = tier.read(key, idx, length, pool)
    return None if data is None else bytes(data)


def tier_at(root: Path, max_bytes: int = 1 << 30) -> DiskTier:
    return DiskTier(root, max_bytes, block_size=BLOCK)


def restart(tier: DiskTier, root: Path, max_bytes: int = 1 << 30) -> DiskTier:
    """What a remount does: the old daemon lets go of the cache dir, a new one opens it."""
    tier.close()
    return tier_at(root, max_bytes)


def block_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"{SUBDIR}/{FORMAT}/*/*.blk"))


def slot(idx: int) -> int:
    """Where block *idx*'s slot starts in its unit's file."""
    return idx % UNIT * (DATA_OFFSET + BLOCK)


def data_bytes(path: Path) -> int:
    """Bytes a file holds on disk (holes excluded)."""
    return os.stat(path).st_blocks * 512


def test_round_trip_and_persistence(tmp_path: Path, pool: BlockPool) -> None:
    tier = tier_at(tmp_path / "c")
    assert tier.write(KEY, 0, block(0)) and tier.write(KEY, 1, block(1))
    again = restart(tier, tmp_path / "c")
    assert again.contains(KEY, 1)
    assert load(again, pool, KEY, 0) == block(0)
    assert load(again, pool, KEY, 1) == block(1)
    assert again.validation_failures == 0


def test_other_identity_is_a_miss(tmp_path: Path, pool: BlockPool) -> None:
    tier = tier_at(tmp_path / "c")
    tier.write(KEY, 0, block(0))
    changed = (KEY[0], KEY[1], KEY[2] + 1, KEY[3])
    assert load(tier, pool, changed, 0) is None
    assert load(tier, pool, KEY, 0, BLOCK + 1) is None, "a wrong length must not pass"


def test_corrupt_or_torn_blocks_are_misses_and_punched_out(tmp_path: Path, pool: BlockPool
                                                          ) -> None:
    tier = tier_at(tmp_path / "c")
    for i in range(4):
        tier.write(KEY, i, block(i))
    [path] = block_files(tmp_path / "c")  # one unit holds all four
    with open(path, "r+b") as f:
        f.seek(slot(0) + DATA_OFFSET + 100)  # flip one data byte
        byte = f.read(1)
        f.seek(slot(0) + DATA_OFFSET + 100)
        f.write(bytes([byte[0] ^ 1]))
        f.seek(slot(1) + DATA_OFFSET + BLOCK // 2)  # a write torn halfway: zeros after
        f.write(bytes(BLOCK // 2))
        f.seek(slot(2))  # a header never written
        f.write(bytes(DATA_OFFSET))
    before = data_bytes(path)
    results = [load(tier, pool, KEY, i) for i in range(4)]
    assert results[:3] == [None, None, None]
    assert results[3] == block(3)
    assert tier.validation_failures == 3
    assert not tier.contains(KEY, 0)
    assert data_bytes(path) == before - 3 * (DATA_OFFSET + BLOCK), "three slots punched out"
    assert load(tier, pool, KEY, 3) == block(3)


def test_a_file_cut_short_is_a_miss(tmp_path: Path, pool: BlockPool) -> None:
    tier = tier_at(tmp_path / "c")
    tier.write(KEY, 0, block(0))
    tier.write(KEY, 1, block(1))
    [path] = block_files(tmp_path / "c")
    os.truncate(path, slot(1) + DATA_OFFSET + 10)
    assert load(tier, pool, KEY, 1) is None
    assert load(tier, pool, KEY, 0) == block(0)


def test_a_restart_indexes_the_slots_written_and_not_the_holes(tmp_path: Path, pool: BlockPool
                                                                ) -> None:
    tier = tier_at(tmp_path / "c")
    for i in (0, 2, 3, UNIT + 1):  # two units, with holes
        tier.write(KEY, i, block(i))
    tail = ramp(0, 1000)
    tier.write(KEY, 2 * UNIT, tail)  # a short last block
    again = restart(tier, tmp_path / "c")
    assert [i for i in range(3 * UNIT) if again.contains(KEY, i)] == [0, 2, 3, UNIT + 1, 2 * UNIT]
    assert again.used == tier.used, "sizes from the extents (the last one ends at the end of file)"
    for i in (0, 2, 3, UNIT + 1):
        assert load(again, pool, KEY, i) == block(i)
    assert load(again, pool, KEY, 2 * UNIT, 1000) == tail
    assert load(again, pool, KEY, 1) is None


def test_a_block_torn_by_a_crash_is_a_miss_after_restart(tmp_path: Path, pool: BlockPool
                                                          ) -> None:
    tier = tier_at(tmp_path / "c")
    tier.write(KEY, 0, block(0))
    [path] = block_files(tmp_path / "c")
    with open(path, "r+b") as f:  # what a kill -9 mid-write of block 1 leaves
        f.seek(slot(1))
        f.write(bytes(DATA_OFFSET + 10))
    again = restart(tier, tmp_path / "c")
    assert again.contains(KEY, 1)  # its slot holds data...
    assert load(again, pool, KEY, 1) is None  # ...that fails its checks
    assert again.validation_failures == 1 and not again.contains(KEY, 1)
    assert load(again, pool, KEY, 0) == block(0)


def test_size_bound_evicts_lru_and_frees_the_space(tmp_path: Path) -> None:
    tier = tier_at(tmp_path / "c", 3 * BLOCK)
    other = (b"other", 1, 1, 1)
    for i in range(3):
        tier.write(other, i, block(i))
    tier.write(KEY, 0, block(0))
    assert tier.used <= 3 * BLOCK
    assert not tier.contains(other, 0)
    assert sum(data_bytes(p) for p in block_files(tmp_path / "c")) == 3 * (DATA_OFFSET + BLOCK)
    for i in (1, 2, 3):  # the rest of other's unit goes: its file with it
        tier.write(KEY, i, block(i))
    assert len(block_files(tmp_path / "c")) == 1


def test_permissions(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir(mode=0o755)
    tier = tier_at(tmp_path / "c")
    tier.write(KEY, 0, block(0))
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o755, "the cache dir is not ours"
    assert stat.S_IMODE(os.stat(tmp_path / "c" / SUBDIR).st_mode) == 0o700
    path = block_files(tmp_path / "c")[0]
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_discard_file(tmp_path: Path) -> None:
    tier = tier_at(tmp_path / "c")
    tier.write(KEY, 0, block(0))
    tier.write(KEY, 1, block(1))
    tier.discard_file(KEY)
    assert not tier.contains(KEY, 0) and block_files(tmp_path / "c") == []


def test_a_block_being_written_is_invisible_until_whole(
        tmp_path: Path, pool: BlockPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: readers found a block in the index before its file was in place."""
    tier = tier_at(tmp_path / "c")
    seen = []
    real_store = disk.store_slot

    def store_after_looking(*args: object) -> None:
        seen.append((tier.contains(KEY, 0), tier.contains_all(KEY, [0]),
                     load(tier, pool, KEY, 0)))
        real_store(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("fusecache.cache.disk.store_slot", store_after_looking)
    assert tier.write(KEY, 0, block(0))
    assert seen == [(False, False, None)] and tier.validation_failures == 0
    assert tier.contains(KEY, 0) and load(tier, pool, KEY, 0) == block(0)


def test_contains_all_wants_every_block_asked_for(tmp_path: Path) -> None:
    tier = tier_at(tmp_path / "c")
    for idx in (0, 1, 3):
        tier.write(KEY, idx, block(idx))
    assert tier.contains_all(KEY, [0, 1, 3]) and tier.contains_all(KEY, [])
    assert not tier.contains_all(KEY, [0, 1, 2, 3])
    assert not tier.contains_all(("other", 1), [0])


def test_a_block_discarded_while_being_written_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = tier_at(tmp_path / "c")
    tier.write(KEY, 1, block(1))
    real_store = disk.store_slot

    def store_after_discard(*args: object) -> None:
        tier.discard_file(KEY)  # the file changed meanwhile
        real_store(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("fusecache.cache.disk.store_slot", store_after_discard)
    assert not tier.write(KEY, 0, block(0))
    assert block_files(tmp_path / "c") == [] and tier.used == 0


def pool_blocks(tmp_path: Path, pool: BlockPool, sizes: list[int]) -> list[bytes]:
    """Blocks in *pool* memory, as the cache hands them to the disk tier."""
    src = tmp_path / "lower"
    src.write_bytes(ramp(0, sum(sizes)))
    fd = os.open(src, os.O_RDONLY)
    try:
        return pool.read(fd, 0, sizes)  # type: ignore[return-value]
    finally:
        os.close(fd)


def test_whole_blocks_in_pool_memory_move_with_o_direct(
        tmp_path: Path, pool: BlockPool, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = tier_at(tmp_path / "c")
    assert tier.direct_io, "ext4 and tmpfs take O_DIRECT"
    whole, tail = pool_blocks(tmp_path, pool, [BLOCK, 1000])
    opened: list[bool] = []
    real_open = os.open

    def recording_open(path: Path, flags: int, *args: int) -> int:
        if str(path).endswith(".blk"):
            opened.append(bool(flags & os.O_DIRECT))
        return real_open(path, flags, *args)

    monkeypatch.setattr("fusecache.cache.disk.os.open", recording_open)
    aligned = pool.page_aligned
    assert tier.write(KEY, 0, whole, aligned) and tier.write(KEY, 1, tail, aligned)
    assert load(tier, pool, KEY, 0) == bytes(whole)
    assert load(tier, pool, KEY, 1, 1000) == bytes(tail)
    # Reads and writes go direct with the C pool's blocks, which are page aligned,
    # not with the twin's bytearrays. A tail block's odd length goes through the
    # page cache either way.
    assert opened == [aligned, False, aligned, False]
    assert tier.validation_failures == 0


def test_corruption_is_caught_on_the_o_direct_path(tmp_path: Path, pool: BlockPool) -> None:
    tier = tier_at(tmp_path / "c")
    [whole] = pool_blocks(tmp_path, pool, [BLOCK])
    assert tier.write(KEY, 0, whole, pool.page_aligned)
    [path] = block_files(tmp_path / "c")
    with open(path, "r+b") as f:
        f.seek(DATA_OFFSET + BLOCK - 1)
        f.write(b"\xff" if bytes(whole)[-1] != 0xFF else b"\0")
    assert load(tier, pool, KEY, 0) is None
    assert tier.validation_failures == 1 and block_files(tmp_path / "c") == []


def test_notes_survive_a_restart_and_go_with_the_identity(tmp_path: Path) -> None:
    tier = tier_at(tmp_path / "c")
    assert tier.note(KEY, "sha256") is None
    tier.write(KEY, 0, block(0))
    tier.set_note(KEY, "sha256", b"ab" * 32)
    again = restart(tier, tmp_path / "c")
    assert again.note(KEY, "sha256") == b"ab" * 32
    assert again.used == BLOCK, "a note is not a block"
    assert again.note((b"other", 1, 1, 1), "sha256") is None
    again.discard_file(KEY)
    assert again.note(KEY, "sha256") is None


def test_evicting_one_block_leaves_the_rest_of_its_file_readable(tmp_path: Path,
                                                                  pool: BlockPool) -> None:
    """Shrunk by the property test below from a tier that unlinked a whole unit on eviction."""
    tier = tier_at(tmp_path / "c", 5 * BLOCK)
    for i in range(6):
        tier.write(KEY, i, block(i))
    held = [i for i in range(6) if tier.contains(KEY, i)]
    assert len(held) == 5
    for i in held:
        assert load(tier, pool, KEY, i) == block(i)


OPS = st.lists(st.tuples(st.sampled_from(["write", "read", "discard", "restart"]),
                         st.integers(0, 1), st.integers(0, 2 * UNIT + 1)), max_size=40)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_mix_of_writes_evictions_discards_and_restarts_never_gives_wrong_bytes(
        tmp_path_factory: pytest.TempPathFactory, pool: BlockPool, ops: list) -> None:
    """Reads give the block written or nothing, and no file outlives its last block."""
    root = tmp_path_factory.mktemp("c")
    keys = [KEY, (b"models/b.safetensors", 1, 2, 3)]
    tier = tier_at(root, 5 * BLOCK)  # small: writes evict
    for op, k, idx in ops:
        key = keys[k]
        want = ramp(idx * BLOCK, BLOCK, seed=k)
        if op == "write":
            tier.write(key, idx, want)
        elif op == "read":
            got = tier.read(key, idx, BLOCK, pool)
            assert got is None or bytes(got) == want
        elif op == "discard":
            tier.discard_file(key)
        else:
            tier = restart(tier, root, 5 * BLOCK)
        assert tier.used <= 5 * BLOCK
        held = {(k, i) for k in range(2) for i in range(3 * UNIT) if tier.contains(keys[k], i)}
        for k, i in held:  # every indexed block reads back whole
            assert bytes(tier.read(keys[k], i, BLOCK, pool) or b"") == ramp(i * BLOCK, BLOCK,
                                                                             seed=k)
        assert len(block_files(root)) == len({(k, i // UNIT) for k, i in held})
    assert tier.validation_failures == 0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def full_disk_writer(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make every slot write fail with ENOSPC, as a full disk does; count the attempts."""
    calls = {"n": 0}

    def store(*args: object) -> None:
        calls["n"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("fusecache.cache.disk.store_slot", store)
    return calls


def test_a_full_disk_stops_writes_cheaply_says_so_once_and_keeps_reading(
        tmp_path: Path, pool: BlockPool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fusecache.cache")
    clock = Clock()
    tier = DiskTier(tmp_path / "c", 1 << 30, block_size=BLOCK, clock=clock)
    assert tier.write(KEY, 0, block(0))
    caplog.clear()
    calls = full_disk_writer(monkeypatch)
    for i in range(1, 2001):  # a reader at 1 GB/s hands over this many in two seconds
        assert not tier.write(KEY, i, block(i))
        clock.now += 0.01
    assert calls["n"] == 1, "one failed write, then none tried until the pause is over"
    stats = tier.statistics()
    assert (stats.write_errors, stats.writes_refused_full, stats.full_episodes) == (1, 1999, 1)
    assert stats.full_now and stats.used == BLOCK, "the failed block's space is given back"
    assert load(tier, pool, KEY, 0) == block(0), "reading goes on"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == [f"disk cache full at {tmp_path / 'c' / SUBDIR} (No space left on device): "
                    f"not writing for {writestop.WRITE_BACKOFF:.0f} s"]


def test_writes_are_tried_again_after_the_pause_and_the_log_sums_up_meanwhile(
        tmp_path: Path, pool: BlockPool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fusecache.cache")
    clock = Clock()
    tier = DiskTier(tmp_path / "c", 1 << 30, block_size=BLOCK, clock=clock)
    caplog.clear()
    real_store = disk.store_slot
    calls = full_disk_writer(monkeypatch)
    measured: list[int] = []
    real_usage = disk.shutil.disk_usage

    def usage(path: Path) -> object:
        measured.append(1)
        return real_usage(path)

    monkeypatch.setattr("fusecache.cache.disk.shutil.disk_usage", usage)
    idx = 0
    for _ in range(30 * 60):  # half an hour of a full disk, a write every second
        idx += 1
        tier.write(KEY, idx, block(idx))
        clock.now += 1
    # One try per pause, each after measuring the free space again.
    assert calls["n"] == len(measured) + 1 == 30
    stats = tier.statistics()
    assert stats.write_errors == 30 and stats.full_episodes == 1
    assert stats.writes_refused_full == 1800 - 30
    said = [r.getMessage() for r in caplog.records]
    # The first line, then a summary at 5, 10, 15, 20 and 25 minutes.
    assert len(said) == 6, said
    assert "writes refused" in said[1] and "still not writing" in said[1]
    monkeypatch.setattr("fusecache.cache.disk.store_slot", real_store)  # space came back
    clock.now += writestop.WRITE_BACKOFF
    assert tier.write(KEY, 0, block(0))
    assert not tier.statistics().full_now
    assert "writes again" in caplog.records[-1].getMessage()
    assert load(tier, pool, KEY, 0) == block(0)


def fill(directory: Path) -> Path:
    """Fill the file system of *directory* to the last byte, as another program might."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_real_full_disk_stops_writes_and_a_cleaned_one_takes_them_again(
        tmp_path: Path, pool: BlockPool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fusecache.cache")
    clock = Clock()
    with tmpfs(tmp_path / "small") as fs:
        tier = DiskTier(fs / "cache", 1 << 30, block_size=BLOCK, clock=clock)
        try:
            assert tier.write(KEY, 0, block(0))
            filler = fill(fs)
            caplog.clear()
            for i in range(1, 200):
                assert not tier.write(KEY, i, block(i))
            stats = tier.statistics()
            assert (stats.write_errors, stats.full_episodes, stats.full_now) == (1, 1, True)
            assert [r.levelno for r in caplog.records] == [logging.WARNING]
            assert "disk cache full" in caplog.records[0].getMessage()
            assert load(tier, pool, KEY, 0) == block(0)
            filler.unlink()
            clock.now += writestop.WRITE_BACKOFF
            assert tier.write(KEY, 1, block(1)) and load(tier, pool, KEY, 1) == block(1)
            assert not tier.statistics().full_now
            # Measured again: what it holds plus 90% of what is free now.
            assert tier.capacity < 4 << 20
        finally:
            tier.close()
