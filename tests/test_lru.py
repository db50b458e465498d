"""The scan-resistant byte LRU."""

from __future__ import annotations

import pytest

from fusecache.lru import ScanResistantLRU

pytestmark = pytest.mark.unit


def test_evicts_least_recently_used_by_bytes() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(30)
    for i in range(3):
        assert lru.put((f"f{i}", 0), b"x" * 10)
    lru.get(("f0", 0))
    assert lru.put(("f3", 0), b"x" * 10)
    assert ("f1", 0) not in lru and ("f0", 0) in lru
    assert lru.used == 30 and lru.evictions == 1


def test_too_large_block_is_not_admitted() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(10)
    assert not lru.put(("f", 0), b"x" * 11)
    assert lru.used == 0


def test_second_pass_over_file_larger_than_cache_hits_its_head() -> None:
    blocks, capacity = 150, 100
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(capacity)
    for i in range(blocks):  # first pass
        if lru.get(("f", i)) is None:
            lru.put(("f", i), b"x")
    hits = 0
    for i in range(blocks):  # second pass
        if lru.get(("f", i)) is not None:
            hits += 1
        else:
            lru.put(("f", i), b"x")
    assert hits >= blocks // 2
    assert hits == capacity


def test_other_files_still_evict_a_scanned_file() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(4)
    for i in range(4):
        lru.put(("a", i), b"x")
    assert lru.put(("b", 0), b"x")
    assert ("a", 0) not in lru


def test_discard_file() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(100)
    lru.put(("a", 0), b"xx")
    lru.put(("a", 1), b"xx")
    lru.put(("b", 0), b"xx")
    assert lru.discard_file("a") == [("a", 0), ("a", 1)]
    assert lru.used == 2 and len(lru) == 1


def test_blocks_the_scan_rule_keeps_out_wait_in_passing_until_pushed_out() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(3, passing=2)
    for i in range(3):
        lru.put(("f", i), b"x")
    assert not lru.put(("f", 3), b"x")  # read-ahead past the cache: kept out of the LRU,
    assert not lru.put(("f", 4), b"x")  # but passing holds it
    assert lru.get(("f", 3)) == b"x", "the reader coming behind read-ahead finds it"
    lru.put(("f", 5), b"x")  # FIFO: the oldest passing block goes
    assert ("f", 3) not in lru and ("f", 4) in lru and ("f", 5) in lru
    assert [i for i in range(3) if ("f", i) in lru] == [0, 1, 2], "the head stays"
    assert lru.used == 3 and lru.passing_used == 2
    assert sorted(lru.discard_file("f")) == [("f", i) for i in (0, 1, 2, 4, 5)]
    assert lru.used == lru.passing_used == 0


def test_without_passing_room_the_scan_rule_refuses() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(2)
    lru.put(("f", 0), b"x")
    lru.put(("f", 1), b"x")
    assert not lru.put(("f", 2), b"x") and ("f", 2) not in lru


def test_a_passing_block_put_again_is_not_counted_twice() -> None:
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(2, passing=2)
    lru.put(("f", 0), b"x")
    lru.put(("f", 1), b"x")
    lru.put(("f", 2), b"x")  # passing
    lru.discard(("f", 0))
    assert lru.put(("f", 2), b"x")  # now there is room in the LRU itself
    assert lru.used == 2 and lru.passing_used == 0


def test_on_evict_sees_every_block_that_leaves_but_not_discards() -> None:
    left: list[tuple[object, int]] = []
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(2, lambda k, v: left.append(k), passing=1)
    lru.put(("f", 0), b"x")
    lru.put(("f", 1), b"x")
    lru.put(("f", 2), b"x")  # the scan rule keeps it out: it waits in passing
    lru.put(("f", 3), b"x")  # pushes ("f", 2) out of passing
    lru.put(("g", 0), b"x")  # another file evicts the LRU's oldest
    assert left == [("f", 2), ("f", 0)]
    lru.discard(("f", 1))
    lru.discard_file("f")
    assert left == [("f", 2), ("f", 0)]
    assert [k for k, _ in lru.items_recent_first()] == [("g", 0)]


def test_a_block_kept_out_without_passing_room_counts_as_left() -> None:
    left: list[tuple[object, int]] = []
    lru: ScanResistantLRU[bytes] = ScanResistantLRU(1, lambda k, v: left.append(k))
    lru.put(("f", 0), b"x")
    assert not lru.put(("f", 1), b"x")
    assert not lru.put(("g", 0), b"xx")  # bigger than the whole cache
    assert left == [("f", 1), ("g", 0)]
