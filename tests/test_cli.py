"""Bad input: one clear line, exit code 2, nothing mounted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fusecache.cache.disk import DiskTier
from fusecache.cli import build_config, build_parser
from fusecache.daemon import pidfile_for
from tests.conftest import fusecache_cmd, needs_fuse
from tests.test_cachedir import read_only_dir, snapshot, user_data


def assert_usage_error(res, words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert words in lines[0], lines[0]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


@pytest.mark.unit
def test_missing_source(dirs) -> None:
    _, mnt = dirs
    assert_usage_error(fusecache_cmd("mount", "/nonexistent/x", str(mnt)), "does not exist")


@pytest.mark.unit
def test_source_not_a_directory(dirs, tmp_path: Path) -> None:
    _, mnt = dirs
    (tmp_path / "file").write_text("x")
    assert_usage_error(fusecache_cmd("mount", str(tmp_path / "file"), str(mnt)),
                       "is not a directory")


@pytest.mark.unit
def test_mountpoint_problems(dirs, tmp_path: Path) -> None:
    src, mnt = dirs
    assert_usage_error(fusecache_cmd("mount", str(src), str(tmp_path / "none")),
                       "does not exist")
    (tmp_path / "file").write_text("x")
    assert_usage_error(fusecache_cmd("mount", str(src), str(tmp_path / "file")),
                       "is not a directory")
    (mnt / "x").write_text("x")
    assert_usage_error(fusecache_cmd("mount", str(src), str(mnt)), "is not empty")


@pytest.mark.unit
def test_same_or_nested(dirs) -> None:
    src, _ = dirs
    (src / "inner").mkdir()
    assert_usage_error(fusecache_cmd("mount", str(src), str(src)), "the same")
    assert_usage_error(fusecache_cmd("mount", str(src), str(src / "inner")), "inside")


@pytest.mark.unit
def test_unknown_option_and_bad_size(dirs) -> None:
    src, mnt = dirs
    assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--bogus"), "unrecognized")
    assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--mem-cache", "12Q"),
                       "cannot parse size")


@pytest.mark.unit
def test_umount_of_unmounted(dirs) -> None:
    _, mnt = dirs
    assert_usage_error(fusecache_cmd("umount", str(mnt)), "is not mounted")


@pytest.mark.unit
def test_help_explains() -> None:
    res = fusecache_cmd("mount", "--help")
    assert res.returncode == 0 and "--mem-cache" in res.stdout


@pytest.mark.mount
@needs_fuse
def test_already_mounted_and_stale_mount(dirs, mount_factory, tmp_path: Path) -> None:
    src, _ = dirs
    m = mount_factory(src)
    assert_usage_error(fusecache_cmd("mount", str(src), str(m.mnt)), "already a mount point")
    pid = int(pidfile_for(m.mnt).read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.statvfs(m.mnt)
        except OSError:
            break
        time.sleep(0.05)
    assert_usage_error(fusecache_cmd("mount", str(src), str(m.mnt)), "--force")
    res = fusecache_cmd("mount", str(src), str(m.mnt), "--force",
                        "--cache-dir", str(tmp_path / "cache-forced"),
                        "--log-file", str(tmp_path / "forced.log"))
    assert res.returncode == 0, res.stderr
    assert os.listdir(m.mnt) == []
    m.unmount()
    assert not os.path.ismount(m.mnt)


@pytest.mark.unit
def test_bench_bad_rate(tmp_path: Path) -> None:
    assert_usage_error(fusecache_cmd("bench", "--rate", "0"), "--rate: must be at least 1")
    assert_usage_error(fusecache_cmd("bench", "--rate", "fast"), "must be a whole number")
    assert_usage_error(fusecache_cmd("bench", str(tmp_path), "--rate", "100"),
                       "cannot cap SOURCE_DIR")


@pytest.mark.unit
def test_a_cache_dir_holding_someone_elses_data_is_refused_and_untouched(
        dirs, tmp_path: Path) -> None:
    src, mnt = dirs
    data = user_data(tmp_path / "data")
    before = snapshot(data)
    assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--cache-dir", str(data)),
                       "is not empty and is not fusecache's")
    assert snapshot(data) == before
    assert os.listdir(mnt) == [] and not os.path.ismount(mnt)


@pytest.mark.unit
def test_a_cache_dir_in_the_source_or_mountpoint_is_refused(dirs, tmp_path: Path) -> None:
    src, mnt = dirs
    (tmp_path / "link").symlink_to(src)
    for cache, words in ((src, "outside the source"), (src / "cache", "outside the source"),
                         (tmp_path / "link" / "cache", "outside the source"),
                         (mnt / "cache", "outside the mountpoint")):
        assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--cache-dir", str(cache)),
                           words)
    assert os.listdir(src) == [] and os.listdir(mnt) == []


@pytest.mark.unit
def test_a_cache_dir_that_is_no_directory_or_read_only_is_refused(dirs, tmp_path: Path) -> None:
    src, mnt = dirs
    (tmp_path / "file").write_text("x")
    assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--cache-dir",
                                     str(tmp_path / "file")), "is not a directory")
    with read_only_dir(tmp_path / "ro") as ro:
        assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--cache-dir", str(ro)),
                           "read-only")


@pytest.mark.unit
def test_a_cache_dir_in_use_is_refused(dirs, tmp_path: Path) -> None:
    src, mnt = dirs
    tier = DiskTier(tmp_path / "cache", 1 << 30)  # what another daemon holds
    try:
        assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), "--cache-dir",
                                         str(tmp_path / "cache")),
                           f"cache dir {tmp_path / 'cache'} is in use by another fusecache mount")
    finally:
        tier.close()


@pytest.mark.mount
@needs_fuse
def test_without_a_disk_tier_the_cache_dir_is_not_looked_at(dirs, mount_factory,
                                                            tmp_path: Path) -> None:
    src, _ = dirs
    (tmp_path / "file").write_text("x")
    m = mount_factory(src, "--disk-cache", "0", cache_dir=tmp_path / "file")
    assert os.listdir(m.mnt) == []
    m.unmount()


@pytest.mark.unit
def test_source_timeout(dirs) -> None:
    src, mnt = dirs
    for bad in ("0", "-1", "nan", "inf", "soon"):
        assert_usage_error(fusecache_cmd("mount", str(src), str(mnt), f"--source-timeout={bad}"),
                           "--source-timeout: must be a positive number of seconds")
    parse = build_parser().parse_args
    assert build_config(parse(["mount", str(src), str(mnt)])).lower.timeout == 30.0
    config = build_config(parse(["mount", str(src), str(mnt), "--source-timeout", "2.5"]))
    assert config.lower.timeout == 2.5
    assert "--source-timeout SECONDS" in fusecache_cmd("mount", "--help").stdout
