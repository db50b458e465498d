"""`fusecache run`: the container entrypoint. Mount, warm, then become COMMAND.

COMMAND replaces this process (exec), so the model server is the process the
platform signals and its exit code is run's. The mount's daemon, forked as by
`mount`, keeps serving beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fusecache.cli import mount, options
from fusecache.cli.common import UsageError
from fusecache.daemon import MountError, unmount

# As a shell's, when COMMAND is found but cannot be run.
EXIT_NOT_EXECUTABLE = 126


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run", env=True, takes_command=True,
        usage="fusecache run [-h] SOURCE MOUNTPOINT [mount options] [--warm PATH ...] "
        "[--warm-wait] -- COMMAND [ARGS ...]",
        help="mount, then run COMMAND (a model server) in this process: the container "
        "entrypoint",
        description="Mount SOURCE at MOUNTPOINT as `fusecache mount` does, optionally warm "
        "PATHs, then exec COMMAND: it becomes this process, so it gets the platform's "
        "signals and its exit code is run's. The daemon keeps serving the mount. On bad "
        "input (exit 2) or a failed mount (exit 1), COMMAND never starts.",
        epilog="Every option can also be set as FUSECACHE_<OPTION> in the environment "
        "(FUSECACHE_MEM_CACHE=4G, FUSECACHE_WARM='/models/a /models/b'); a flag wins over "
        "the environment.",
    )
    mount.add_source_and_mountpoint(r)
    options.add_mount_options(r)
    w = r.add_argument_group("warming")
    w.add_argument("--warm", action="append", type=Path, default=None, metavar="PATH",
                   help="a file or directory under MOUNTPOINT to fetch into the cache with "
                   "`fusecache warm` while COMMAND starts (repeatable)")
    w.add_argument("--warm-wait", action="store_true",
                   help="warm before COMMAND starts; if warming fails, run fails (exit 1)")
    r.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    command: list[str] = args.command_argv
    executable = find_command(command[0])
    warm = warm_paths(args.warm or [], args.mountpoint)
    if args.warm_wait and not warm:
        raise UsageError("--warm-wait needs at least one --warm PATH")
    config = mount.prepare(args)
    code = mount.start_daemon(args, config)
    if code != 0:
        return code
    try:
        missing = [p for p in warm if not p.exists()]
        if missing:
            raise UsageError(f"--warm {missing[0]}: no such file or directory in the mount")
        if warm and args.warm_wait:
            if _warm_now(warm) != 0:
                raise MountError("warming failed; COMMAND was not started")
        elif warm:
            _warm_in_background(warm, options.log_file(args, config.mountpoint))
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(executable, command)
        except OSError as exc:  # found and executable, yet not runnable (no #! line, ...)
            print(f"fusecache: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
            _unmount_quietly(config.mountpoint)
            return EXIT_NOT_EXECUTABLE
    except BaseException:
        _unmount_quietly(config.mountpoint)
        raise
    raise AssertionError("unreachable: exec returned")


def find_command(name: str) -> str:
    """The file COMMAND names, looked up in PATH as a shell would; UsageError if none.

    By mode bits, not access(): that ignores capabilities a non-root user was
    given to reach the file (CAP_DAC_READ_SEARCH), which execve honours.
    """
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name)
                      for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    files = [c for c in candidates if os.path.isfile(c)]
    for path in files:
        if os.stat(path).st_mode & 0o111:
            return path
    if files:
        raise UsageError(f"COMMAND {name} is not executable")
    raise UsageError(f"COMMAND {name} not found")


def warm_paths(paths: list[Path], mountpoint: Path) -> list[Path]:
    """Each --warm PATH made absolute; UsageError unless it lies under MOUNTPOINT."""
    mnt = Path(os.path.abspath(mountpoint))
    result = []
    for path in paths:
        absolute = Path(os.path.abspath(path))
        if absolute != mnt and mnt not in absolute.parents:
            raise UsageError(f"--warm {path} is not under the mountpoint {mountpoint}")
        result.append(absolute)
    return result


def _warm_command(paths: list[Path]) -> list[str]:
    return [sys.executable, "-m", "fusecache", "warm", *map(str, paths)]


def _warm_now(paths: list[Path]) -> int:
    """Warm *paths* to the end, its progress on our stderr; its exit code."""
    return subprocess.run(_warm_command(paths), stdin=subprocess.DEVNULL, check=False).returncode


def _warm_in_background(paths: list[Path], log_file: Path) -> None:
    """Start warming *paths*, detached, its output in a file beside the daemon's log.

    Through an intermediate process that exits at once, so the warm process is
    not COMMAND's child (COMMAND did not start it and would not reap it).
    """
    warm_log = log_file.with_name(log_file.name.removesuffix(".log") + ".warm.log")
    out = os.open(warm_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    pid = os.fork()
    if pid == 0:  # the intermediate
        code = 1
        try:
            os.setsid()
            subprocess.Popen(_warm_command(paths), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=out)
            code = 0
        finally:
            os._exit(code)
    os.close(out)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise MountError("could not start `fusecache warm`")
    print(f"fusecache: warming {len(paths)} path(s) in the background (log: {warm_log})",
          file=sys.stderr)


def _unmount_quietly(mountpoint: Path) -> None:
    """Undo the mount when COMMAND will not start: nothing is left behind."""
    try:
        unmount(mountpoint)
    except MountError as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
