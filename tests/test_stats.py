"""fusecache stats over a real mount: the table, the JSON, the rates, and the xattr listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusecache.config import MiB
from tests.conftest import fusecache_cmd, needs_fuse
from tests.ramp import write_ramp

pytestmark = [needs_fuse, pytest.mark.mount]

SIZE = 6 * MiB + 99


@pytest.fixture
def read_once(tmp_path: Path, mount_factory):
    src = tmp_path / "src"
    src.mkdir()
    write_ramp(src / "f.bin", SIZE, seed=4)
    m = mount_factory(src)
    (m.mnt / "f.bin").read_bytes()
    m.settled()
    return m


def test_getfattr_dump_finds_the_stats(read_once) -> None:
    assert os.listxattr(read_once.mnt) == ["user.fusecache.stats"]
    assert "user.fusecache.stats" not in os.listxattr(read_once.mnt / "f.bin")


def test_stats_json_has_the_stable_keys(read_once) -> None:
    res = fusecache_cmd("stats", str(read_once.mnt), "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert stats["lower_bytes"] == SIZE
    assert stats["served_bytes"] == (stats["served_memory"] + stats["served_disk"]
                                     + stats["served_lower"])
    assert 0 < stats["served_bytes"] <= SIZE
    assert stats["lower_bytes"] == read_once.stats()["lower_bytes"]
    # A path under the mount names the same mount.
    assert json.loads(fusecache_cmd("stats", str(read_once.mnt / "f.bin"), "--json").stdout
                      )["lower_bytes"] == SIZE


def test_stats_table(read_once) -> None:
    res = fusecache_cmd("stats", str(read_once.mnt))
    assert res.returncode == 0, res.stderr
    rows = {line.strip().split("  ")[0]: line for line in res.stdout.splitlines()[1:]}
    assert res.stdout.splitlines()[0] == f"fusecache stats {read_once.mnt}"
    for row in ("reads served", "from memory", "from disk", "from below", "read from below",
                "saved vs plain", "read-ahead", "memory cache", "disk cache", "timeouts",
                "errors", "daemon RSS", "daemon CPU"):
        assert row in rows, (row, res.stdout)
    assert "6.0 MiB in" in rows["read from below"]
    assert "%" in rows["from memory"]
    assert "s per GB served and fed" in rows["daemon CPU"]


def test_stats_watch_prints_rates(read_once) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fusecache", "stats", str(read_once.mnt),
                             "--watch", "0.3", "--count", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    f = open(read_once.mnt / "f.bin", "rb")  # noqa: SIM115 - read while it watches
    try:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.read()
    finally:
        f.close()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["time", "served/s", "below/s", "fed/s", "reads/s", "cache",
                                "hits", "memory", "rss", "cpu"]
    assert len(lines) == 4
    assert all("/s" in line and line.endswith("%") for line in lines[1:])
    res = fusecache_cmd("stats", str(read_once.mnt), "--watch", "0.1", "--count", "1", "--json")
    assert res.returncode == 0
    row = json.loads(res.stdout)
    assert {"interval", "served_bytes_per_s", "lower_bytes_per_s", "lower_bytes",
            "cpu_ms_per_s", "cpu_ms"} <= set(row)


@pytest.mark.parametrize("bad", [["--watch", "0"], ["--watch", "-1"], ["--watch", "soon"],
                                 ["--watch", "inf"], ["--count", "2"],
                                 ["--watch", "1", "--count", "0"]])
def test_stats_refuses_a_bad_watch(read_once, bad: list[str]) -> None:
    res = fusecache_cmd("stats", str(read_once.mnt), *bad)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1
