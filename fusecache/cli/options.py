"""The mount options shared by `mount` and `run`: their arguments, their checks, and the
settings (MountConfig) they make.

Each is also read from FUSECACHE_<OPTION> (common.CommandParser), so an option
added here is settable from a platform's console without further work.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from pathlib import Path

from fusecache import cachedir, logs, metrics
from fusecache.cache.slots import UNIT
from fusecache.cli.common import UsageError, integer, seconds, size
from fusecache.config import (
    CacheConfig,
    KernelConfig,
    MountConfig,
    ReadaheadConfig,
    SourceConfig,
    default_cache_dir,
    format_size,
    memory_limit,
)
from fusecache.daemon import runtime_dir, runtime_dir_problem
from fusecache.objectstore import options as store_options
from fusecache.objectstore.location import LocationError, StoreLocation

BLOCK = CacheConfig.block_size
# Four blocks: a kernel read touches at most two, and read-ahead needs room for
# one fetch beside them; the tests run as small as this, nothing smaller is tried.
MIN_MEM_CACHE = 4 * BLOCK
# One disk-tier file (UNIT blocks): a smaller disk cache could not hold one.
MIN_DISK_CACHE = UNIT * BLOCK
# The FUSE protocol carries max_background as a 16-bit number.
MAX_BACKGROUND = 65535
FUSE_CONF = Path("/etc/fuse.conf")


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """The options of a mount; `mount` and `run` both take them."""
    m = parser.add_argument_group("mount options")
    m.add_argument("--mem-cache", type=size(MIN_MEM_CACHE), default=None, metavar="SIZE",
                   help="most memory for blocks the kernel page cache does not hold yet "
                   "(read-ahead, whole-file fetches; with --disk-cache 0, every block) "
                   "(default: a quarter of the container's memory limit)")
    m.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="where the disk cache lives, across remounts: in DIR/"
                   f"{cachedir.SUBDIR}, which fusecache makes and tags with a CACHEDIR.TAG; "
                   "it touches nothing else in DIR, so DIR must be new, empty, or hold that "
                   "directory, and be outside SOURCE and MOUNTPOINT "
                   f"(default: {default_cache_dir()})")
    m.add_argument("--disk-cache", type=size(MIN_DISK_CACHE, zero_ok=True),
                   default=format_size(CacheConfig.disk_bytes), metavar="SIZE",
                   help="most bytes the disk cache may hold (also at most 90%% of the free "
                   "space); 0 turns it off")
    m.add_argument("--fetch-size", type=size(BLOCK, multiple=BLOCK),
                   default=format_size(CacheConfig.fetch_size), metavar="SIZE",
                   help="bytes per read from the lower mount (a multiple of 1 MiB)")
    m.add_argument("--parallel", type=integer(1), default=SourceConfig.readahead_threads,
                   metavar="N", help="read-ahead reads from the lower mount in flight at once")
    m.add_argument("--source-timeout", type=seconds(zero_ok=False), default=SourceConfig.timeout,
                   metavar="SECONDS",
                   help="bound on every call to the lower mount (open, stat, listdir, xattrs, "
                   "reads); a call that takes longer fails with EIO and marks the source "
                   "unhealthy until a probe gets an answer; cached files keep being served "
                   "meanwhile")
    m.add_argument("--read-ahead-kb", type=integer(0), default=KernelConfig.read_ahead_kb,
                   metavar="KB", help="kernel read-ahead for the mount (needs root)")
    m.add_argument("--max-background", type=integer(1, MAX_BACKGROUND),
                   default=KernelConfig.max_background, metavar="N",
                   help="kernel limit on parallel background requests")
    m.add_argument("--attr-timeout", type=seconds(zero_ok=True),
                   default=KernelConfig.attr_timeout, metavar="SEC",
                   help="seconds the kernel trusts names and attributes; a changed lower file "
                   "is noticed on open or after this")
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
                   help="let other users read the mount (default: on when run as root; a "
                   f"non-root user needs user_allow_other in {FUSE_CONF})")
    m.add_argument("--force", action="store_true",
                   help="clear a stale mount left at MOUNTPOINT by a killed daemon")
    m.add_argument("--log-file", type=Path, default=None, metavar="FILE",
                   help=f"daemon log, rotated at {format_size(logs.LOG_BYTES)}, keeping "
                   f"{logs.LOG_FILES - 1} older files (FILE.1, ...); its directory must exist "
                   f"(default: {runtime_dir()}/<mountpoint>.log, printed on mount)")
    m.add_argument("--metrics", type=metrics.address, default=None, metavar="[HOST:]PORT",
                   help="serve Prometheus metrics (fusecache_*) over HTTP at HOST:PORT; a "
                   f"bare PORT is on {metrics.DEFAULT_HOST} (default: off)")
    m.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    store_options.add_arguments(m)


def store_location(args: argparse.Namespace) -> StoreLocation | None:
    """The bucket a mount reads directly, or None for a directory SOURCE; UsageError if bad."""
    try:
        return store_options.location_of(args)
    except LocationError as exc:
        raise UsageError(str(exc)) from None


def check_mount_options(args: argparse.Namespace) -> None:
    """Raise UsageError for options that cannot work together or here; change nothing."""
    if args.log_file is not None:
        check_log_file(args.log_file)
    problem = runtime_dir_problem()
    if problem:
        raise UsageError(problem)
    if args.allow_other and os.geteuid() != 0 and not _user_allow_other():
        raise UsageError(f"--allow-other as a non-root user needs user_allow_other in "
                         f"{FUSE_CONF}")
    if args.disk_cache:
        try:
            # A bucket has no directory for the cache dir to keep out of.
            source = args.mountpoint if store_location(args) else args.source
            cachedir.check(cache_dir(args), source, args.mountpoint)
        except cachedir.CacheDirError as exc:
            raise UsageError(str(exc)) from None


def check_log_file(path: Path) -> None:
    """Raise UsageError unless *path* can be the daemon's log: its directory is never made."""
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        raise UsageError(f"log file {path}: directory {parent} does not exist")
    if path.is_dir():
        raise UsageError(f"log file {path} is a directory")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise UsageError(f"log file {path} is not writable")


def _user_allow_other() -> bool:
    try:
        lines = FUSE_CONF.read_text().splitlines()
    except OSError:
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


def cache_dir(args: argparse.Namespace) -> Path:
    path: Path = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    return path


def log_file(args: argparse.Namespace, mountpoint: Path) -> Path:
    """The daemon's log: --log-file, or one per mountpoint in the runtime dir."""
    if args.log_file is not None:
        path: Path = args.log_file
        return path
    slug = str(mountpoint).strip("/").replace("/", "_") or "root"
    return runtime_dir() / f"{slug}.log"


def build_config(args: argparse.Namespace) -> MountConfig:
    """The settings of a mount, from the arguments of `mount` or `run`."""
    mem = args.mem_cache if args.mem_cache is not None else memory_limit() // 4
    logging.getLogger(__name__).debug("memory cache %s", format_size(mem))
    return MountConfig(
        source=store_location(args) or args.source.resolve(),
        mountpoint=args.mountpoint.resolve(),
        cache=replace(CacheConfig(), mem_bytes=mem, fetch_size=args.fetch_size,
                      cache_dir=cache_dir(args).resolve(), disk_bytes=args.disk_cache),
        kernel=replace(KernelConfig(), read_ahead_kb=args.read_ahead_kb,
                       max_background=args.max_background,
                       congestion_threshold=max(1, args.max_background * 3 // 4),
                       attr_timeout=args.attr_timeout, entry_timeout=args.attr_timeout),
        lower=replace(SourceConfig(), readahead_threads=args.parallel,
                      timeout=args.source_timeout, list_ttl=args.list_ttl),
        readahead=replace(ReadaheadConfig(), sha256=args.sha256,
                          feed_page_cache=args.feed_page_cache),
        allow_other=os.geteuid() == 0 if args.allow_other is None else args.allow_other,
        metrics=args.metrics,
    )
