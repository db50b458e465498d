"""A smoke test of `python -m fusecache.bench.access` on the real stand-in, small and quick."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fusecache.bench import access
from tests.conftest import needs_fuse

pytestmark = [
    pytest.mark.standin,
    needs_fuse,
    pytest.mark.skipif(shutil.which("s3fs") is None, reason="s3fs is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the access bench drops caches: root only"),
]


def test_access_bench_measures_and_reports(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    patterns = ["seq-1", "mmap", "rand-4k", "8-procs"]
    assert access.main(["--size-mib", "8", "--targets", "fusecache", "--patterns", *patterns,
                        "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    got = {(f["pattern"], f["target"]) for f in result["figures"]}
    assert got == {(p, t) for p in patterns for t in ("plain", "fusecache")}
    assert all(f["seconds"] > 0 and f["wanted"] > 0 for f in result["figures"])
    table = capsys.readouterr().out
    assert "rand-4k" in table and "fusecache" in table
    assert not [line for line in Path("/proc/mounts").read_text().splitlines()
                if str(tmp_path) in line or "fusecache-bench-" in line]
