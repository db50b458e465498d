"""`fusecache stats MOUNTPOINT`: what a mount's daemon has served, from where, at what cost.

The counters come from the stats xattr of the mount's root (fs/stats.py has
their names); this prints them as a short table, as one JSON object, or as
rates every few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fusecache import mounted
from fusecache.cli.common import UsageError, integer, seconds
from fusecache.config import format_size


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "stats", help="what a mount has served, from where, and what it cost",
        description="Print a fusecache mount's counters: where reads were served from "
        "(memory, disk, the lower mount), bytes read from the lower mount and saved against "
        "a plain mount, read-ahead, cache fill, errors, and the daemon's memory and CPU "
        "time. The same counters are in the xattr user.fusecache.stats of the mount's root.",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT",
                   help="a fusecache mount (or any path under one)")
    p.add_argument("--json", action="store_true",
                   help="print the counters as one JSON object (with --watch, one a line); "
                   "its keys are stable: lower_bytes, served_bytes and the rest")
    p.add_argument("--watch", type=seconds(zero_ok=False), default=None, metavar="SECONDS",
                   help="print rates every SECONDS until interrupted")
    p.add_argument("--count", type=integer(1), default=None, metavar="N",
                   help="with --watch, stop after N reports")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    if args.count is not None and args.watch is None:
        raise UsageError("--count counts the reports of --watch; give --watch too")
    try:
        mount = mounted.mount_of(args.mountpoint)
    except mounted.NotMounted as exc:
        raise UsageError(str(exc)) from None
    try:
        if args.watch is None:
            stats = mounted.read_stats(mount)
            print(json.dumps(stats, sort_keys=True) if args.json else table(mount, stats))
            return 0
        _watch(mount, args.watch, args.count, args.json)
    except mounted.NoAnswer as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "     -"


def table(mount: Path, s: dict[str, int]) -> str:
    """The counters as a short table for people."""
    served = s["served_bytes"]
    hits = s["served_memory"] + s["served_disk"]
    got = served + s["fed_bytes"]
    rows = [
        ("reads served", f"{format_size(served)} in {s['read_requests']} requests, "
         f"{_share(hits, served).strip()} from the cache"),
        *[(f"  from {tier}", f"{format_size(s[key])} {_share(s[key], served)}")
          for tier, key in (("memory", "served_memory"), ("disk", "served_disk"),
                            ("below", "served_lower"))],  # memory: what read-ahead brought too
        ("fed to page cache", format_size(s["fed_bytes"])),
        ("read from below", f"{format_size(s['lower_bytes'])} in {s['lower_reads']} reads"),
        # A plain mount reads from below every byte a reader gets; a fed page counts
        # as read once. Page-cache hits are not seen, so the saving is at least this.
        ("saved vs plain", f"at least {format_size(max(got - s['lower_bytes'], 0))} "
         "(served and fed, less read from below)"),
        ("read-ahead", f"{format_size(s['readahead_bytes'])} fetched, "
         f"{format_size(s['readahead_used_bytes'])} used "
         f"({_share(s['readahead_used_bytes'], s['readahead_bytes']).strip()})"),
        ("memory cache", f"{format_size(s['memory_used'])} of "
         f"{format_size(s['memory_capacity'])}, {s['evictions']} evictions"),
        ("disk cache", f"{format_size(s['disk_used'])} of {format_size(s['disk_capacity'])}"
         if s["disk_capacity"] else "off"),
        ("timeouts", f"{s['source_timeouts']} (failed fast: {s['source_failed_fast']}, "
         f"threads stuck: {s['abandoned_threads']})"),
        ("errors", f"lower reads {s['lower_errors']}, disk writes "
         f"{s.get('disk_write_errors', 0)}, bad disk blocks {s['validation_failures']}"),
        ("lower mount", "answering" if s["source_healthy"] else "NOT answering"),
        ("daemon RSS", format_size(s["rss_bytes"])),
        ("daemon CPU", _cpu(s)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"fusecache stats {mount}"] +
                     [f"{name:<{width}}  {value}" for name, value in rows])


def _cpu(s: dict[str, int]) -> str:
    """The daemon's CPU time, and what it cost per GB handed to the kernel (served and fed)."""
    if "cpu_ms" not in s:  # a daemon from before it was counted
        return "-"
    seconds = s["cpu_ms"] / 1000
    handed = s["served_bytes"] + s["fed_bytes"]
    if not handed:
        return f"{seconds:.1f} s"
    return f"{seconds:.1f} s, {seconds / (handed / 1e9):.2f} s per GB served and fed"


RATES = ("served_bytes", "lower_bytes", "fed_bytes", "read_requests", "cpu_ms")


def _watch(mount: Path, every: float, count: int | None, as_json: bool) -> None:
    """Print rates over each interval, *count* times or until interrupted."""
    last, at = mounted.read_stats(mount), time.monotonic()
    if not as_json:
        print(f"{'time':8}  {'served/s':>11}  {'below/s':>11}  {'fed/s':>11}  "
              f"{'reads/s':>8}  {'cache hits':>10}  {'memory':>10}  {'rss':>10}  {'cpu':>5}",
              flush=True)
    reports = 0
    while count is None or reports < count:
        time.sleep(every)
        now, at_now = mounted.read_stats(mount), time.monotonic()
        dt = at_now - at
        rate = {k: (now.get(k, 0) - last.get(k, 0)) / dt for k in RATES}
        if as_json:
            print(json.dumps({"interval": dt, **{f"{k}_per_s": v for k, v in rate.items()},
                              **now}, sort_keys=True), flush=True)
        else:
            served = now["served_bytes"] - last["served_bytes"]
            hits = (now["served_memory"] + now["served_disk"]
                    - last["served_memory"] - last["served_disk"])
            print(f"{time.strftime('%H:%M:%S'):8}  {format_size(rate['served_bytes']):>9}/s  "
                  f"{format_size(rate['lower_bytes']):>9}/s  "
                  f"{format_size(rate['fed_bytes']):>9}/s  {rate['read_requests']:8.0f}  "
                  f"{_share(hits, served):>10}  {format_size(now['memory_used']):>10}  "
                  f"{format_size(now['rss_bytes']):>10}  "
                  f"{rate['cpu_ms'] / 10:4.0f}%", flush=True)  # of one core
        last, at = now, at_now
        reports += 1
