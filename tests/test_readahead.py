"""The read-ahead policy, without a kernel: table tests and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusecache.config import MiB, ReadaheadConfig
from fusecache.readahead import FileInterest, SequentialStream

pytestmark = pytest.mark.unit

CFG = ReadaheadConfig(initial_window=2 * MiB, max_window=16 * MiB, slack=4 * MiB)


def test_first_read_fetches_nothing_ahead() -> None:
    assert SequentialStream(CFG).on_read(0, 8) is None


def test_window_doubles_then_caps() -> None:
    s = SequentialStream(CFG)
    s.on_read(0, MiB)
    windows = []
    for i in range(1, 8):
        s.on_read(i * MiB, MiB)
        windows.append(s.window)
    assert windows == [2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 16 * MiB, 16 * MiB, 16 * MiB]


def test_ranges_do_not_overlap_and_run_ahead() -> None:
    s = SequentialStream(CFG)
    s.on_read(0, MiB)
    asked = []
    for i in range(1, 20):
        r = s.on_read(i * MiB, MiB)
        if r:
            asked.append(r)
    for (a0, a1), (b0, _) in zip(asked, asked[1:], strict=False):
        assert a1 == b0 and a0 < a1
    assert asked[-1][1] == 20 * MiB + 16 * MiB


def test_random_jump_resets_and_small_reorder_does_not() -> None:
    s = SequentialStream(CFG)
    s.on_read(0, MiB)
    s.on_read(MiB, MiB)
    s.on_read(3 * MiB, MiB)  # the kernel's out-of-order read-ahead
    s.on_read(2 * MiB, MiB)
    assert s.window == 16 * MiB or s.window >= 4 * MiB
    assert s.on_read(900 * MiB, 4096) is None
    assert s.window == 0


def test_memory_bound_caps_window() -> None:
    s = SequentialStream(CFG, max_window=3 * MiB)
    for i in range(10):
        s.on_read(i * MiB, MiB)
    assert s.window == 3 * MiB


@given(st.lists(st.tuples(st.integers(0, 1 << 34), st.integers(1, 4 * MiB)), max_size=60))
def test_any_read_sequence_keeps_invariants(reads: list[tuple[int, int]]) -> None:
    s = SequentialStream(CFG)
    for off, size in reads:
        r = s.on_read(off, size)
        assert 0 <= s.window <= CFG.max_window
        if r is not None:
            start, stop = r
            assert start < stop
            assert stop - (off + size) <= CFG.max_window + CFG.slack


# --- FileInterest: when is the whole file wanted? ---

WHOLE = ReadaheadConfig(slack=4 * MiB, whole_file_after=16 * MiB, whole_file_scattered_reads=3)


def test_sequential_pass_from_start_wants_the_whole_file() -> None:
    interest = FileInterest(WHOLE)
    fired = [interest.on_read(i * MiB, MiB) for i in range(20)]
    assert fired.index(True) == 15, "fires when [0, 16 MiB) has been read"
    assert fired.count(True) == 1, "fires once"


def test_header_then_scattered_reads_want_the_whole_file() -> None:
    interest = FileInterest(WHOLE)
    assert not interest.on_read(0, 8)  # safetensors: the header length
    assert not interest.on_read(8, 40_000)  # the JSON header
    assert [interest.on_read(off * MiB, 4096) for off in (90, 40, 70)] == [False, False, True]


def test_scattered_reads_without_the_head_are_not_a_loader() -> None:
    interest = FileInterest(WHOLE)
    assert not any(interest.on_read(off * MiB, 4096) for off in (90, 40, 70, 55, 33, 81))


def test_random_reads_near_the_head_are_not_a_head_read() -> None:
    interest = FileInterest(WHOLE)
    reads = [(MiB + 4096, 4096), (90 * MiB, 4096), (40 * MiB, 4096), (70 * MiB, 4096)]
    assert not any(interest.on_read(off, n) for off, n in reads)


def test_a_header_peek_alone_is_not_enough() -> None:
    interest = FileInterest(WHOLE)
    assert not interest.on_read(0, 8) and not interest.on_read(8, 40_000)


@given(st.lists(st.tuples(st.integers(0, 64 * MiB), st.integers(1, 2 * MiB)), max_size=60))
def test_interest_fires_at_most_once_and_only_for_cause(reads: list[tuple[int, int]]) -> None:
    interest = FileInterest(WHOLE)
    fired = [interest.on_read(off, n) for off, n in reads]
    assert fired.count(True) <= 1
    if True in fired:
        seen = reads[: fired.index(True) + 1]
        assert any(off == 0 for off, _ in seen), "never without a read of the head"


def test_two_reads_out_of_order_in_a_row_make_a_random_reader() -> None:
    stream = SequentialStream(ReadaheadConfig())
    stream.on_read(40 * MiB, 4096)  # a first read: perhaps a sequential reader's start
    assert not stream.random
    stream.on_read(40 * MiB + 4096, 4096)  # in order
    assert not stream.random
    stream.on_read(90 * MiB, 4096)
    assert not stream.random
    stream.on_read(10 * MiB, 4096)
    assert stream.random
    stream.on_read(10 * MiB + 4096, 4096)  # in order again
    assert not stream.random


def test_a_random_reader_landing_near_its_last_read_fetches_nothing_ahead() -> None:
    stream = SequentialStream(ReadaheadConfig())
    for off in (300 * MiB, 10 * MiB):
        stream.on_read(off, 4096)
    assert stream.random
    assert stream.on_read(12 * MiB, 4096) is None  # within the slack, by chance
    assert stream.on_read(12 * MiB + 4096, 4096) is not None  # right where it ended: in order


# --- who streams through a file (what page-cache feeding leaves to the reader) ---

STREAM = ReadaheadConfig(slack=8 * MiB, streaming_after=16 * MiB, stream_holes=4 * MiB)


def test_a_sequential_reader_streams_after_sixteen_mib_and_heads_for_what_lies_ahead() -> None:
    s = SequentialStream(STREAM)
    for i in range(16):
        assert not s.heading_for(100 * MiB)
        s.on_read(i * MiB, MiB)
    assert s.heading_for(100 * MiB) and s.heading_for(16 * MiB)
    assert not s.heading_for(0), "what lies well behind it, it has read"


def test_a_mapped_loaders_read_around_runs_never_stream() -> None:
    s = SequentialStream(STREAM)
    s.on_read(0, 8)  # the header
    # Each fault: the kernel's read-around, four 1 MiB requests in order, 6 MiB past the
    # last: within the slack, so in order for read-ahead, but a hole wider than the
    # kernel's read-ahead starts a new streak.
    at = 0
    for _ in range(20):
        at += 6 * MiB
        for k in range(4):
            s.on_read(at + k * MiB, MiB)
        at += 4 * MiB
        assert not s.heading_for(at + 64 * MiB)


def test_the_head_read_whole_is_a_stream_and_a_head_with_holes_or_scattered_reads_is_not() -> None:
    whole = FileInterest(STREAM)
    for i in range(16):
        whole.on_read(i * MiB, MiB)
    assert whole.triggered and whole.streamed

    holes = FileInterest(STREAM)  # a loader's read-around, 6 MiB apart
    for at in range(0, 40 * MiB, 7 * MiB):
        holes.on_read(at, MiB)
    assert holes.triggered and not holes.streamed

    scattered = FileInterest(STREAM)
    scattered.on_read(0, MiB)
    scattered.on_read(200 * MiB, MiB)  # a tensor far away
    for i in range(1, 16):
        scattered.on_read(i * MiB, MiB)
    assert scattered.triggered and not scattered.streamed
