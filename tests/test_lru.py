"""The scan-resistant byte LRU."""

from __future__ import annotations

from fusecache.lru import ScanResistantLRU


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
