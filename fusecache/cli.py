"""The fusecache command: mount, umount."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from fusecache import __version__, blockio, cachedir, logs, metrics, statscmd, warm
from fusecache.config import (
    CacheConfig,
    KernelConfig,
    MountConfig,
    ReadaheadConfig,
    SourceConfig,
    default_cache_dir,
    format_size,
    memory_limit,
    parse_size,
)
from fusecache.daemon import (
    MountError,
    fusermount_unmount,
    is_stale_mount,
    run_daemon,
    run_foreground,
    runtime_dir,
    unmount,
)

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: one line for the user, exit code 2, nothing mounted."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, unless its help says it in words or it is an off switch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.default is True:  # an on switch
            return f"{text} (default: on)"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        try:
            impl = blockio.selected()[1]
        except blockio.NativeMissing as exc:
            impl = f"unusable: {exc}"
        print(f"fusecache {__version__} (block copy: {impl})")
        parser.exit(0)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fusecache",
        description="A read-only caching layer over a slow FUSE mount such as ossfs: "
        "large parallel read-ahead, a memory block cache, and kernel page-cache reuse.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and which block copy (C or Python) is in use")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser(
        "mount",
        help="mount SOURCE read-only at MOUNTPOINT with caching",
        description="Mount SOURCE (a directory, usually an object-store mount) read-only at "
        "MOUNTPOINT. Returns once the mount answers, leaving a daemon in the background; "
        "fails with one line and exit code 2 on bad input.",
        formatter_class=_Help,
    )
    m.add_argument("source", type=Path, help="the directory to cache (e.g. /mnt/oss)")
    m.add_argument("mountpoint", type=Path, help="an empty directory to mount at")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr instead of starting a daemon")
    m.add_argument("--mem-cache", type=_size, default=None, metavar="SIZE",
                   help="most memory for blocks the kernel page cache does not hold yet "
                   "(read-ahead, whole-file fetches; with --disk-cache 0, every block) "
                   "(default: a quarter of the container's memory limit)")
    m.add_argument("--cache-dir", type=Path, default=default_cache_dir(), metavar="DIR",
                   help="where the disk cache lives, across remounts: in DIR/"
                   f"{cachedir.SUBDIR}, which fusecache makes and tags with a CACHEDIR.TAG; "
                   "it touches nothing else in DIR, so DIR must be new, empty, or hold that "
                   "directory, and be outside SOURCE and MOUNTPOINT")
    m.add_argument("--disk-cache", type=_size, default=format_size(CacheConfig.disk_bytes),
                   metavar="SIZE",
                   help="most bytes the disk cache may hold (also at most 90%% of the free "
                   "space); 0 turns it off")
    m.add_argument("--fetch-size", type=_size, default=format_size(CacheConfig.fetch_size),
                   metavar="SIZE",
                   help="bytes per read from the lower mount (a multiple of 1 MiB)")
    m.add_argument("--parallel", type=int, default=SourceConfig.readahead_threads, metavar="N",
                   help="read-ahead reads from the lower mount in flight at once")
    m.add_argument("--source-timeout", type=_seconds, default=SourceConfig.timeout,
                   metavar="SECONDS",
                   help="bound on every call to the lower mount (open, stat, listdir, xattrs, "
                   "reads); a call that takes longer fails with EIO and marks the source "
                   "unhealthy until a probe gets an answer; cached files keep being served "
                   "meanwhile")
    m.add_argument("--read-ahead-kb", type=int, default=KernelConfig.read_ahead_kb,
                   metavar="KB", help="kernel read-ahead for the mount (needs root)")
    m.add_argument("--max-background", type=int, default=KernelConfig.max_background,
                   metavar="N", help="kernel limit on parallel background requests (needs root)")
    m.add_argument("--attr-timeout", type=float, default=KernelConfig.attr_timeout,
                   metavar="SEC", help="seconds the kernel trusts names and attributes; a "
                   "changed lower file is noticed on open or after this")
    m.add_argument("--sha256", action=argparse.BooleanOptionalAction,
                   default=ReadaheadConfig.sha256,
                   help="hash every file fetched whole as it streams, so the "
                   "user.fusecache.sha256 xattr answers at once (without it, the xattr "
                   "hashes the file from the cache when first asked); 0.6 CPU-s per GB")
    m.add_argument("--feed-page-cache", action=argparse.BooleanOptionalAction,
                   default=ReadaheadConfig.feed_page_cache,
                   help="push what a whole-file fetch brings into the kernel's page cache, so "
                   "a loader that maps the file does not ask for it fault by fault")
    m.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=None,
                   help="let other users read the mount (default: on when run as root)")
    m.add_argument("--force", action="store_true",
                   help="clear a stale mount left at MOUNTPOINT by a killed daemon")
    m.add_argument("--log-file", type=Path, default=None, metavar="FILE",
                   help=f"daemon log, rotated at {format_size(logs.LOG_BYTES)}, keeping "
                   f"{logs.LOG_FILES - 1} older files (FILE.1, ...) (default: "
                   "RUNTIME_DIR/<mountpoint>.log, printed on mount)")
    m.add_argument("--metrics", type=metrics.address, default=None, metavar="[HOST:]PORT",
                   help="serve Prometheus metrics (fusecache_*) over HTTP at HOST:PORT; a "
                   f"bare PORT is on {metrics.DEFAULT_HOST} (default: off)")
    m.add_argument("-v", "--verbose", action="store_true", help="log debug detail")

    b = sub.add_parser(
        "bench",
        help="time model switching with and without fusecache",
        description="Run the Stable Diffusion web-UI workload (sha256 then load on a first "
        "switch, load only on a second) on SOURCE_DIR and through a temporary fusecache mount "
        "over it, and print both. Without SOURCE_DIR, start a local OSS stand-in (an S3 server "
        "on loopback mounted with s3fs, bandwidth-capped) with generated models.",
        formatter_class=_Help,
    )
    b.add_argument("source", nargs="?", type=Path, default=None, metavar="SOURCE_DIR",
                   help="a directory holding the models (default: the stand-in)")
    b.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="model file names (default: the study's ten)")
    b.add_argument("--scale", type=float, default=0.02,
                   help="model size as a fraction of the real one (stand-in only)")
    b.add_argument("--rate", type=int, default=None, metavar="MB/S",
                   help="the stand-in's bandwidth cap: set it to your store's throughput to "
                   "see the network-bound case (stand-in only; needs root) (default: 400)")
    b.add_argument("--out", type=Path, default=Path("bench/out"),
                   help="where result.json and switching.png go")
    b.add_argument("--mount-option", action="append", default=[], metavar="OPT",
                   help="extra option for the fusecache mount, e.g. --mount-option=--mem-cache=2G")

    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit",
                       description="Unmount a fusecache mount and wait for its daemon to exit.")
    u.add_argument("mountpoint", type=Path)
    warm.add_parser(sub)
    statscmd.add_parser(sub)
    return parser


def check_mount_args(source: Path, mountpoint: Path, force: bool) -> None:
    """Raise UsageError for input that must not be mounted."""
    if not source.exists():
        raise UsageError(f"source {source} does not exist")
    if not source.is_dir():
        raise UsageError(f"source {source} is not a directory")
    if is_stale_mount(mountpoint):
        if not force:
            raise UsageError(
                f"{mountpoint} is a stale FUSE mount left by a dead daemon (Transport endpoint "
                f"is not connected); clear it with 'fusermount3 -uz {mountpoint}' or pass --force"
            )
        err = fusermount_unmount(mountpoint, lazy=True)
        if err is not None:
            raise UsageError(f"cannot clear the stale mount at {mountpoint}: {err}")
    if not mountpoint.exists():
        raise UsageError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise UsageError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} is already a mount point")
    src, mnt = source.resolve(), mountpoint.resolve()
    if src == mnt:
        raise UsageError("source and mountpoint are the same directory")
    if src in mnt.parents or mnt in src.parents:
        raise UsageError("source and mountpoint must not be inside one another")
    if any(os.scandir(mountpoint)):
        raise UsageError(f"mountpoint {mountpoint} is not empty")


def _setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    """Log to stderr, or for a daemon to *log_file*, capped and rotated (see logs.py)."""
    if log_file is None:
        logs.to_stderr(verbose)
    else:
        logs.to_capped_file(log_file, verbose)


def _mount(args: argparse.Namespace) -> int:
    check_mount_args(args.source, args.mountpoint, args.force)
    if args.disk_cache:
        try:
            cachedir.check(args.cache_dir, args.source, args.mountpoint)
        except cachedir.CacheDirError as exc:
            raise UsageError(str(exc)) from None
    try:
        blockio.selected()  # before forking: a missing C module is the user's one-line error
    except blockio.NativeMissing as exc:
        raise UsageError(str(exc)) from None
    config = build_config(args)
    if args.foreground:
        _setup_logging(args.verbose)
        return run_foreground(config)
    slug = str(config.mountpoint).strip("/").replace("/", "_") or "root"
    log_file = args.log_file or runtime_dir() / f"{slug}.log"
    return run_daemon(config, log_file, lambda: _setup_logging(args.verbose, log_file))


def build_config(args: argparse.Namespace) -> MountConfig:
    """The settings of a mount, from `fusecache mount`'s arguments."""
    mem = args.mem_cache if args.mem_cache is not None else memory_limit() // 4
    logging.getLogger(__name__).debug("memory cache %s", format_size(mem))
    return MountConfig(
        source=args.source.resolve(),
        mountpoint=args.mountpoint.resolve(),
        cache=replace(CacheConfig(), mem_bytes=mem, fetch_size=args.fetch_size,
                      cache_dir=args.cache_dir.resolve(), disk_bytes=args.disk_cache),
        kernel=replace(KernelConfig(), read_ahead_kb=args.read_ahead_kb,
                       max_background=args.max_background,
                       congestion_threshold=args.max_background * 3 // 4,
                       attr_timeout=args.attr_timeout, entry_timeout=args.attr_timeout),
        lower=replace(SourceConfig(), readahead_threads=args.parallel,
                      timeout=args.source_timeout),
        readahead=replace(ReadaheadConfig(), sha256=args.sha256,
                          feed_page_cache=args.feed_page_cache),
        allow_other=os.geteuid() == 0 if args.allow_other is None else args.allow_other,
        metrics=args.metrics,
    )


def _bench(args: argparse.Namespace) -> int:
    try:
        from fusecache.bench import models
        from fusecache.bench.run import run_bench
    except ImportError as exc:
        raise UsageError(f"the bench needs its extras ({exc.name} is missing): "
                         "pip install 'fusecache[bench]'") from None
    names = args.models or [name for name, _ in models.MODELS]
    if args.source is not None and not args.source.is_dir():
        raise UsageError(f"source {args.source} is not a directory")
    if args.scale <= 0:
        raise UsageError("--scale must be positive")
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be a positive number of MB/s")
    if args.rate is not None and args.source is not None:
        raise UsageError("--rate caps the stand-in; it cannot cap SOURCE_DIR")
    return run_bench(args.source, names, args.scale, args.out, args.mount_option,
                     rate_mbps=args.rate)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "command_main"):  # a command in its own module (warm, stats)
        return int(args.command_main(args))
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "umount":
            if not os.path.ismount(args.mountpoint) and not is_stale_mount(args.mountpoint):
                raise UsageError(f"{args.mountpoint} is not mounted")
            unmount(args.mountpoint)
            return 0
    except UsageError as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MountError as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")
