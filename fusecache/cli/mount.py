"""`fusecache mount`: check everything, then mount in a daemon (or the foreground)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusecache import blockio, logs
from fusecache.cli import options
from fusecache.cli.common import UsageError
from fusecache.config import MountConfig
from fusecache.daemon import (
    MountError,
    fusermount_unmount,
    is_stale_mount,
    run_daemon,
    run_foreground,
)
from fusecache.objectstore import options as store_options
from fusecache.objectstore.mountcheck import StoreRefused, StoreUnreachable, check_store


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "mount", env=True,
        help="mount SOURCE read-only at MOUNTPOINT with caching",
        description="Mount SOURCE (a directory, usually an object-store mount, or a bucket read "
        "directly: s3://BUCKET[/PREFIX], oss://BUCKET[/PREFIX]) read-only at "
        "MOUNTPOINT. Returns once the mount answers, leaving a daemon in the background; "
        "fails with one line and exit code 2 on bad input.",
        epilog="Every option can also be set as FUSECACHE_<OPTION> in the environment "
        "(FUSECACHE_MEM_CACHE=4G, FUSECACHE_SHA256=1); a flag wins over the environment.",
    )
    add_source_and_mountpoint(m)
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr instead of starting a daemon")
    options.add_mount_options(m)
    m.set_defaults(handler=handle)


def add_source_and_mountpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=store_options.source_argument,
                        help="the directory to cache (e.g. /mnt/oss), or a bucket to read "
                        "directly: s3://BUCKET[/PREFIX] or oss://BUCKET[/PREFIX], with "
                        "credentials from the environment (AWS_ACCESS_KEY_ID/"
                        "AWS_SECRET_ACCESS_KEY[/AWS_SESSION_TOKEN], or "
                        "ALIBABA_CLOUD_ACCESS_KEY_ID/ALIBABA_CLOUD_ACCESS_KEY_SECRET"
                        "[/ALIBABA_CLOUD_SECURITY_TOKEN])")
    parser.add_argument("mountpoint", type=Path, help="an empty directory to mount at")


def handle(args: argparse.Namespace) -> int:
    config = prepare(args)
    if args.foreground:
        logs.to_stderr(args.verbose)
        return run_foreground(config)
    return start_daemon(args, config)


def prepare(args: argparse.Namespace) -> MountConfig:
    """Check every input of a mount and return its settings; raise UsageError, change nothing.

    The one exception is `--force`, which clears a stale mount at MOUNTPOINT.
    """
    store = options.store_location(args)
    check_mount_args(None if store else args.source, args.mountpoint, args.force)
    options.check_mount_options(args)
    try:
        blockio.selected()  # before forking: a missing C module is the user's one-line error
    except blockio.NativeMissing as exc:
        raise UsageError(str(exc)) from None
    if store is not None:  # wrong credentials or bucket: one line, nothing mounted
        try:
            check_store(store, args.source_timeout)
        except StoreRefused as exc:
            raise UsageError(str(exc)) from None
        except StoreUnreachable as exc:
            raise MountError(str(exc)) from None
    return options.build_config(args)


def start_daemon(args: argparse.Namespace, config: MountConfig) -> int:
    """Fork the daemon; 0 once its mount answers, else 1 with its one-line reason printed."""
    log_file = options.log_file(args, config.mountpoint)
    return run_daemon(config, log_file, lambda: logs.to_capped_file(log_file, args.verbose))


def check_mount_args(source: Path | None, mountpoint: Path, force: bool) -> None:
    """Raise UsageError for a SOURCE and MOUNTPOINT that must not be mounted (*source* None:
    a bucket)."""
    if source is not None and not source.exists():
        raise UsageError(f"source {source} does not exist")
    if source is not None and not source.is_dir():
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
    if source is not None:
        src, mnt = source.resolve(), mountpoint.resolve()
        if src == mnt:
            raise UsageError("source and mountpoint are the same directory")
        if src in mnt.parents or mnt in src.parents:
            raise UsageError("source and mountpoint must not be inside one another")
    if any(os.scandir(mountpoint)):
        raise UsageError(f"mountpoint {mountpoint} is not empty")
