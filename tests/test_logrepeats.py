"""Repeated errors are logged once, then counted; SIGUSR1 writes the stacks to the log."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from fusecache.daemon import pidfile_for
from fusecache.logrepeats import RepeatedLog
from tests.conftest import needs_fuse


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.unit
def test_a_repeated_error_is_logged_once_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.repeats")
    clock = _Clock()
    repeats = RepeatedLog(logging.getLogger("test.repeats"), period=60, clock=clock)
    for offset in range(0, 100 * 4096, 4096):  # offsets differ: still the same error
        repeats.log(logging.ERROR, "a.bin: lower read at %d failed: EIO", offset)
    repeats.log(logging.ERROR, "b.bin: lower read at 0 failed: EIO")  # another file
    said = [r.getMessage() for r in caplog.records]
    assert said == ["a.bin: lower read at 0 failed: EIO", "b.bin: lower read at 0 failed: EIO"]
    clock.now = 61
    repeats.summarise()
    assert caplog.records[-1].getMessage() == (
        "99 more like this in the last 61 s, the last: a.bin: lower read at 405504 failed: EIO")
    assert caplog.records[-1].levelno == logging.ERROR
    assert len(caplog.records) == 3, "b.bin never repeated: nothing to summarise"
    clock.now = 62
    repeats.log(logging.ERROR, "a.bin: lower read at 5 failed: EIO")  # counted again
    assert len(caplog.records) == 3
    clock.now = 130
    repeats.summarise()  # a's count; b was quiet a whole period: forgotten
    assert caplog.records[-1].getMessage().startswith("1 more like this in the last 69 s")
    clock.now = 200
    repeats.summarise()  # a quiet for a whole period too
    repeats.log(logging.ERROR, "b.bin: lower read at 0 failed: EIO")
    repeats.log(logging.ERROR, "a.bin: lower read at 0 failed: EIO")
    assert [r.getMessage() for r in caplog.records[-2:]] == [
        "b.bin: lower read at 0 failed: EIO", "a.bin: lower read at 0 failed: EIO"]


@pytest.mark.unit
def test_a_repeat_past_the_period_logs_the_count_itself(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    caplog.set_level(logging.INFO, logger="test.repeats")
    clock = _Clock()
    repeats = RepeatedLog(logging.getLogger("test.repeats"), period=10, clock=clock)
    for t in range(25):
        clock.now = t
        repeats.log(logging.WARNING, "bad block %d", t)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["bad block 0", "10 more like this in the last 10 s, the last: bad block 10",
                    "10 more like this in the last 10 s, the last: bad block 20"]


@needs_fuse
@pytest.mark.mount
def test_sigusr1_writes_every_stack_to_the_log(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello")
    m = mount_factory(src)
    pid = int(pidfile_for(m.mnt).read_text())
    log = tmp_path / "fusecache.log"
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "task fusecache.mount.serve" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    text = log.read_text()
    assert "Current thread 0x" in text, "faulthandler wrote the threads"
    assert "SIGUSR1: the threads' stacks are above; the trio tasks:" in text
    assert "in _stop_on_signals" in text, "each task with the frames it waits in"
    assert (m.mnt / "f").read_bytes() == b"hello", "serving goes on"
    os.kill(pid, signal.SIGUSR1)  # and again
    deadline = time.monotonic() + 10
    while log.read_text().count("task fusecache.mount.serve") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (m.mnt / "f").read_bytes() == b"hello"


@needs_fuse
@pytest.mark.mount
def test_a_broken_lower_file_is_logged_once_per_kind(faultfs, mount_factory) -> None:
    from tests.ramp import write_ramp

    write_ramp(faultfs.backing / "a.bin", 5 * 2**20, seed=1)
    m = mount_factory(faultfs.mount)
    faultfs.set(eio="read")
    for offset in range(0, 5 * 2**20, 2**20):  # every read fails: five requests, and retries
        with open(m.mnt / "a.bin", "rb", buffering=0) as f, pytest.raises(OSError):
            os.pread(f.fileno(), 4096, offset)
    faultfs.clear()
    m.unmount()  # the counts still open are logged at unmount
    text = (m.mnt.parent / "fusecache.log").read_text()
    for who in ("fusecache.cache.flights", "fusecache.fuse_ops"):  # the fetch, the handler
        said = [line.split(f"ERROR {who}: ", 1)[1] for line in text.splitlines()
                if f"ERROR {who}: " in line]
        assert len(said) == 2, text  # the first failure in full, then the count
        assert "a.bin: lower read at 0 failed" in said[0]
        count, rest = said[1].split(" ", 1)
        assert int(count) >= 4 and rest.startswith("more like this in the last"), said
