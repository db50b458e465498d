"""The cache dir is ours alone: fusecache never touches a byte it did not write."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fusecache import cachedir
from fusecache.cache.disk import FORMAT, DiskTier
from fusecache.cachedir import LOCK, SIGNATURE, SUBDIR, TAG, CacheDirError, TaggedDir

pytestmark = pytest.mark.unit

KEY = (b"models/a.safetensors", 1, 2, 3)
BLOCK = 64 * 1024


def tier_at(cache: Path) -> DiskTier:
    return DiskTier(cache, 1 << 30, block_size=BLOCK)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under *root* (itself too): its mode and, for a file, its bytes."""
    found: dict[str, tuple[int, bytes | None]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        found[str(path.relative_to(root))] = (st.st_mode, data)
    return found


def user_data(root: Path) -> Path:
    """The /data of the issue: model folders named v1/ and v2/, and modes of their own."""
    for name in ("v1", "v2"):
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(name.encode() * 1000)
    os.chmod(root / "v2" / "model.safetensors", 0o640)
    os.chmod(root, 0o755)
    return root


@contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at *path*, unmounted however the test ends; skips unless root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join(("size=4m", *options))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """An empty directory no one can write in, root included: a read-only mount."""
    with tmpfs(path, "ro"):
        yield path


def test_a_dir_of_someone_elses_folders_named_like_old_formats_is_refused_untouched(
        tmp_path: Path) -> None:
    data = user_data(tmp_path / "data")
    before = snapshot(data)
    with pytest.raises(CacheDirError, match="is not empty and is not fusecache's"):
        tier_at(data)
    with pytest.raises(CacheDirError, match="is not empty"):
        cachedir.check(data, tmp_path / "src", tmp_path / "mnt")
    assert snapshot(data) == before


def test_a_new_dir_is_made_and_only_our_subdir_in_it_is_tagged_and_private(
        tmp_path: Path) -> None:
    cache = tmp_path / "a" / "b" / "cache"
    cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    assert not (tmp_path / "a").exists(), "a check makes nothing"
    tier = tier_at(cache)
    assert tier.write(KEY, 0, b"x" * BLOCK)
    assert sorted(os.listdir(cache)) == [SUBDIR]
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o777 & ~_umask(), "made, never chmod'ed"
    assert stat.S_IMODE(os.stat(cache / SUBDIR).st_mode) == 0o700
    tag = (cache / SUBDIR / TAG).read_bytes()
    assert tag.split(b"\n")[0] == SIGNATURE == b"Signature: 8a477f597d28d172789f06886806bc55"
    assert b"fusecache" in tag.split(b"\n")[1]
    assert cachedir.is_tagged(cache / SUBDIR)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_empty_dir_is_used_and_its_mode_kept(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o751)
    os.chmod(cache, 0o751)
    tier_at(cache).close()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o751


def test_a_dir_that_is_ours_is_reused_across_restarts(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tier = tier_at(cache)
    tier.write(KEY, 0, b"x" * BLOCK)
    tier.close()
    (cache / "notes.txt").write_text("the user's, beside ours")  # still ours: it holds our dir
    cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    again = tier_at(cache)
    assert again.contains(KEY, 0)
    assert sorted(os.listdir(cache)) == [SUBDIR, "notes.txt"]


def test_old_formats_are_removed_inside_our_dir_and_never_outside(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tier_at(cache).close()
    old = cache / SUBDIR / "v2" / ("ab" * 32)
    old.mkdir(parents=True)
    (old / "0.blk").write_bytes(b"old")
    (cache / SUBDIR / "keep-me").write_text("not a format")
    user_data(cache / "outside")
    user_data(tmp_path / "v1-elsewhere")
    (cache / "v1").mkdir()  # beside our dir, not in it
    before = snapshot(cache / "outside"), snapshot(cache / "v1")
    tier_at(cache).close()
    assert not (cache / SUBDIR / "v2").exists()
    assert (cache / SUBDIR / FORMAT).is_dir() and (cache / SUBDIR / "keep-me").exists()
    assert (snapshot(cache / "outside"), snapshot(cache / "v1")) == before


def test_one_daemon_at_a_time(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tier = tier_at(cache)
    with pytest.raises(CacheDirError, match="is in use by another fusecache mount"):
        tier_at(cache)
    with pytest.raises(CacheDirError, match="is in use by another fusecache mount"):
        cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    tier.close()
    cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    tier_at(cache).close()


def test_another_process_holding_it_counts_too(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    TaggedDir(cache).close()
    hold = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(cache / SUBDIR / LOCK)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(CacheDirError, match="is in use by another fusecache mount"):
            cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    finally:
        holder.kill()
        holder.communicate()
    cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")


@pytest.mark.parametrize("where", ["source", "mountpoint"])
def test_in_or_equal_to_the_source_or_mountpoint_is_refused(tmp_path: Path, where: str) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    inner = src if where == "source" else mnt
    (tmp_path / "link").symlink_to(inner)
    for cache in (inner, inner / "cache", tmp_path / "link", tmp_path / "link" / "x" / "y"):
        with pytest.raises(CacheDirError, match=f"must be outside the {where}"):
            cachedir.check(cache, src, mnt)
    assert os.listdir(inner) == []


def test_not_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheDirError, match="is not a directory"):
        cachedir.check(tmp_path / "file", tmp_path / "src", tmp_path / "mnt")
    with pytest.raises(CacheDirError, match="file is not a directory"):
        cachedir.check(tmp_path / "file" / "cache", tmp_path / "src", tmp_path / "mnt")
    with pytest.raises(CacheDirError, match="is not a directory"):
        tier_at(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_a_read_only_dir_is_refused_and_nothing_made(tmp_path: Path) -> None:
    with read_only_dir(tmp_path / "ro") as ro:
        for cache in (ro, ro / "sub" / "cache"):
            with pytest.raises(CacheDirError, match="read-only"):
                cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
            with pytest.raises(CacheDirError, match="read-only"):
                tier_at(cache)
        assert os.listdir(ro) == []


def test_an_immutable_dir_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    if subprocess.run(["chattr", "+i", str(cache)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(CacheDirError, match="read-only"):
            cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    finally:
        subprocess.run(["chattr", "-i", str(cache)], check=True)


def test_a_dir_named_like_ours_without_our_tag_is_not_ours(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / SUBDIR).mkdir(parents=True)
    (cache / SUBDIR / "photo.jpg").write_bytes(b"\xff\xd8")
    (cache / SUBDIR / TAG).write_bytes(SIGNATURE + b"\n# made by another program\n")
    before = snapshot(cache)
    with pytest.raises(CacheDirError, match="is not empty"):
        tier_at(cache)
    other = tmp_path / "other"
    other.mkdir()
    (other / SUBDIR).symlink_to(tier_at(tmp_path / "real")._dir.path)
    with pytest.raises(CacheDirError, match="is not empty"):
        cachedir.check(other, tmp_path / "src", tmp_path / "mnt")
    assert snapshot(cache) == before


def test_our_dir_left_untagged_by_a_crash_is_finished(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / SUBDIR).mkdir(parents=True)  # a daemon died between the mkdir and the tag
    tier_at(cache).close()
    assert cachedir.is_tagged(cache / SUBDIR)


def test_an_older_untagged_cache_is_named_and_left_alone(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "v3" / ("cd" * 32)).mkdir(parents=True)
    (cache / "v3" / ("cd" * 32) / "0.blk").write_bytes(b"FCBLK003")
    before = snapshot(cache)
    with pytest.raises(CacheDirError, match=f"untagged cache of an older fusecache \\({cache}/v3"):
        cachedir.check(cache, tmp_path / "src", tmp_path / "mnt")
    assert snapshot(cache) == before


def test_the_root_of_a_file_system_made_for_the_cache_is_empty_despite_lost_found(
        tmp_path: Path) -> None:
    (tmp_path / "plain" / "lost+found").mkdir(parents=True)
    with pytest.raises(CacheDirError, match="is not empty"):
        cachedir.check(tmp_path / "plain", tmp_path / "src", tmp_path / "mnt")
    with tmpfs(tmp_path / "volume") as volume:
        (volume / "lost+found").mkdir()
        tier_at(volume).close()
        assert sorted(os.listdir(volume)) == [SUBDIR, "lost+found"]
