"""Which pages of a block in memory the kernel holds: what a reply marks and a feed stores."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusecache.cache.memory import PAGE, MemoryTier

pytestmark = pytest.mark.unit

SPANS = st.lists(st.tuples(st.integers(0, 256 * PAGE), st.integers(0, 256 * PAGE)), max_size=6)


@given(st.integers(1, 256 * PAGE), SPANS)
def test_kernel_lacks_exactly_the_pages_it_was_not_served(length: int,
                                                          served: list[tuple[int, int]]) -> None:
    tier = MemoryTier(1 << 30, 1 << 20, lambda key, block: None)
    key = ("f", 0)
    tier.put(key, bytes(length))
    held = set()
    for a, b in served:
        lo, hi = sorted((min(a, length), min(b, length)))
        tier.serve(key, lo, hi, length)
        # Whole pages only; the block's last page counts whole if the range reaches its end.
        first, stop = -(-lo // PAGE), (hi if hi < length else length + PAGE - 1) // PAGE
        held |= set(range(first, stop))
    runs = tier.kernel_lacks(key, length)
    lacked = set()
    for lo, hi in runs:
        assert lo % PAGE == 0 and (hi % PAGE == 0 or hi == length) and lo < hi <= length
        lacked |= set(range(lo // PAGE, -(-hi // PAGE)))
    assert lacked == set(range(-(-length // PAGE))) - held
    for lo, hi in runs:  # stored, they complete the block
        tier.serve(key, lo, hi, length)
    assert tier.kernel_holds(key, length)
