"""A stateful reference test: random reads, drops, remounts, rewrites and faults, all checked.

Layers: a backing directory -> faultfs (tests/faultfs.py) -> fusecache, through the CLI with a
16 MiB memory cache and a disk tier, so evictions and the disk are exercised. Both are mounted
once for the whole test; each hypothesis example starts from what the last one left (files,
caches), with every fault cleared, and ends with every file read back.

The model holds every version (ramp seed, size) each lower file has had, and each handle the
versions it may read:

- opened with no fault on, the file unchanged since: the current version only, every byte
  exact, and no error;
- opened while a fault was on (fusecache may serve the version it last knew), or when the
  daemon says it answered from what it knew (`stale_answers` grew during the open): any
  version from the one last opened cleanly to the current one, or EIO;
- once the file has changed since its open: its versions as they were, or EIO. Also, and
  counted (`old_handle_read_newer_version`): the bytes of a newer version. The page cache
  belongs to the inode, not the handle, so pages a newer handle brought in answer an older
  one too (measured: a handle opened before a rewrite reads the new bytes once a new handle
  has read them; after POSIX_FADV_DONTNEED it gets EIO from the daemon). A read is still
  one version's bytes, whole or cut short; zeros or a mix of versions fail the test. Zeros
  past the end of the version a handle opened, once the file grew, are a known fusecache
  bug: they are collected and fail the test at its end, so the run goes on meanwhile.

While a fault is on, a read gives one of the handle's versions or EIO, never other bytes.
After the faults clear and the source is healthy, every file reads back as its current
version (retried while the daemon answers from what it knew, as the README's staleness rule
allows, for at most RECOVERY_LIMIT). A hang lasts one step (`hang_episode`): the reads
during it run in a child process, each within HANG_CALL_LIMIT. Every other step runs under a
watchdog that releases faultfs and fails the test after STEP_LIMIT.

CI settings: a fixed seed (derandomize), no example database, no shrinking (each step is real
I/O; a failure prints the last steps instead), and enough examples for MIN_STEPS steps in
under two minutes on two cores.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import abort_fuse_connections, force_unmount, fusecache_cmd, needs_fuse
from tests.faultfs import FaultFSController, is_mounted
from tests.ramp import ramp, write_ramp

pytestmark = [needs_fuse, pytest.mark.mount]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SOURCE_TIMEOUT = 1.0  # fusecache --source-timeout: each hang costs about this
MAX_HANDLES = 4
MIN_STEPS = 2000
# Examples of at most STEPS_PER_EXAMPLE steps (hypothesis ends some early, when their
# choices fill its buffer); FUSECACHE_STATEFUL_EXAMPLES runs more (or fewer).
EXAMPLES = int(os.environ.get("FUSECACHE_STATEFUL_EXAMPLES", "95"))
STEPS_PER_EXAMPLE = 40
CHANGES_PER_EXAMPLE = 6  # or, always enabled, rewrites would take a tenth of the steps
STEP_LIMIT = 60.0  # seconds any one step may take before it counts as a hang
# A call during a hang answers within twice the source timeout (the kernel retries a
# read once); the rest is slack for a loaded two-core machine and the child's start.
HANG_CALL_LIMIT = 2 * SOURCE_TIMEOUT + 2.0
RECOVERY_LIMIT = 20.0  # seconds for the source to be healthy again after faults clear
# Steps between the rare, expensive rules (a remount is ~2 s, a hang ~2-3 s).
REMOUNT_EVERY, HANG_EVERY, DROP_ALL_EVERY, FAULT_GAP = 150, 200, 40, 12

# Sizes around the 1 MiB block, the 4 KiB page and 8 MiB fetch unit, and mostly not
# multiples of 4096; the biggest is more than half the memory cache.
SIZES = [0, 1, 4095, 4096, 5000, MiB - 1, MiB, MiB + 1, 2 * MiB + 4097, 3 * MiB + 12345,
         6 * MiB + 777, 9 * MiB + 3]
INITIAL = {"empty.bin": 0, "small.bin": 5000, "block.bin": MiB, "odd.bin": 2 * MiB + 4097,
           "sub/mid.bin": 3 * MiB + 12345, "big.bin": 6 * MiB + 777}
NAMES = sorted(INITIAL)
READ_SIZES = [1, 7, 4096, 4097, 65536, 128 * 1024 + 5, MiB - 3, MiB, MiB + 1, 3 * MiB + 1]
FAULTS: dict[str, dict[str, Any]] = {
    "eio_read": {"eio": "read"},
    "eio_all": {"eio": "all"},
    "enotconn": {"enotconn": True},
    "short": {"short_reads": True},
    "slow": {"read_delay": 0.002},
    "slower": {"read_delay": 0.02},  # an 8 MiB fetch then takes longer than the timeout
    "short_slow": {"short_reads": True, "read_delay": 0.005},
    "eio_read_short": {"eio": "read", "short_reads": True},
}

T = TypeVar("T")


# --- the model ----------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    seed: int
    size: int
    stat: tuple[int, int, int]  # (size, mtime_ns, ctime_ns) of the backing file

    def bytes_at(self, offset: int, size: int) -> bytes:
        return ramp(offset, max(0, min(size, self.size - offset)), self.seed)


@dataclass
class LowerModel:
    versions: list[Version]
    floor: int = 0  # the version last opened cleanly: fusecache knows none older

    @property
    def current(self) -> int:
        return len(self.versions) - 1


@dataclass
class Handle:
    name: str
    fd: int | None  # None: the open failed (under a fault)
    lo: int  # the versions it may read: lo..hi
    hi: int
    direct: bool  # O_DIRECT: reads bypass the page cache and reach the daemon


def which_words(data: bytes, offset: int) -> str:
    """Name what *data*, read at *offset*, holds: the seed and position of its first words."""
    start = (-offset) % 8
    head = data[start:start + 32]
    words = np.frombuffer(head[:len(head) // 8 * 8], dtype="<u8")
    return ", ".join(f"seed {int(w) >> 40} word@{(int(w) & ((1 << 40) - 1)) * 8}"
                     for w in words[:4]) or repr(data[:16])


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    ne = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
    return int(np.argmax(ne)) if ne.any() else n


def matching(data: bytes, offset: int, size: int, versions: list[Version],
             candidates: range) -> list[int]:
    return [i for i in candidates if data == versions[i].bytes_at(offset, size)]


# --- the world: mounts, files and faults, shared by every example ---------------------


class World:
    """The backing files, faultfs and the fusecache mount, and the counters of the run."""

    def __init__(self, tmp: Path, faultfs: FaultFSController):
        self.tmp = tmp
        self.fs = faultfs
        self.backing, self.lower = faultfs.backing, faultfs.mount
        self.mnt, self.cache = tmp / "mnt", tmp / "cache"
        self.log = tmp / "fusecache.log"
        self.mnt.mkdir()
        help_text = fusecache_cmd("mount", "--help").stdout
        self.has_source_timeout = "--source-timeout" in help_text
        self.files: dict[str, LowerModel] = {}
        self.handles: list[Handle] = []
        self.faults: dict[str, Any] = {}
        self.next_seed = 1
        self.step = 0
        self.last: Counter[str] = Counter()  # step at which each rare rule last ran
        self.counts: Counter[str] = Counter()
        self.times: dict[str, float] = {}
        self.longest_hang_call = 0.0
        self.trace: deque[str] = deque(maxlen=60)
        self.failure: str | None = None
        self.failure_trace: list[str] = []
        self.defects: list[str] = []  # wrong bytes of a known kind: they fail the test at its end
        self.stuck: list[str] = []
        self._watchdog: threading.Timer | None = None
        self._abort: threading.Timer | None = None
        (self.backing / "sub").mkdir()
        for name, size in INITIAL.items():
            self.files[name] = LowerModel([self._write(name, size, None, False)])
        self.mount()

    # --- the lower files -----------------------------------------------------------

    def _write(self, name: str, size: int, how: str | None, keep_mtime: bool) -> Version:
        """Write a new version of a backing file in place (same inode), with a new seed."""
        path = self.backing / name
        seed, self.next_seed = self.next_seed, self.next_seed + 1
        old = os.stat(path) if how is not None else None
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if how in (None, "truncate") else 0)
        fd = os.open(path, flags, 0o644)
        try:
            for off in range(0, size, 4 * MiB):
                os.pwrite(fd, ramp(off, min(4 * MiB, size - off), seed), off)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        if old is not None:
            assert os.stat(path).st_ino == old.st_ino
        if keep_mtime and old is not None:
            os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
        st = os.stat(path)
        seen = {v.stat for v in self.files[name].versions} if name in self.files else set()
        # Two versions with one (size, mtime, ctime) cannot be told apart by anyone: a
        # clock tick apart they can. Not expected with fine-grained ctimes; counted.
        while (st.st_size, st.st_mtime_ns, st.st_ctime_ns) in seen:
            self.counts["ctime_collisions"] += 1
            time.sleep(0.005)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            st = os.stat(path)
        return Version(seed, size, (st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    def change(self, name: str, size: int | None, how: str, keep_mtime: bool) -> None:
        f = self.files[name]
        new_size = f.versions[-1].size if size is None else size
        f.versions.append(self._write(name, new_size, how, keep_mtime))
        self.counts["changes"] += 1

    # --- fusecache -----------------------------------------------------------------

    def mount(self) -> subprocess.CompletedProcess[str]:
        options = ["--cache-dir", str(self.cache), "--log-file", str(self.log),
                   "--attr-timeout", "0", "--mem-cache", "16M", "--disk-cache", "256M"]
        if self.has_source_timeout:
            options += ["--source-timeout", str(SOURCE_TIMEOUT)]
        res = fusecache_cmd("mount", str(self.lower), str(self.mnt), *options)
        if res.returncode == 0:
            for f in self.files.values():  # a new daemon knows no version yet
                f.floor = f.current
        return res

    def unmount(self) -> None:
        start = time.monotonic()
        res = fusecache_cmd("umount", str(self.mnt))
        took = time.monotonic() - start
        assert res.returncode == 0 and not is_mounted(self.mnt), res.stderr
        assert took < 15, f"umount took {took:.1f} s"

    def stats(self) -> dict[str, int]:
        return json.loads(os.getxattr(self.mnt, "user.fusecache.stats"))

    def path(self, name: str) -> Path:
        return self.mnt / name

    @property
    def clean(self) -> bool:
        return not self.faults

    def set_faults(self, switches: dict[str, Any]) -> None:
        self.faults = dict(switches)
        self.fs.clear()
        self.fs.set(**switches)

    def clear_faults(self) -> None:
        """Every fault off, and wait until fusecache's source is healthy again."""
        self.fs.clear()
        was, self.faults = self.faults, {}
        deadline = time.monotonic() + RECOVERY_LIMIT
        assert self.fs.wait_counters(lambda c: c["hung"] == 0, RECOVERY_LIMIT), \
            f"faultfs still has operations hung {RECOVERY_LIMIT} s after clearing {was}"
        while True:
            try:
                stats: dict[str, Any] = self.stats()
            except OSError as exc:
                stats = {"errno": exc.errno}
            if stats.get("source_healthy", 1) == 1 and "errno" not in stats:
                return
            assert time.monotonic() < deadline, \
                f"not healthy {RECOVERY_LIMIT} s after clearing {was}: {stats}"
            time.sleep(0.05)

    def close_handles(self) -> None:
        for h in self.handles:
            if h.fd is not None:
                os.close(h.fd)
        self.handles.clear()

    # --- checks ----------------------------------------------------------------------

    def fail(self, message: str) -> None:
        message = f"step #{self.step} at {time.strftime('%H:%M:%S')}: {message}"
        if self.failure is None:
            self.failure, self.failure_trace = message, list(self.trace)
        raise AssertionError(message)

    def check_read(self, h: Handle, offset: int, size: int, data: bytes | None,
                   error: OSError | None, how: str) -> None:
        """Check one read of handle *h* against the model (see the module's docstring)."""
        f = self.files[h.name]
        self.counts["reads"] += 1
        what = f"{how} {h.name} fd {h.fd} [{offset}, +{size}) versions {h.lo}..{h.hi}/{f.current}"
        may_fail = not self.clean or h.lo < f.current
        if error is not None:
            self.counts["read_errors"] += 1
            if error.errno != errno.EIO:
                self.fail(f"{what}: {error!r}, not EIO")
            if not may_fail:
                self.fail(f"{what}: {error!r} with no fault on and the file unchanged; "
                          f"stats {self._stats_or_errno()}")
            return
        assert data is not None
        self.counts["bytes_checked"] += len(data)
        if matching(data, offset, size, f.versions, range(h.lo, h.hi + 1)):
            return
        if h.lo < f.current:
            # A handle whose file may have changed since its open: the kernel's page
            # cache is the inode's, not the handle's, so pages a newer handle brought in
            # answer this one too, and a page the daemon refuses (EIO: not the version
            # opened) ends the read short. Each read is still one version's bytes.
            # An fd on a file that grew reads the new bytes past the old end, as on any
            # file system: a newer version, whole or cut short, is still one version.
            for i in range(h.lo, f.current + 1):
                if data == f.versions[i].bytes_at(offset, size)[:len(data)]:
                    if i > h.hi:
                        self.counts["old_handle_read_newer_version"] += 1
                    if len(data) < len(f.versions[i].bytes_at(offset, size)):
                        self.counts["old_handle_short_read"] += 1
                    return
        newer = matching(data, offset, size, f.versions, range(h.hi + 1, f.current + 1))
        expect = f.versions[h.hi].bytes_at(offset, size)
        diff = first_difference(data, expect)
        zeros = diff == len(expect) < len(data) and not any(data[diff:])
        message = (f"{what}: WRONG BYTES: got {len(data)} bytes, want {len(expect)} of "
                   f"version {h.hi} (seed {f.versions[h.hi].seed}); first difference at file "
                   f"offset {offset + diff}: {which_words(data[diff:], offset + diff)}"
                   + (f"; they are newer version(s) {newer}" if newer else "")
                   + f"; faults {self.faults}")
        if zeros and h.hi < f.current and not h.direct:
            # A known fusecache bug, not yet fixed: the file grew since this handle's open,
            # the daemon answered a read past the old version's end short, and the kernel,
            # whose size is the new one, filled the rest with zeros. Failed at the end of
            # the test, so that the rest of the run still looks for other faults.
            self.counts["old_handle_zeros_past_its_version"] += 1
            self.defects.append(f"step #{self.step}: {message}; ZEROS past the end of the "
                                "handle's version")
            return
        self.fail(message)

    def _stats_or_errno(self) -> object:
        try:
            return self.stats()
        except OSError as exc:
            return exc

    def verify_all(self) -> None:
        """Every file reads back as its current version, opened now (no fault is on).

        While the daemon says it answered from what it knew (`stale_answers` grew: calls
        made during a fault may still be under way, see README's staleness rule), the
        read may be of a version it knew, and is tried again until RECOVERY_LIMIT.
        """
        assert self.clean
        for name, f in self.files.items():
            v = f.versions[-1]
            deadline = time.monotonic() + RECOVERY_LIMIT
            while True:
                before = self.stats()
                data, error = None, None
                try:
                    data = self.path(name).read_bytes()
                except OSError as exc:
                    error = exc
                self.counts["verify_reads"] += 1
                if data == v.bytes_at(0, v.size):
                    break
                stale = self.stats()["stale_answers"] != before["stale_answers"]
                if stale and time.monotonic() < deadline and (
                        error is not None or (data is not None and matching(
                            data, 0, 1 << 40, f.versions, range(f.floor, f.current)))):
                    self.counts["verify_stale_retries"] += 1
                    time.sleep(0.05)
                    continue
                h = Handle(name, -1, f.current, f.current, False)
                try:
                    self.check_read(h, 0, v.size, data, error, "recovery read")
                except AssertionError:
                    self.failure = f"{self.failure}; stale {stale}; {self._news(before)}"
                    raise
            f.floor = f.current

    def _news(self, before: dict[str, int]) -> str:
        """What changed in the stats since *before*, and the daemon's last log lines."""
        after = self._stats_or_errno()
        diff: dict[str, object]
        if isinstance(after, dict):
            keys = ("source_healthy", "source_timeouts", "source_failed_fast",
                    "abandoned_threads", "stale_answers", "lower_errors")
            diff = {k: (before.get(k), after.get(k)) for k in keys}
        else:
            diff = {"stats": after}
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-12:]
        except OSError:
            lines = []
        return f"stats (before, after): {diff}; daemon log ends:\n    " + "\n    ".join(lines)

    # --- steps -----------------------------------------------------------------------

    def begin(self, what: str) -> float:
        self.step += 1
        self.counts["steps"] += 1
        self.trace.append(f"#{self.step} {what} (faults {self.faults or '-'}, "
                          f"handles {[(h.name, h.fd, h.lo, h.hi) for h in self.handles]})")
        self._watchdog = threading.Timer(STEP_LIMIT, self._stuck, [what])
        self._watchdog.daemon = True
        self._watchdog.start()
        return time.monotonic()

    def end(self, kind: str, start: float) -> None:
        assert self._watchdog is not None
        self._watchdog.cancel()
        if self._abort is not None:
            self._abort.cancel()
        self.times[kind] = self.times.get(kind, 0.0) + time.monotonic() - start
        self.counts[f"rule:{kind}"] += 1
        if self.stuck:
            self.fail(f"step hung for more than {STEP_LIMIT} s: {self.stuck}")

    def _stuck(self, what: str) -> None:
        """The watchdog: a step hangs. Release faultfs, so the step ends and fails; if it
        still hangs (in fusecache itself), abort the FUSE connections so the test ends."""
        self.stuck.append(what)
        self.fs.clear()
        self._abort = threading.Timer(30, abort_fuse_connections, [self.tmp])
        self._abort.daemon = True
        self._abort.start()

    def close(self) -> None:
        """Leave nothing behind: handles closed, fusecache unmounted (faultfs: its fixture)."""
        for timer in (self._watchdog, self._abort):
            if timer is not None:
                timer.cancel()
        self.fs.clear()
        for h in self.handles:
            try:
                if h.fd is not None:
                    os.close(h.fd)
            except OSError:
                pass
        self.handles.clear()
        if is_mounted(self.mnt):
            fusecache_cmd("umount", str(self.mnt))
        force_unmount(self.mnt)


def step(fn: Callable[..., T]) -> Callable[..., T]:
    """Count a rule as a step, trace it with its arguments, and time it under the watchdog."""

    @functools.wraps(fn)
    def run(self: StatefulMachine, **kwargs: Any) -> T:
        w = self.w
        if w.failure is not None:  # hypothesis replays the failing example: leave all as is
            return None  # type: ignore[return-value]
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        self.n += 1
        start = w.begin(f"{fn.__name__}({args})")
        try:
            return fn(self, **kwargs)
        except BaseException as exc:
            if w.failure is None:
                w.failure, w.failure_trace = repr(exc), list(w.trace)
            raise
        finally:
            w.end(fn.__name__, start)

    return run


# --- the hang probe: a child process (a read may block for as long as the hang) ----------


def probe_main(spec: dict[str, Any]) -> None:
    """Open each file and read it whole in chunks; one JSON line per call, with its time."""
    for item in spec["files"]:
        path, versions = item["path"], [Version(s, n, (0, 0, 0)) for s, n in item["versions"]]
        start = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            print(json.dumps({"op": "open", "path": path, "t": time.monotonic() - start,
                              "errno": exc.errno}), flush=True)
            continue
        print(json.dumps({"op": "open", "path": path, "t": time.monotonic() - start}),
              flush=True)
        size = max(v.size for v in versions)
        for off in range(0, size + 1, spec["chunk"]):
            start = time.monotonic()
            out: dict[str, Any] = {"op": "read", "path": path, "off": off}
            try:
                data = os.pread(fd, spec["chunk"], off)
            except OSError as exc:
                out["errno"] = exc.errno
            else:
                out["match"] = matching(data, off, spec["chunk"], versions, range(len(versions)))
                out["len"] = len(data)
                if not out["match"]:
                    out["words"] = which_words(data, off)
            out["t"] = time.monotonic() - start
            print(json.dumps(out), flush=True)
        os.close(fd)


def run_probe(spec: dict[str, Any], limit: float
              ) -> tuple[list[dict[str, Any]], bool, subprocess.Popen[str], str]:
    """Run probe_main in a child: its results, whether it ended within *limit* s, it, its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_stateful", json.dumps(spec)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit)
        ended = True
    except subprocess.TimeoutExpired:  # it dies once what it waits on answers
        proc.kill()
        ended = False
        out, err = "", ""
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results, ended, proc, err


# --- the machine --------------------------------------------------------------------

# Where a read starts: a fraction of the file (in 1/1000), near a block boundary, or near EOF.
where = st.one_of(
    st.tuples(st.just("frac"), st.integers(0, 1000)),
    st.tuples(st.just("block"), st.integers(0, 10), st.integers(-4100, 4100)),
    st.tuples(st.just("eof"), st.integers(-5000, 9000)),
)
read_size = st.one_of(st.sampled_from(READ_SIZES), st.integers(1, 3 * MiB))
slot = st.integers(0, MAX_HANDLES - 1)
name = st.sampled_from(NAMES)


def offset_in(size: int, at: tuple[Any, ...]) -> int:
    if at[0] == "frac":
        return size * at[1] // 1000
    if at[0] == "block":
        return max(0, at[1] * MiB + at[2])
    return max(0, size + at[1])


class StatefulMachine(RuleBasedStateMachine):
    world: World  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.w = self.world
        # Preconditions may look only at what this example did (hypothesis replays
        # prefixes of examples and requires the same rules to be enabled); the
        # budgets of the whole run are checked inside the rules.
        self.n = 0  # steps run in this example
        self.clean_since = 0  # the step at which faults were last cleared
        self.dropped_all_at = -DROP_ALL_EVERY
        self.remounted = self.hung = False
        self.changes = 0

    @initialize(names=st.lists(name, min_size=1, max_size=2))
    def start_clean(self, names: list[str]) -> None:
        """No fault on, whatever the last example left, and a handle or two to read with."""
        w = self.w
        if w.failure is not None:
            return
        w.close_handles()
        w.counts["examples"] += 1
        w.trace.append(f"--- example {w.counts['examples']}: opens {names}")
        w.clear_faults()
        if not is_mounted(w.mnt):
            res = w.mount()
            assert res.returncode == 0, res.stderr
        for n in names:
            self._open(n, direct=False)

    def teardown(self) -> None:
        w = self.w
        if w.failure is not None:  # leave the rest to the test's cleanup
            w.close_handles()
            return
        w.clear_faults()
        w.verify_all()
        w.close_handles()

    def _handle(self, i: int) -> Handle:
        return self.w.handles[i % len(self.w.handles)]

    def _clear_faults(self) -> None:
        self.w.clear_faults()
        self.clean_since = self.n

    # --- handles -----------------------------------------------------------------

    @precondition(lambda self: len(self.w.handles) < MAX_HANDLES)
    @rule(name=name, direct=st.sampled_from([False, False, False, True]))
    @step
    def open(self, name: str, direct: bool) -> None:
        self._open(name, direct)

    def _open(self, name: str, direct: bool) -> None:
        # A handle that failed to open is kept too (reads skip it), so the rules
        # enabled next do not depend on the outcome.
        self.w.handles.append(self._new_handle(name, direct))

    def _new_handle(self, name: str, direct: bool) -> Handle:
        w, f = self.w, self.w.files[name]
        before = w.stats()["stale_answers"] if w.clean else None
        try:
            fd = os.open(w.path(name), os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            w.counts["open_errors"] += 1
            if w.clean:
                w.fail(f"open {name} with no fault on: {exc!r}")
            return Handle(name, None, f.current, f.current, direct)
        stale = before is None or w.stats()["stale_answers"] != before
        if w.clean and stale:
            w.counts["stale_clean_opens"] += 1
        if stale:
            return Handle(name, fd, f.floor, f.current, direct)
        f.floor = f.current
        return Handle(name, fd, f.current, f.current, direct)

    @precondition(lambda self: self.w.handles)
    @rule(i=slot)
    @step
    def close(self, i: int) -> None:
        h = self.w.handles.pop(i % len(self.w.handles))
        if h.fd is not None:
            os.close(h.fd)

    def _size(self, h: Handle) -> int:
        f = self.w.files[h.name]
        return max(f.versions[h.hi].size, f.versions[-1].size)

    def _pread(self, h: Handle, offset: int, size: int, how: str) -> None:
        if h.fd is None:
            return
        data, error = None, None
        try:
            if how.startswith("pread"):
                data = os.pread(h.fd, size, offset)
            else:
                os.lseek(h.fd, offset, os.SEEK_SET)
                data = os.read(h.fd, size)
        except OSError as exc:
            error = exc
        self.w.check_read(h, offset, size, data, error, how)

    @precondition(lambda self: self.w.handles)
    @rule(i=slot, reads=st.lists(st.tuples(where, read_size), min_size=1, max_size=3))
    @step
    def pread(self, i: int, reads: list[tuple[tuple[Any, ...], int]]) -> None:
        h = self._handle(i)
        for at, size in reads:
            self._pread(h, offset_in(self._size(h), at), size, "pread")

    @precondition(lambda self: self.w.handles)
    @rule(i=slot, at=where, size=read_size)
    @step
    def seek_read(self, i: int, at: tuple[Any, ...], size: int) -> None:
        h = self._handle(i)
        self._pread(h, offset_in(self._size(h), at), size, "seek+read")

    @precondition(lambda self: self.w.handles)
    @rule(i=slot, chunk=st.sampled_from([4096, 128 * 1024, MiB, 4 * MiB]),
          count=st.integers(1, 6))
    @step
    def read_on(self, i: int, chunk: int, count: int) -> None:
        """Read on from the handle's position: sequential, so read-ahead and read-once fire."""
        h = self._handle(i)
        if h.fd is None:
            return
        for _ in range(count):
            offset = os.lseek(h.fd, 0, os.SEEK_CUR)
            self._pread(h, offset, chunk, "read on")

    @precondition(lambda self: self.w.handles)
    @rule(i=slot)
    @step
    def read_whole(self, i: int) -> None:
        h = self._handle(i)
        size = self._size(h)
        for offset in range(0, size + 1, MiB):
            self._pread(h, offset, MiB, "pread (whole)")

    # --- the kernel's caches ---------------------------------------------------------

    @rule(name=name, own=st.booleans(), at=where, size=read_size)
    @step
    def drop_file_pages(self, name: str, own: bool, at: tuple[Any, ...], size: int) -> None:
        """posix_fadvise DONTNEED on a handle's fd, or on a new one (whose open may see a
        change), then a read through it (from the daemon's memory or disk)."""
        mine = next((h for h in self.w.handles if h.name == name and h.fd is not None), None)
        h = mine if own and mine is not None else self._new_handle(name, direct=False)
        if h.fd is None:
            return
        try:
            os.posix_fadvise(h.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._pread(h, offset_in(self._size(h), at), size, "pread (dropped)")
        finally:
            if h is not mine:
                os.close(h.fd)

    @precondition(lambda self: self.n - self.dropped_all_at >= DROP_ALL_EVERY // 2)
    @rule()
    @step
    def drop_all_caches(self) -> None:
        """echo 3 > drop_caches (the kernel also forgets fusecache's inodes), at most every
        DROP_ALL_EVERY steps of the run: it is the whole machine's page cache."""
        w = self.w
        self.dropped_all_at = self.n
        if w.step - w.last["drop_all"] < DROP_ALL_EVERY:
            return
        w.last["drop_all"] = w.step
        w.counts["drop_caches"] += 1
        Path("/proc/sys/vm/drop_caches").write_text("3")

    # --- the lower files -----------------------------------------------------------

    @precondition(lambda self: self.changes < CHANGES_PER_EXAMPLE)
    @rule(name=name, size=st.one_of(st.none(), st.sampled_from(SIZES)),
          how=st.sampled_from(["overwrite", "truncate"]), keep_mtime=st.booleans())
    @step
    def change(self, name: str, size: int | None, how: str, keep_mtime: bool) -> None:
        """Rewrite a lower file in place: same size or not, its old mtime put back or not."""
        self.changes += 1
        self.w.change(name, size, how, keep_mtime)

    # --- faults ----------------------------------------------------------------------

    @precondition(lambda self: self.w.clean and self.n - self.clean_since >= FAULT_GAP)
    @rule(kind=st.sampled_from(sorted(FAULTS)))
    @step
    def fault_on(self, kind: str) -> None:
        self.w.set_faults(FAULTS[kind])
        self.w.counts[f"fault:{kind}"] += 1

    @precondition(lambda self: not self.w.clean)
    @rule()
    @step
    def fault_off(self) -> None:
        """Clear the faults; once the source is healthy, every file must read back right."""
        self._clear_faults()
        self.w.verify_all()

    @precondition(lambda self: self.w.has_source_timeout and self.w.clean and not self.hung)
    @rule(kind=st.sampled_from(["read", "all"]), names=st.lists(name, min_size=1, max_size=2,
                                                                unique=True),
          fresh_size=st.sampled_from(SIZES[5:]))
    @step
    def hang_episode(self, kind: str, names: list[str], fresh_size: int) -> None:
        """Hang the lower mount (reads, or every call); a child reads while it hangs; then
        clear and check recovery. The child also reads a file new to fusecache, which
        nothing can have cached, so some calls wait out the source timeout.

        At most once every HANG_EVERY steps of the run: each costs about the source timeout.
        """
        w = self.w
        self.hung = True
        self.clean_since = self.n  # as the hang's end would, so the rules enabled next agree
        if w.step - w.last["hang"] < HANG_EVERY:
            return
        w.last["hang"] = w.step
        w.counts[f"hang:{kind}"] += 1
        fresh, seed = f"fresh{w.step}.bin", w.next_seed
        w.next_seed += 1
        write_ramp(w.backing / fresh, fresh_size, seed)
        spec = {"chunk": MiB, "files": [
            {"path": str(w.path(fresh)), "versions": [(seed, fresh_size)]},
            *({"path": str(w.path(n)),
               "versions": [(v.seed, v.size) for v in w.files[n].versions[w.files[n].floor:]]}
              for n in names)]}
        calls = sum(2 + max(v.size for v in w.files[n].versions) // MiB for n in names)
        calls += 2 + fresh_size // MiB
        w.set_faults({"hang": kind})
        try:
            results, ended, proc, err = run_probe(spec, HANG_CALL_LIMIT * calls + 2)
        finally:
            self._clear_faults()
            os.unlink(w.backing / fresh)
        if not ended:
            proc.wait(timeout=30)
            w.fail(f"hang={kind}: the reader in a child did not finish within "
                   f"{HANG_CALL_LIMIT * calls + 2:.0f} s")
        assert proc.returncode == 0, err[-2000:]
        for r in results:
            w.longest_hang_call = max(w.longest_hang_call, r["t"])
            if r["t"] > HANG_CALL_LIMIT:
                w.fail(f"hang={kind}: {r} took {r['t']:.1f} s (limit {HANG_CALL_LIMIT} s)")
            if "errno" in r:
                w.counts["hang_errors"] += 1
                if r["errno"] != errno.EIO:
                    w.fail(f"hang={kind}: {r}: errno {r['errno']}, not EIO")
            elif r["op"] == "read":
                w.counts["hang_reads_ok"] += 1
                if not r["match"]:
                    w.fail(f"hang={kind}: WRONG BYTES in {r}")
        w.verify_all()

    # --- remounts ----------------------------------------------------------------------

    @precondition(lambda self: not self.remounted)
    @rule(name=st.one_of(st.none(), name), size=st.one_of(st.none(), st.sampled_from(SIZES)))
    @step
    def remount(self, name: str | None, size: int | None) -> None:
        """Close every handle, unmount with the CLI (faults may be on) and mount again on the
        same cache dir, so the disk tier carries over; while unmounted, maybe change a file.

        Ends with no fault on. At most once every REMOUNT_EVERY steps of the run (~2 s
        each); otherwise only the handles are closed and the faults cleared.
        """
        w = self.w
        self.remounted = True
        w.close_handles()
        if w.step - w.last["remount"] < REMOUNT_EVERY:
            self._clear_faults()
            return
        w.last["remount"] = w.step
        if w.faults:
            w.counts["unmount_under_fault"] += 1
        w.unmount()
        if name is not None:
            w.change(name, size, "overwrite", keep_mtime=True)
        res = w.mount()
        if res.returncode != 0:
            if w.clean:
                w.fail(f"mount with no fault on: {res.stderr}")
            w.counts["mount_failed_under_fault"] += 1
            w.fs.clear()
            res = w.mount()
            assert res.returncode == 0, res.stderr
        self._clear_faults()
        w.counts["remounts"] += 1


# FUSECACHE_STATEFUL_SEED=N runs another sequence than CI's fixed one.
SEED = os.environ.get("FUSECACHE_STATEFUL_SEED")
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS_PER_EXAMPLE,
    deadline=None,
    derandomize=SEED is None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


def test_stateful_reference(faultfs: FaultFSController, tmp_path: Path) -> None:
    start = time.monotonic()
    world = World(tmp_path, faultfs)
    StatefulMachine.world = world
    if SEED is not None:
        StatefulMachine._hypothesis_internal_use_seed = int(SEED)  # type: ignore[attr-defined]
    try:
        try:
            run_state_machine_as_test(StatefulMachine, settings=SETTINGS)
        except BaseException as exc:
            if world.failure is None:
                raise
            trace = "\n  ".join(world.failure_trace)
            raise AssertionError(f"{world.failure}\nlast steps:\n  {trace}") from exc
        world.clear_faults()
        world.close_handles()
        world.verify_all()
    finally:
        world.close()
    took = time.monotonic() - start
    summary = {"seconds": round(took, 1), **world.counts,
               "longest_hang_call_s": round(world.longest_hang_call, 2),
               "seconds_by_rule": {k: round(v, 1) for k, v in
                                   sorted(world.times.items(), key=lambda kv: -kv[1])}}
    print(f"\nstateful: {json.dumps(summary)}")
    assert not world.defects, "\n".join(world.defects[:5])
    # Hypothesis runs a few short examples among the full ones.
    assert world.counts["steps"] >= min(MIN_STEPS, EXAMPLES * STEPS_PER_EXAMPLE * 0.7), summary


if __name__ == "__main__":
    probe_main(json.loads(sys.argv[1]))
