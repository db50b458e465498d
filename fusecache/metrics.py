"""`--metrics HOST:PORT`: the daemon's counters as Prometheus text, served over HTTP.

prometheus-client's own server runs in its threads; nothing is counted twice:
a collector reads the daemon's counters (fs/stats.py) when it is scraped, by
asking the trio loop for them between two requests (a few microseconds), so the
serving path never touches a metric and no lock is shared with it.
"""

from __future__ import annotations

import argparse
import socket
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)

Address = tuple[str, int]
Counters = Callable[[], dict[str, int]]

# Loopback unless told otherwise: the counters name files and sizes, and a GPU
# function's ports may face the internet.
DEFAULT_HOST = "127.0.0.1"
# A scrape gives up on a daemon whose loop does not answer in this long, with an
# HTTP 500, rather than holding a server thread: Prometheus' own scrape timeout
# is 10 s by default.
SCRAPE_TIMEOUT = 5.0

# Counters: name (fusecache_ + name + _total), help.
COUNTERS = {
    "read_requests": ("read_requests", "reads that reached the daemon (kernel page-cache misses)"),
    "served_bytes": ("served_bytes", "bytes replied to readers"),
    "served_memory": ("served_memory_bytes", "bytes replied to readers from memory"),
    "served_disk": ("served_disk_bytes", "bytes replied to readers from the disk cache"),
    "served_lower": ("served_lower_bytes", "bytes replied to readers that waited on a read "
                     "from the lower mount"),
    "fed_bytes": ("fed_bytes", "bytes put into the kernel's page cache by whole-file fetches"),
    "lower_reads": ("lower_reads", "reads from the lower mount"),
    "lower_bytes": ("lower_bytes", "bytes read from the lower mount"),
    "lower_errors": ("lower_errors", "reads from the lower mount that failed"),
    "readahead_bytes": ("readahead_bytes", "bytes read from the lower mount ahead of readers"),
    "readahead_used_bytes": ("readahead_used_bytes", "read-ahead bytes taken by a reader or "
                             "the page cache before they left memory"),
    "evictions": ("evictions", "blocks evicted from memory"),
    "handed_to_kernel": ("handed_to_kernel_blocks", "blocks memory let go once the kernel "
                         "held them"),
    "disk_writes_dropped": ("disk_writes_dropped", "blocks not written to disk: the writers "
                            "were behind"),
    "validation_failures": ("disk_validation_failures", "disk blocks that failed their checks"),
    "disk_write_errors": ("disk_write_errors", "disk cache writes that failed"),
    "disk_writes_refused_full": ("disk_writes_refused_full", "disk cache writes refused while "
                                 "the disk was full"),
    "disk_full_episodes": ("disk_full_episodes", "times the disk cache stopped writing"),
    "source_timeouts": ("source_timeouts", "lower-mount calls with no answer in time"),
    "source_failed_fast": ("source_failed_fast", "lower-mount calls refused at once while it "
                           "was not answering"),
    "stale_answers": ("stale_answers", "metadata questions answered from what was known"),
    "cpu_ms": ("cpu_seconds", "CPU time the daemon used, all threads, user and system"),
}
# Counters kept in other units than their metric's: the factor to it.
SCALES = {"cpu_ms": 1e-3}
# Gauges: name (fusecache_ + name), help.
GAUGES = {
    "memory_used": ("memory_used_bytes", "bytes of blocks in the memory cache"),
    "memory_capacity": ("memory_capacity_bytes", "the memory cache's budget"),
    "memory_mapped": ("memory_mapped_bytes", "block memory the daemon holds (C pool only)"),
    "disk_used": ("disk_used_bytes", "bytes in the disk cache"),
    "disk_capacity": ("disk_capacity_bytes", "the disk cache's limit"),
    "cache_capacity": ("cache_capacity_bytes", "what memory and disk can keep of files"),
    "disk_full_now": ("disk_full", "1 while the disk cache does not write"),
    "fetches_in_flight": ("fetches_in_flight", "blocks on their way from below or from disk"),
    "background_jobs": ("background_jobs", "whole-file fetches, hashes and warms under way"),
    "source_healthy": ("source_healthy", "1 while the lower mount answers"),
    "abandoned_threads": ("abandoned_threads", "threads stuck in the lower mount"),
    "rss_bytes": ("resident_memory_bytes", "the daemon's resident memory"),
}


def address(text: str) -> Address:
    """`--metrics`'s value: PORT (on loopback) or HOST:PORT, free to bind; else the reason."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    if sep and not host:
        raise argparse.ArgumentTypeError(f"{text!r} names no host: say 0.0.0.0{text} to serve "
                                         "on every interface, or give just the port for "
                                         "loopback")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number from 1 to 65535")
    port = int(port_text)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind(where)
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return host, port


class _Collector:
    """Reads the daemon's counters at each scrape and names them for Prometheus."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        stats = self._counters()
        for key, value in stats.items():
            if key in COUNTERS:
                name, text = COUNTERS[key]
                yield CounterMetricFamily(f"fusecache_{name}", text,
                                          value=value * SCALES.get(key, 1))
            elif key in GAUGES:
                name, text = GAUGES[key]
                yield GaugeMetricFamily(f"fusecache_{name}", text, value=value)
            else:  # a counter added to fs/stats.py since: shown, untyped, until named here
                yield UnknownMetricFamily(f"fusecache_{key}", key, value=value)


def on_trio_loop(fn: Counters, token: trio.lowlevel.TrioToken) -> Counters:
    """*fn*, made callable from another thread: it runs on the trio loop of *token*."""
    def call() -> dict[str, int]:
        done = threading.Event()
        box: list[dict[str, int]] = []
        failed: list[Exception] = []

        def run() -> None:
            # An exception out of a run_sync_soon callback would end the daemon's
            # loop (TrioInternalError): it goes to the scraping thread instead.
            try:
                box.append(fn())
            except Exception as exc:
                failed.append(exc)
            finally:
                done.set()

        token.run_sync_soon(run)
        if not done.wait(SCRAPE_TIMEOUT):
            raise TimeoutError(f"the daemon's loop did not answer in {SCRAPE_TIMEOUT:g} s")
        if failed:
            raise failed[0]
        return box[0]

    return call


class MetricsServer:
    """The HTTP server of `--metrics`, in its own thread, from start() to stop()."""

    def __init__(self, where: Address, counters: Counters) -> None:
        self.where = where
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(counters))  # type: ignore[arg-type]
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; OSError (the port is taken) if it cannot."""
        host, port = self.where
        self._server, self._thread = start_http_server(port, host, registry=self._registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
