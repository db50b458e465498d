"""The daemon's log is capped and rotated, and stray output follows it to the current file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CAP = 64 * 1024

# A daemon in miniature: fds 1 and 2 on the log, as daemon._detach leaves them,
# then far more log lines than the cap, with stray output from C and Python between.
DAEMON = f"""
import logging, os, sys
from fusecache import logs
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.dup2(fd, 1)
os.dup2(fd, 2)
os.close(fd)
logs.to_capped_file(path, verbose=False, max_bytes={CAP}, files=3)
log = logging.getLogger("fusecache.test")
for i in range(20000):
    log.info("line %06d %s", i, "x" * 150)
    if i % 100 == 0:
        os.write(2, b"stray output from C\\n")
        print("stray output from Python", file=sys.stderr, flush=True)
os.write(2, b"the last stray line\\n")
"""


def test_far_more_than_the_cap_leaves_at_most_the_cap_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    res = subprocess.run([sys.executable, "-c", DAEMON, str(path)], capture_output=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    # 20,000 lines of some 200 bytes: 4 MB written, 192 KiB kept (a stray line or
    # two may come after a file's last record, before the next check).
    assert sum(f.stat().st_size for f in files) <= 3 * (CAP + 100)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    current = path.read_text()
    assert current.endswith("line 019999 " + "x" * 150 + "\nthe last stray line\n"), \
        "fds 1 and 2 follow the log to its current file"
    assert "stray output from Python" in (tmp_path / "daemon.log.1").read_text()


def test_a_log_that_is_no_regular_file_is_left_alone(tmp_path: Path) -> None:
    """--log-file /dev/null: never renamed (through a link here, so a failure renames the link)."""
    (tmp_path / "log").symlink_to("/dev/null")
    res = subprocess.run(
        [sys.executable, "-c", "import logging, sys; from fusecache import logs; "
         "logs.to_capped_file(sys.argv[1], False, max_bytes=100); "
         "[logging.getLogger('t').info('x' * 50) for _ in range(10)]", str(tmp_path / "log")],
        capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert os.listdir(tmp_path) == ["log"] and os.readlink(tmp_path / "log") == "/dev/null"
