"""The composition root: builds the source, cache and filesystem, mounts, serves, unmounts."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import pyfuse3
import trio

from fusecache import fuse_tuning, logrepeats, stackdump
from fusecache.blockio import Block
from fusecache.cache.blocks import BlockCache
from fusecache.cache.budget import MemoryBudget
from fusecache.cache.disk import DiskTier
from fusecache.cachedir import CacheDirError
from fusecache.config import MountConfig
from fusecache.errors import FsError
from fusecache.fs.core import FilesystemCore
from fusecache.fuse_ops import FuseOperations
from fusecache.metrics import MetricsServer, on_trio_loop
from fusecache.objectstore.location import LocationError, open_client
from fusecache.objectstore.source import ObjectSource
from fusecache.source import LowerSource
from fusecache.source_api import Source
from fusecache.threads import ThreadPolicy

log = logging.getLogger(__name__)

# Unmounting, by signal or `fusecache umount`, is done within 5 s even when calls
# on the lower mount hang (a container platform's grace period can be that
# short, and its SIGKILL would leave a stale mount): requests still waiting on
# the lower mount this long after the signal are dropped, and the kernel fails
# them when the session closes. daemon.UNMOUNT_DEADLINE is the 5 s.
REQUEST_GRACE = 1.0
# A store into the page cache takes a millisecond or two; one still going after
# this is stuck on a page the kernel holds locked.
PAGE_CACHE_GRACE = 1.5
# How long an exit waits for the disk writes under way and queued (256 MiB at most).
SPILL_GRACE = 5.0
# Seconds an exit waits for the lower mount to close the fds kept after their last
# reader (fs/keptfds.py); a hung one leaves them to the process's exit.
KEPT_FDS_GRACE = 2.0


class MountError(Exception):
    """The mount could not be made; the message is one line for the user."""


async def serve(config: MountConfig, on_ready: Callable[[str | None], None]) -> None:
    """Mount, call on_ready(None) once the mount answers, serve until unmounted or signalled."""
    threads = ThreadPolicy(config.lower)
    source = _source(config, threads)
    if config.cache.fetch_bytes != config.cache.fetch_size:
        log.info("reading %d MiB from the lower mount at a time (--fetch-size %d MiB is more "
                 "than half of an eighth of --mem-cache, or not whole MiB)",
                 config.cache.fetch_bytes >> 20, config.cache.fetch_size >> 20)
    disk = None
    if config.cache.cache_dir is not None and config.cache.disk_bytes > 0:
        try:
            disk = DiskTier(config.cache.cache_dir, config.cache.disk_bytes,
                            block_size=config.cache.block_size)
        except CacheDirError as exc:  # says which dir, and why
            raise MountError(str(exc)) from None
        except OSError as exc:  # one line: the reason, and the file if it is not the dir
            where = f" ({exc.filename})" if exc.filename else ""
            raise MountError(f"cannot use cache dir {config.cache.cache_dir}: "
                             f"{exc.strerror or exc}{where}") from None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.run)
        nursery.start_soon(logrepeats.summarise_every)
        nursery.start_soon(stackdump.dump_stacks_on_sigusr1)
        cache = BlockCache(config.cache, source, nursery, disk, threads=threads,
                           budget=MemoryBudget(config.memory_shares))
        # notify_store takes any buffer (it gets a Py_buffer), whatever its stub says.
        store = cast(Callable[[int, int, Block], None], pyfuse3.notify_store)
        # --parallel bounds both the read-ahead threads (ThreadPolicy) and the
        # fetches a whole-file fill keeps registered (ReadOnce).
        core = FilesystemCore(source, cache, nursery, readahead=config.readahead,
                              invalidate=pyfuse3.invalidate_inode, store=store,
                              # An object store's fds hold nothing below to keep.
                              lower=config.lower if source.shares_open_state
                              else replace(config.lower, keep_open=0.0))
        ops = FuseOperations(core, config.kernel.entry_timeout, config.kernel.attr_timeout)
        metrics = _start_metrics(config, core)
        options = set(pyfuse3.default_options)
        options |= {"ro", "subtype=fusecache", f"fsname={config.source}"}
        if config.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, str(config.mountpoint), options)
        except RuntimeError as exc:
            if metrics is not None:
                metrics.stop()
            raise MountError(f"cannot mount at {config.mountpoint}: {exc}") from None
        try:
            with trio.CancelScope() as requests:
                nursery.start_soon(_stop_on_signals, core, requests)
                nursery.start_soon(_announce_when_ready, config, core, nursery, on_ready)
                await pyfuse3.main()
        finally:
            # No notify call may run into the session pyfuse3.close() frees.
            with trio.CancelScope(shield=True):
                await core.end_page_cache_calls(PAGE_CACHE_GRACE)
            pyfuse3.close(unmount=True)
            if metrics is not None:  # waits for its loop's next turn, at most 0.5 s
                metrics.stop()
        log.info("unmounted %s", config.mountpoint)
        with trio.move_on_after(KEPT_FDS_GRACE):
            await core.close_kept_fds()
        with trio.move_on_after(config.cache.flush_on_unmount):
            await cache.flush_to_disk()
        nursery.cancel_scope.cancel()
        # The fills stop; disk writes run in threads of their own, and one cut off by
        # the exit would leave a torn slot (a miss next time, its checksum fails).
        with trio.CancelScope(shield=True), trio.move_on_after(SPILL_GRACE):
            await cache.wait_spilled()


def _source(config: MountConfig, threads: ThreadPolicy) -> Source:
    """The directory source, or for an s3:// or oss:// URL the object-store source."""
    if isinstance(config.source, Path):
        return LowerSource(config.source, config.lower, threads)
    try:  # here, after the fork: the client's runtime threads would not survive one
        client = open_client(config.source, config.lower.timeout)
    except LocationError as exc:
        raise MountError(str(exc)) from None
    return ObjectSource(client, config.source, config.lower, threads, config.cache.block_size)


def _start_metrics(config: MountConfig, core: FilesystemCore) -> MetricsServer | None:
    """Serve --metrics, before anything is mounted: a port taken meanwhile fails the mount."""
    if config.metrics is None:
        return None
    server = MetricsServer(config.metrics,
                           on_trio_loop(core.statistics, trio.lowlevel.current_trio_token()))
    try:
        server.start()
    except OSError as exc:
        host, port = config.metrics
        raise MountError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
                         ) from None
    log.info("serving metrics at http://%s:%d/metrics", *config.metrics)
    return server


async def _stop_on_signals(core: FilesystemCore, requests: trio.CancelScope) -> None:
    """On SIGTERM or SIGINT, unmount within a few seconds, however the lower mount fares."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            # While the main loop still answers the reads a page-cache store may wait on.
            await core.end_page_cache_calls(PAGE_CACHE_GRACE)
            pyfuse3.terminate()
            # pyfuse3.main() returns once every request under way has been answered;
            # one waiting on a hung lower mount would hold it up for the source
            # timeout.
            await trio.sleep(REQUEST_GRACE)
            if not requests.cancel_called:
                log.warning("dropping the requests still waiting on the lower mount")
                requests.cancel()
            return


async def _known_statfs(core: FilesystemCore) -> None:
    """Ask the lower mount's statfs once, so `df` answers while it hangs later."""
    with contextlib.suppress(OSError, FsError):
        await core.statfs()


async def _announce_when_ready(config: MountConfig, core: FilesystemCore,
                               nursery: trio.Nursery,
                               on_ready: Callable[[str | None], None]) -> None:
    # This stat is served by our own main loop, so it proves the mount answers.
    try:
        st = await trio.to_thread.run_sync(os.stat, config.mountpoint)
    except OSError as exc:
        on_ready(f"the mount does not answer: {exc.strerror} (is {config.source} answering?)")
        pyfuse3.terminate()
        return
    nursery.start_soon(_known_statfs, core)
    await trio.to_thread.run_sync(fuse_tuning.tune_connection, st.st_dev, config.kernel)
    log.info("serving %s at %s", config.source, config.mountpoint)
    on_ready(None)
