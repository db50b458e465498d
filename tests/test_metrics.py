"""--metrics: Prometheus text scraped over loopback from a real mount; the value checked."""

from __future__ import annotations

import argparse
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from fusecache import metrics
from fusecache.bench.standin import free_port
from fusecache.config import MiB
from tests.conftest import fusecache_cmd, needs_fuse
from tests.ramp import write_ramp


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


@pytest.mark.unit
def test_the_metrics_address() -> None:
    port = free_port()
    assert metrics.address(str(port)) == ("127.0.0.1", port), "a bare port is loopback"
    assert metrics.address(f"127.0.0.1:{port}") == ("127.0.0.1", port)
    assert metrics.address(f"[::1]:{port}")[1] == port
    for bad in ("", "0", "65536", "abc", "localhost:", ":9100", "127.0.0.1:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            metrics.address(bad)


@pytest.mark.unit
@pytest.mark.parametrize("value", ["70000", "x:1", ":9100", "taken"])
def test_mount_refuses_a_bad_metrics_value(tmp_path: Path, value: str) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if value == "taken":
            value = str(taken.getsockname()[1])
        res = fusecache_cmd("mount", str(tmp_path / "src"), str(tmp_path / "mnt"),
                            "--cache-dir", str(tmp_path / "cache"), "--metrics", value)
    assert res.returncode == 2, res
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--metrics" in res.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    assert not (tmp_path / "cache").exists(), "nothing created"


@needs_fuse
@pytest.mark.mount
def test_metrics_scraped_over_loopback(tmp_path: Path, mount_factory) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_ramp(src / "f.bin", 5 * MiB + 3, seed=1)
    port = free_port()
    m = mount_factory(src, "--metrics", str(port))
    (m.mnt / "f.bin").read_bytes()
    stats = m.settled()
    values = _scrape(port)
    assert values["fusecache_lower_bytes_total"] == stats["lower_bytes"] == 5 * MiB + 3
    assert values["fusecache_served_bytes_total"] == stats["served_bytes"]
    assert values["fusecache_source_healthy"] == 1
    assert values["fusecache_resident_memory_bytes"] > 0
    cpu = stats["cpu_ms"] / 1000  # scraped after: as much or a little more
    assert 0 < cpu <= values["fusecache_cpu_seconds_total"] < cpu + 5
    names = {n.split("{")[0] for n in values}
    assert all(n.startswith("fusecache_") for n in names), names
    counters = {n for n in names if n.endswith("_total")}
    assert len(counters) >= 15, counters
    # Loopback only: the port is not open on the machine's other addresses.
    bound = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
             if line.split()[3] == "0A"]  # listening
    assert f"0100007F:{port:04X}" in bound
    assert f"00000000:{port:04X}" not in bound
    # A second mount cannot take the port, and says so before mounting.
    other = tmp_path / "other"
    other.mkdir()
    res = fusecache_cmd("mount", str(src), str(other), "--cache-dir", str(tmp_path / "c2"),
                        "--metrics", f"127.0.0.1:{port}")
    assert res.returncode == 2 and "Address already in use" in res.stderr, res.stderr
    assert not os.path.ismount(other)
    m.unmount()
    with pytest.raises(OSError):
        _scrape(port)  # the server went with the daemon
