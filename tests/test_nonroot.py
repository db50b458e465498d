"""`fusecache mount` and `run` as an unprivileged user, through fusermount3.

The user is nobody (65534), made with setpriv. Where /dev/fuse is root's alone
(0600, as here and in many containers), the test gives nobody a usable one in a
mount namespace of its own: a 0666 node of the same device bound over
/dev/fuse there. Nothing outside that namespace changes, and every mount made in
it dies with it. If nobody cannot read this checkout (it lives under a private
home, say), nobody also gets CAP_DAC_READ_SEARCH, which lets it read files and
nothing more: it still mounts through fusermount3, without the right to mount.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusecache import config, daemon
from tests.conftest import needs_fuse
from tests.ramp import ramp
from tests.test_cachedir import read_only_dir

USER = 65534  # nobody
FUSECACHE = str(Path(sys.executable).parent / "fusecache")
TOOLS = ("unshare", "nsenter", "setpriv", "mknod")


class Namespace:
    """A private mount namespace (kept by a sleeping process) with a /dev/fuse for nobody."""

    def __init__(self, home: Path) -> None:
        self.home = home
        dev = os.stat("/dev/fuse").st_rdev
        (home / "dev").mkdir()
        setup = (f"mount -t tmpfs -o mode=755,size=64k none {home}/dev && "
                 f"mknod -m 666 {home}/dev/fuse c {os.major(dev)} {os.minor(dev)} && "
                 f"mount --bind {home}/dev/fuse /dev/fuse && echo ready && exec sleep 3600")
        self.keeper = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                        "sh", "-c", setup], stdout=subprocess.PIPE, text=True)
        assert self.keeper.stdout is not None
        if self.keeper.stdout.readline().strip() != "ready":
            self.keeper.wait()
            pytest.skip("cannot make a private mount namespace with a /dev/fuse for nobody")
        self.caps: list[str] = []
        # setpriv itself may exec what nobody could not (it drops root at the exec), so
        # the probe asks what nobody's own processes can reach: the interpreter and
        # the console script they exec, and the package they import.
        probe = [sys.executable, "-c", "import os, sys, fusecache._native, pyfuse3; "
                 f"assert os.path.isfile(sys.executable) and os.path.isfile({FUSECACHE!r})"]
        if self.as_user(probe).returncode:
            self.caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
            res = self.as_user(probe)
            assert res.returncode == 0, res.stderr

    def as_user(self, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        """Run *argv* in the namespace as nobody, with a user's environment (no root HOME)."""
        environ = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "LANG": "C.UTF-8",
                   "XDG_RUNTIME_DIR": str(self.home / "run"), **env}
        cmd = ["nsenter", f"--mount=/proc/{self.keeper.pid}/ns/mnt", "--",
               "setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", *self.caps,
               *argv]
        return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=120,
                              check=False)

    def mountinfo_line(self, mnt: Path) -> str | None:
        res = self.as_user(["cat", "/proc/self/mountinfo"])
        return next((ln for ln in res.stdout.splitlines() if f" {mnt} " in ln), None)

    def close(self, mnt: Path) -> None:
        """Unmount as nobody, stop a daemon still running, end the namespace."""
        if self.keeper.poll() is None and self.mountinfo_line(mnt):
            self.as_user([FUSECACHE, "umount", str(mnt)])
        pidfile = self.home / "run" / "fusecache" / daemon.pidfile_for(mnt).name
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            pid = None
        if pid is not None and _alive_as(pid, USER):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive_as(pid, USER) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive_as(pid, USER):
                os.kill(pid, signal.SIGKILL)
        self.keeper.kill()  # the last process in the namespace: its mounts go with it
        self.keeper.wait()


def _alive_as(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid and \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def nobody(tmp_path: Path) -> Iterator[tuple[Namespace, Path]]:
    if os.geteuid() != 0:
        pytest.skip("making the nobody user and its namespace needs root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing (util-linux, coreutils)")
    # Not under tmp_path: pytest's directories are root's alone (0700).
    home = Path(tempfile.mkdtemp(prefix="fusecache-nonroot-"))
    ns = None
    try:
        os.chmod(home, 0o755)
        for name in ("src", "mnt", "run"):
            (home / name).mkdir(mode=0o700 if name == "run" else 0o755)
        (home / "src" / "model.bin").write_bytes(ramp(0, 3 << 20, seed=7))
        for path in (home, *home.iterdir(), *(home / "src").iterdir()):
            os.chown(path, USER, USER)
        ns = Namespace(home)
        yield ns, home
    finally:
        if ns is not None:
            ns.close(home / "mnt")
        shutil.rmtree(home)


@pytest.mark.mount
@needs_fuse
def test_mount_and_run_as_nobody(nobody: tuple[Namespace, Path]) -> None:
    ns, home = nobody
    src, mnt = home / "src", home / "mnt"
    digest = hashlib.sha256((src / "model.bin").read_bytes()).hexdigest()
    options = ["--cache-dir", str(home / "cache"), "--log-file", str(home / "mount.log"), "-v"]

    res = ns.as_user([FUSECACHE, "mount", str(src), str(mnt), *options])
    assert res.returncode == 0, res.stderr
    line = ns.mountinfo_line(mnt)
    assert line and "fuse.fusecache" in line and f"user_id={USER}" in line, line
    assert "allow_other" not in line  # off by default without root
    res = ns.as_user(["sha256sum", str(mnt / "model.bin")])
    assert res.stdout.split()[0] == digest, res.stderr
    run_dir = home / "run" / "fusecache"
    assert run_dir.stat().st_uid == USER and run_dir.stat().st_mode & 0o777 == 0o700
    res = ns.as_user([FUSECACHE, "umount", str(mnt)])
    assert res.returncode == 0, res.stderr
    assert ns.mountinfo_line(mnt) is None
    log = (home / "mount.log").read_text()
    assert "not root: keeping the kernel's read-ahead" in log
    assert " INFO fusecache.fuse_tuning" not in log  # skipped quietly

    check = (f"import hashlib; d = hashlib.sha256(open({str(mnt / 'model.bin')!r}, 'rb')"
             f".read()).hexdigest(); raise SystemExit(5 if d == {digest!r} else 1)")
    res = ns.as_user([FUSECACHE, "run", str(src), str(mnt), *options, "--",
                      sys.executable, "-c", check])
    assert res.returncode == 5, res.stderr  # COMMAND read the file through the mount
    assert ns.mountinfo_line(mnt) is not None  # the daemon serves on; the fixture unmounts


@pytest.mark.unit
def test_a_user_without_a_home_or_runtime_dir_gets_private_fallbacks(monkeypatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with read_only_dir(tmp_path / "home") as home:  # not even root may write there
        monkeypatch.setattr(os, "geteuid", lambda: USER)
        monkeypatch.setattr(os, "getuid", lambda: USER)
        monkeypatch.setenv("HOME", str(home))
        assert config.default_cache_dir() == Path(f"/var/tmp/fusecache-{USER}")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.default_cache_dir() == tmp_path / ".cache" / "fusecache"
    # An XDG_RUNTIME_DIR inherited through a switch of user is someone else's (root's here).
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert daemon.runtime_dir() == Path(tempfile.gettempdir()) / f"fusecache-{USER}"


@pytest.mark.unit
def test_allow_other_without_root_needs_user_allow_other(monkeypatch, tmp_path: Path) -> None:
    from fusecache.cli import build_parser
    from fusecache.cli import options as mount_options
    from fusecache.cli.common import UsageError

    for name in ("src", "mnt"):
        (tmp_path / name).mkdir()
    args = build_parser().parse_args(["mount", str(tmp_path / "src"), str(tmp_path / "mnt"),
                                      "--allow-other", "--disk-cache", "0"])
    monkeypatch.setattr(os, "geteuid", lambda: USER)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")  # the /tmp fallback, which may not exist yet
    conf = tmp_path / "fuse.conf"
    monkeypatch.setattr(mount_options, "FUSE_CONF", conf)
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    with pytest.raises(UsageError, match="needs user_allow_other in"):
        mount_options.check_mount_options(args)
    conf.write_text("user_allow_other\n")
    mount_options.check_mount_options(args)
    assert build_parser().parse_args(["mount", "s", "m"]).allow_other is None  # root decides
