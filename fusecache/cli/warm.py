"""`fusecache warm PATH...`: fetch files whole into their mount's cache, through its daemon.

Each file is asked for through the xattr user.fusecache.warm (fs/warming.py):
the daemon fetches it with read-once's whole-file fill and answers with its
progress, so the bytes go from the lower mount into the cache once and none of
them cross into this process. A worker per file in flight polls its xattr; a
file whose warm stops moving, or whose xattr call does not return, for twice
the daemon's --source-timeout (plus STALL_SLACK) is failed and named.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fusecache import mounted
from fusecache.cli.common import UsageError, integer
from fusecache.config import format_size
from fusecache.progress import Progress

WARM_XATTR = "user.fusecache.warm"  # fs/warming.py WARM_XATTR
# Four files at a time: each whole-file fill keeps the daemon's --parallel reads in
# flight already, so more files add little for big ones, while small ones (configs,
# tokenizers) are dominated by their open, which several at a time hide.
PARALLEL = 4
# How often a file's progress is asked: cheap for the daemon (one getxattr), and
# fine enough for a bar.
POLL = 0.2
# Seconds added to twice the daemon's --source-timeout before a warm that does not
# move is failed: room for an open and a read to time out, and for a busy daemon.
STALL_SLACK = 10.0


@dataclass
class _File:
    path: Path
    mount: Path
    size: int
    cached: int = 0
    state: str = "waiting"  # waiting, warming, cached, failed
    error: str = ""
    moved_at: float = 0.0  # when its progress last moved, or its warm began
    stall_limit: float = 2 * 30.0 + STALL_SLACK  # until the daemon says its timeout


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "warm", help="fetch files or directories whole into the cache of their mount",
        description="Fetch PATHs (files or directories under a fusecache mount) whole into "
        "the mount's cache through its daemon, each byte from the lower mount once, so the "
        "first reader finds them local. Shows progress (a bar on a terminal, lines "
        "otherwise); exits 0 once everything is cached, else 1, naming each file that "
        "failed. A set bigger than the caches is said before anything is fetched.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="a file or directory under a fusecache mount")
    p.add_argument("--parallel", type=integer(1), default=PARALLEL, metavar="N",
                   help=f"files warmed at once (default: {PARALLEL})")
    p.set_defaults(handler=main)



def main(args: argparse.Namespace) -> int:
    return warm(args.paths, args.parallel)


def warm(paths: list[Path], parallel: int = PARALLEL) -> int:
    """Warm *paths*, *parallel* files at a time, reporting on stderr; the exit code.

    Raises UsageError for a path that is not under a fusecache mount.
    """
    try:
        files = _collect(paths)
    except mounted.NotMounted as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the lower mount failed a listing or a stat
        print(f"fusecache: cannot list {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        before = {m: mounted.read_stats(m) for m in {f.mount for f in files}}
    except mounted.NoAnswer as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return 1
    _over_capacity(files, before)
    todo = [f for f in files if f.state != "failed"]
    progress = Progress(sys.stderr, sys.stderr.isatty(), sum(f.size for f in todo), "warm")
    start = time.monotonic()
    _warm_all(todo, parallel, progress)
    failed = [f for f in files if f.state != "cached"]
    try:
        moved = format_size(sum(mounted.read_stats(m)["lower_bytes"] - s["lower_bytes"]
                                for m, s in before.items()))
    except mounted.NoAnswer:  # the daemon went away meanwhile: its files are named below
        moved = "an unknown amount"
    progress.say(f"warm: {len(files) - len(failed)} of {len(files)} files cached "
                 f"({format_size(sum(f.cached for f in todo))}) in "
                 f"{time.monotonic() - start:.1f} s; {moved} read from the lower mount")
    for f in failed:
        print(f"fusecache: not cached: {f.path}: {f.error}", file=sys.stderr)
    return 1 if failed else 0


def _collect(paths: list[Path]) -> list[_File]:
    """The regular files under *paths* (links followed within their mount), each once."""
    seen: dict[str, _File] = {}
    for path in paths:
        mount = mounted.mount_of(path)
        for name in _walk(path):
            real = os.path.realpath(name)
            if real in seen or not os.path.isfile(real):
                continue
            if mounted.mount_of(Path(real)) != mount:
                raise mounted.NotMounted(f"{name} leads to {real}, outside the mount {mount}")
            seen[real] = _File(Path(name), mount, os.stat(real).st_size)
    return list(seen.values())


def _walk(path: Path) -> Iterator[str]:
    if not os.path.isdir(path):
        yield str(path)
        return
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            yield os.path.join(root, name)


def _over_capacity(files: list[_File], stats: dict[Path, dict[str, int]]) -> None:
    """Say up front when a mount's files do not fit its caches.

    The files that fit, in the order given, are warmed; the rest fail at once.
    """
    for mount, s in stats.items():
        capacity = s["cache_capacity"]
        mine = [f for f in files if f.mount == mount]
        total = sum(f.size for f in mine)
        if total <= capacity:
            continue
        room = capacity
        fits: list[_File] = []
        skipped: list[_File] = []
        for f in mine:
            if f.size <= room:
                room -= f.size
                fits.append(f)
            else:
                f.state, f.error = "failed", "does not fit in the caches with the files before it"
                skipped.append(f)
        print(f"fusecache: warm: the {len(mine)} files under {mount} take "
              f"{format_size(total)}, more than its caches keep ({format_size(capacity)}: "
              f"memory {format_size(capacity - s['disk_capacity'])} + disk "
              f"{format_size(s['disk_capacity'])}); warming {len(fits)} of them "
              f"({format_size(capacity - room)}), not the other {len(skipped)}",
              file=sys.stderr)


def _warm_all(files: list[_File], parallel: int, progress: Progress) -> None:
    """Warm every file, *parallel* at a time, drawing progress until each has ended."""
    queue = iter(files)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                f = next(queue, None)
                if f is None:
                    return
                f.state, f.moved_at = "warming", time.monotonic()
            _warm_one(f)

    for _ in range(min(parallel, len(files))):
        # Daemon threads: one stuck in a getxattr the daemon never answers must not
        # keep this process from exiting once that file is failed.
        threading.Thread(target=worker, daemon=True).start()
    reported: set[int] = set()
    while True:
        now = time.monotonic()
        for f in files:
            if f.state == "warming" and now - f.moved_at > f.stall_limit:
                _end(f, "failed", f"no progress in {f.stall_limit:.0f} s")
            if f.state in ("cached", "failed") and id(f) not in reported:
                reported.add(id(f))
                progress.say(f"warm: {f.state} {f.path} ({format_size(f.size)})"
                             + (f": {f.error}" if f.error else ""))
        done = sum(f.cached for f in files)
        if len(reported) == len(files):
            progress.close(done, f"{len(files)} file{'s' if len(files) != 1 else ''}")
            return
        progress.update(done, f"{len(reported)} of {len(files)} files")
        time.sleep(POLL / 2)


_ENDING = threading.Lock()  # a file ends once: a stall seen by the main loop or its answer


def _end(f: _File, state: str, error: str = "") -> None:
    """End a warming file as *state*, unless something ended it first."""
    with _ENDING:
        if f.state == "warming":
            f.state, f.error = state, error


def _warm_one(f: _File) -> None:
    """Ask the daemon to warm *f* and follow its progress until it has ended."""
    while f.state == "warming":
        try:
            answer = json.loads(os.getxattr(f.path, WARM_XATTR))
        except OSError as exc:
            _end(f, "failed", "this mount's daemon cannot warm files (started by an older "
                 "fusecache?)" if exc.errno in (errno.ENODATA, errno.ENOTSUP)
                 else os.strerror(exc.errno or errno.EIO))
            return
        if f.state != "warming":  # failed meanwhile: the answer came too late
            return
        f.stall_limit = 2 * float(answer["timeout"]) + STALL_SLACK
        if answer["cached"] != f.cached:
            f.cached, f.moved_at = answer["cached"], time.monotonic()
        if answer["state"] == "failed":
            _end(f, "failed", answer["error"])
        elif answer["state"] == "cached":
            f.cached = f.size
            _end(f, "cached")
        else:
            time.sleep(POLL)
