"""`fusecache run` as the image runs it: the Dockerfile's ENTRYPOINT over temporary directories.

There is no Docker engine here, so this runs what the image would: its
ENTRYPOINT and CMD as written in the Dockerfile, with /mnt/oss and /models
swapped for a temporary source and mountpoint, configured through the
environment as a platform's console would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusecache.bench.standin import free_port
from tests.conftest import force_unmount, fusecache_cmd, needs_fuse
from tests.ramp import ramp

ROOT = Path(__file__).resolve().parent.parent
FUSECACHE = Path(sys.executable).parent / "fusecache"  # the console script, as in the image


def dockerfile_instruction(name: str) -> list[str]:
    """The exec form of the Dockerfile's ENTRYPOINT or CMD."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith(f"{name} "):
            value: list[str] = json.loads(line[len(name) + 1:])
            return value
    raise AssertionError(f"no {name} in the Dockerfile")


class Entrypoint:
    """The image's ENTRYPOINT over tmp/src and tmp/mnt; whatever it mounts is unmounted."""

    def __init__(self, tmp: Path) -> None:
        self.src, self.mnt = tmp / "src", tmp / "mnt"
        self.src.mkdir(parents=True)
        self.mnt.mkdir()
        self.env = {**os.environ, "FUSECACHE_CACHE_DIR": str(tmp / "cache"),
                    "FUSECACHE_LOG_FILE": str(tmp / "fusecache.log"),
                    "FUSECACHE_MEM_CACHE": "64M"}

    def argv(self, command: list[str], options: tuple[str, ...] = ()) -> list[str]:
        swap = {"/mnt/oss": str(self.src), "/models": str(self.mnt), "fusecache": str(FUSECACHE)}
        entry = [swap.get(arg, arg) for arg in dockerfile_instruction("ENTRYPOINT")]
        split = entry.index("--")
        return [*entry[:split], *options, *entry[split:], *command]

    def start(self, command: list[str], *options: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(command, options), env={**self.env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, command: list[str], *options: str, **env: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(command, options), env={**self.env, **env},
                              capture_output=True, text=True, timeout=120, check=False)

    def close(self) -> None:
        if os.path.ismount(self.mnt):
            res = fusecache_cmd("umount", str(self.mnt))
            assert res.returncode == 0, res.stderr
        force_unmount(self.mnt)


@pytest.fixture
def entrypoint(tmp_path: Path) -> Iterator[Entrypoint]:
    e = Entrypoint(tmp_path)
    try:
        yield e
    finally:
        e.close()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.mount
@needs_fuse
def test_the_entrypoint_mounts_then_becomes_command(entrypoint: Entrypoint) -> None:
    data = ramp(0, 3 << 20, seed=5)
    (entrypoint.src / "model.bin").write_bytes(data)
    check = (f"import os, hashlib; m = {str(entrypoint.mnt)!r}; print(os.getpid()); "
             "print(hashlib.sha256(open(m + '/model.bin', 'rb').read()).hexdigest()); "
             "print(os.getxattr(m, 'user.fusecache.stats') != b''); raise SystemExit(7)")
    proc = entrypoint.start(python(check))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7, err  # COMMAND's exit code is run's
    pid, digest, ours = out.split()
    assert int(pid) == proc.pid  # exec: COMMAND is the process the platform started
    assert digest == hashlib.sha256(data).hexdigest()
    assert ours == "True"  # read through fusecache, not the source
    assert "mounted at" in err
    assert os.path.ismount(entrypoint.mnt)  # the daemon serves on after run's exec


@pytest.mark.mount
@needs_fuse
def test_the_images_cmd_serves_the_mount_and_gets_the_platforms_signal(
        entrypoint: Entrypoint) -> None:
    data = ramp(0, 1 << 20, seed=9)
    (entrypoint.src / "model.bin").write_bytes(data)
    port = str(free_port())
    swap = {"/models": str(entrypoint.mnt), "9000": port, "python": sys.executable}
    cmd = [swap.get(arg, arg) for arg in dockerfile_instruction("CMD")]
    proc = entrypoint.start(cmd)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/model.bin",
                                            timeout=10) as reply:
                    assert reply.read() == data
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the stand-in server never answered"
                time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)  # what a platform sends the container's process
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()


@pytest.mark.mount
@needs_fuse
def test_bad_input_or_a_missing_source_never_starts_command(entrypoint: Entrypoint,
                                                           tmp_path: Path) -> None:
    marker = tmp_path / "command-ran"
    touch = python(f"open({str(marker)!r}, 'w').close()")
    for env in ({"FUSECACHE_PARALLEL": "0"}, {"FUSECACHE_FETCH_SIZE": "3K"},
                {"FUSECACHE_LOG_FILE": str(tmp_path / "no" / "such" / "log")}):
        res = entrypoint.run(touch, **env)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
        assert next(iter(env)) in res.stderr or "log file" in res.stderr
    entrypoint.src.rmdir()  # the platform's OSS mount is missing
    res = entrypoint.run(touch)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    assert not marker.exists() and not os.path.ismount(entrypoint.mnt)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "fusecache.log").exists()


@pytest.mark.mount
@needs_fuse
def test_a_flag_wins_over_the_environment(entrypoint: Entrypoint) -> None:
    res = entrypoint.run(python("pass"), "--parallel", "2", FUSECACHE_PARALLEL="0")
    assert res.returncode == 0, res.stderr


@pytest.mark.mount
@needs_fuse
def test_warm_wait_fetches_before_command(entrypoint: Entrypoint) -> None:
    (entrypoint.src / "model.bin").write_bytes(ramp(0, 4 << 20, seed=2))
    stats = (f"import os, json; s = json.loads(os.getxattr({str(entrypoint.mnt)!r}, "
             "'user.fusecache.stats')); print(json.dumps(s))")
    res = entrypoint.run(python(stats), "--warm", str(entrypoint.mnt / "model.bin"),
                         "--warm-wait")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])  # COMMAND ran after warming


@pytest.mark.mount
@needs_fuse
def test_warm_in_the_background_logs_beside_the_daemon(entrypoint: Entrypoint,
                                                       tmp_path: Path) -> None:
    (entrypoint.src / "model.bin").write_bytes(ramp(0, 2 << 20, seed=3))
    res = entrypoint.run(python("pass"), FUSECACHE_WARM=str(entrypoint.mnt / "model.bin"))
    assert res.returncode == 0, res.stderr
    assert "in the background" in res.stderr
    assert (tmp_path / "fusecache.warm.log").exists()


@pytest.mark.mount
@needs_fuse
def test_warm_of_a_missing_path_fails_and_unmounts(entrypoint: Entrypoint,
                                                   tmp_path: Path) -> None:
    marker = tmp_path / "command-ran"
    res = entrypoint.run(python(f"open({str(marker)!r}, 'w').close()"), "--warm-wait",
                         "--warm", str(entrypoint.mnt / "missing.bin"))
    assert res.returncode == 2, res.stderr
    assert "missing.bin" in res.stderr.splitlines()[-1]
    assert not marker.exists() and not os.path.ismount(entrypoint.mnt)


@pytest.mark.mount
@needs_fuse
def test_warm_that_fails_fails_run(entrypoint: Entrypoint, faultfs, tmp_path: Path) -> None:
    (faultfs.backing / "model.bin").write_bytes(ramp(0, 2 << 20, seed=4))
    faultfs.set(eio="read")
    e = Entrypoint(tmp_path / "over-faultfs")
    marker = tmp_path / "command-ran"
    try:
        e.src.rmdir()
        e.src.symlink_to(faultfs.mount)
        res = e.run(python(f"open({str(marker)!r}, 'w').close()"), "--warm-wait",
                    "--warm", str(e.mnt / "model.bin"))
        assert res.returncode == 1, res.stderr
        assert not marker.exists() and not os.path.ismount(e.mnt)
    finally:
        e.close()
