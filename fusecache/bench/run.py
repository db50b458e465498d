"""`fusecache bench`: model switching on the plain mount, through fusecache, and direct (s3://)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import models, workload
from .common import (
    busy_cpu_seconds,
    daemon_pid,
    daemon_stats,
    direct_reclaim,
    fusecache_mount,
    proactive_reclaim,
    process_cpu_seconds,
    progress,
    timed,
)
from .report import format_diagnostics, format_ideal, format_table, plot
from .standin import BUCKET, DEFAULT_RATE_MBPS, Standin, running_standin

# Rounds of fusecache's second switches (each model's median counts). They come
# from the page cache, a few seconds a round, and one round swung by +-0.1x of
# the local loads; the plain mount's second switches cross the network, so once.
SECOND_ROUNDS = 3


@dataclass
class SwitchResult:
    model: str
    size: int
    first_s: float = 0.0
    second_s: float = 0.0  # the median of second_runs
    first_lower_bytes: int | None = None
    second_lower_bytes: int | None = None  # over every round of second switches
    second_runs: list[float] = field(default_factory=list)

    def add_second(self, seconds: float, lower_bytes: int | None) -> None:
        self.second_runs.append(seconds)
        self.second_s = statistics.median(self.second_runs)
        if lower_bytes is not None:
            self.second_lower_bytes = (self.second_lower_bytes or 0) + lower_bytes


@dataclass
class CaseResult:
    name: str
    switches: list[SwitchResult] = field(default_factory=list)
    # Bytes the fusecache daemon replied during the second switches; the rest of
    # the loads came from the kernel page cache. None for the plain case.
    daemon_served_second: int | None = None
    # Pages scanned by direct reclaim during the second switches: loads that
    # stall for memory (the stand-in's server keeps its own copy of every model
    # in the page cache, which a real OSS does not).
    direct_reclaim_second: int = 0
    # Bytes the kernel's DAMON schemes paged out during the second switches: some
    # VMs (this one: pages idle 60 s, up to 128 MiB/s) reclaim cold page cache
    # proactively, and a page paged out is a page a second switch reads again.
    proactive_reclaim_second: int = 0
    # CPU-seconds the fusecache daemon spent during the first switches and during
    # all rounds of second switches (/proc/PID/stat); None for the plain case.
    daemon_cpu_first: float | None = None
    daemon_cpu_second: float | None = None
    # CPU-seconds the whole machine was busy during the first switches, and during
    # the second switches (not the local loads timed between them): the reader,
    # the daemon, the kernel, s3fs and the S3 server together.
    machine_cpu_first: float = 0.0
    machine_cpu_second: float = 0.0

    def total(self, attr: str) -> float:
        return sum(getattr(s, attr) or 0 for s in self.switches)


@dataclass
class Ideal:
    """What the targets of read-ahead and read-once are measured against, same run.

    A first switch at best moves every byte once at the plain mount's best
    throughput, then loads from memory; a second switch at best is the same load
    from a local file in the page cache. Each local load runs right after the same
    load through fusecache, so both meet the machine in the same state (what the
    daemon holds, what the VM reclaims, the host's noise). Run as a case of its
    own at the start, the local loads gave 0.96-1.24 s over six runs, and which
    side of a target fusecache fell depended on it.
    """

    plain_best_bps: float  # the plain mount read by 4 threads at once (seq-4)
    local_root: Path
    local: CaseResult  # second switches over local files in the page cache, paired

    @property
    def total_bytes(self) -> int:
        return int(self.local.total("size"))

    @property
    def first_s(self) -> float:
        return self.total_bytes / self.plain_best_bps + self.second_s

    @property
    def second_s(self) -> float:
        return self.local.total("second_s")


def measure_ideal(plain_root: Path, local_root: Path, names: list[str]) -> Ideal:
    """The plain mount's best throughput; the local loads come later, paired (run_case)."""
    largest = max(names, key=lambda n: (local_root / n).stat().st_size)
    best = 0.0
    for _ in range(2):  # the better of two: this is the plain mount at its best
        t0 = time.perf_counter()
        got = workload.read_parallel(plain_root / largest, 4)
        best = max(best, got / (time.perf_counter() - t0))
    progress(f"plain mount, 4 readers: {best / 1e6:,.0f} MB/s over {largest}")
    local = CaseResult("local", [SwitchResult(n, (local_root / n).stat().st_size) for n in names])
    return Ideal(best, local_root, local)


def _daemon_served(mnt: Path) -> int:
    stats = daemon_stats(mnt)
    return stats["served_memory"] + stats["served_disk"] + stats["served_lower"]


def run_case(name: str, root: Path, names: list[str], counter: Callable[[], int | None],
             daemon: Path | None = None, ideal: Ideal | None = None, rounds: int = 1
             ) -> CaseResult:
    """First switch to every model in turn, then *rounds* of second switches to every model.

    *daemon* is the fusecache mount whose counters (and CPU time) to read, if
    any. With *ideal*, each second switch is followed by the same load from the
    local file, timed into ideal.local.
    """
    case = CaseResult(name)
    pid = daemon_pid(daemon) if daemon else None
    cpu_start = process_cpu_seconds(pid) if pid else 0.0
    busy_start = busy_cpu_seconds()
    for i, model in enumerate(names, 1):
        path = root / model
        r = SwitchResult(model, path.stat().st_size)
        r.first_s, r.first_lower_bytes = timed(workload.first_switch, path, counter)
        progress(f"{name}: first switch {i}/{len(names)} {model} {r.first_s:.2f} s")
        case.switches.append(r)
    cpu_first = process_cpu_seconds(pid) if pid else 0.0
    case.machine_cpu_first = busy_cpu_seconds() - busy_start
    if ideal is not None:
        for model in names:
            workload.page_in(ideal.local_root / model)
    served_before = _daemon_served(daemon) if daemon else 0
    reclaim_before, proactive_before = direct_reclaim(), proactive_reclaim()
    for round_ in range(1, rounds + 1):
        for i, r in enumerate(case.switches, 1):
            busy = busy_cpu_seconds()
            r.add_second(*timed(workload.second_switch, root / r.model, counter))
            case.machine_cpu_second += busy_cpu_seconds() - busy
            line = f"{r.second_runs[-1]:.2f} s"
            if ideal is not None:
                local = ideal.local.switches[i - 1]
                local.add_second(*timed(workload.second_switch, ideal.local_root / r.model,
                                         lambda: None))
                line += f", local {local.second_runs[-1]:.2f} s"
            progress(f"{name}: second switch {i}/{len(names)}"
                     f"{f' (round {round_}/{rounds})' if rounds > 1 else ''} {r.model} {line}")
    if daemon:
        case.daemon_served_second = _daemon_served(daemon) - served_before
    if pid:
        case.daemon_cpu_first = cpu_first - cpu_start
        case.daemon_cpu_second = process_cpu_seconds(pid) - cpu_first
    case.direct_reclaim_second = direct_reclaim() - reclaim_before
    case.proactive_reclaim_second = proactive_reclaim() - proactive_before
    return case


def run_bench(source: Path | None, names: list[str], scale: float, out_dir: Path,
              mount_options: list[str], rate_mbps: int | None = None,
              verbose: bool = False) -> int:
    """Time first and second switches on the plain mount and through fusecache; 0 if done.

    Without *source*, on the stand-in, capped at *rate_mbps* (default
    DEFAULT_RATE_MBPS), with a third case: fusecache reading the stand-in's
    server directly (s3://). *verbose* adds the diagnostics.
    """
    rate_mbps = rate_mbps or DEFAULT_RATE_MBPS
    out_dir.mkdir(parents=True, exist_ok=True)
    if not workload.steady_allocator():
        progress("no mallopt here: load times depend on the loads before them")
    with contextlib.ExitStack() as stack:
        counter: Callable[[], int | None] = lambda: None  # noqa: E731
        ideal: Ideal | None = None
        if source is None:
            # Models are written before s3fs mounts: a lookup that comes before the
            # server lists a new object can leave s3fs taking the name for a directory.
            data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fusecache-")))
            progress(f"writing {len(names)} models at scale {scale}")
            (data / BUCKET).mkdir()
            models.ensure_models(data / BUCKET, names, scale)
            os.sync()  # gigabytes of dirty pages flushing would slow the first case
            progress(f"starting the OSS stand-in (rclone serve s3 + s3fs + tc at {rate_mbps} MB/s)")
            standin: Standin = stack.enter_context(running_standin(data_dir=data,
                                                                   rate_mbps=rate_mbps))
            source, counter = standin.mount, standin.bytes_sent
            ideal = measure_ideal(source, data / BUCKET, names)
        cases = [run_case("plain", source, names, counter)]
        daemons = {}
        with fusecache_mount(source, mount_options) as mnt:
            cases.append(run_case("fusecache", mnt, names, counter, daemon=mnt, ideal=ideal,
                                  rounds=SECOND_ROUNDS))
            daemons["fusecache"] = daemon_stats(mnt)
        if ideal is not None:  # the stand-in: its server read directly
            url, options, env = standin.direct()
            with fusecache_mount(url, [*options, *mount_options], env=env) as mnt:
                cases.append(run_case("direct", mnt, names, counter, daemon=mnt,
                                      rounds=SECOND_ROUNDS))
                daemons["direct"] = daemon_stats(mnt)
    table = format_table(cases, ideal.local if ideal else None)
    if ideal is not None:
        table += "\n" + format_ideal(cases[1:], ideal)
    if verbose:
        table += "\n" + format_diagnostics(cases, daemons)
    print(table)
    result = {
        "command": " ".join(["fusecache", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "scale": scale,
        "rate_mbps": rate_mbps if ideal is not None else None,
        "cases": [{"name": c.name, "daemon_served_second": c.daemon_served_second,
                   "direct_reclaim_second": c.direct_reclaim_second,
                   "proactive_reclaim_second": c.proactive_reclaim_second,
                   "daemon_cpu_first": c.daemon_cpu_first,
                   "daemon_cpu_second": c.daemon_cpu_second,
                   "machine_cpu_first": c.machine_cpu_first,
                   "machine_cpu_second": c.machine_cpu_second,
                   "switches": [asdict(s) for s in c.switches]} for c in cases],
        "daemon_statistics": daemons,
        "ideal": None if ideal is None else {
            "plain_best_bps": ideal.plain_best_bps, "local": asdict(ideal.local),
            "first_s": ideal.first_s, "second_s": ideal.second_s},
        "table": table,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    where = (f"the OSS stand-in at {rate_mbps} MB/s" if ideal is not None else str(source))
    plot(cases, out_dir / "switching.png",
         f"Model switching on {where}, models at scale {scale:g} of their real size",
         ideal)
    progress(f"wrote {out_dir / 'result.json'} and {out_dir / 'switching.png'}")
    return 0
