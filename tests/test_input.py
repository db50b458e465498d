"""Every command checks every input: one line on stderr, exit 2, nothing mounted, made or deleted.

One table: each row is a command line (and environment) with {src}, {mnt} and
{tmp} standing for a source, an empty mountpoint and the test's directory, and
words the one line must hold. `run` rows end in a COMMAND that would leave a
file behind, so one that started would show.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusecache.cli import build_parser
from fusecache.cli.common import env_name
from tests.test_cachedir import read_only_dir, snapshot, user_data

RAN = "{tmp}/command-ran"
COMMAND = ("--", "touch", RAN)


def mount_and_run(options: tuple[str, ...], words: str, env: dict[str, str] | None = None
                  ) -> list[tuple[tuple[str, ...], dict[str, str], str]]:
    """The same bad options, to `mount` and to `run`."""
    return [(("mount", "{src}", "{mnt}", *options), env or {}, words),
            (("run", "{src}", "{mnt}", *options, *COMMAND), env or {}, words)]


CASES = [
    *mount_and_run(("--parallel", "0"), "--parallel: must be at least 1"),
    *mount_and_run(("--parallel", "-3"), "--parallel: must be at least 1"),
    *mount_and_run(("--parallel", "many"), "--parallel: must be a whole number"),
    *mount_and_run(("--fetch-size", "0"), "--fetch-size: must be at least 1.0 MiB"),
    *mount_and_run(("--fetch-size", "3K"), "--fetch-size: must be at least 1.0 MiB"),
    *mount_and_run(("--fetch-size", "1.5M"), "--fetch-size: must be a multiple of 1.0 MiB"),
    *mount_and_run(("--mem-cache", "0"), "--mem-cache: must be at least 4.0 MiB"),
    *mount_and_run(("--mem-cache", "12Q"), "cannot parse size"),
    *mount_and_run(("--disk-cache", "1K"), "--disk-cache: must be at least 8.0 MiB (or 0"),
    *mount_and_run(("--attr-timeout", "-5"), "--attr-timeout: must be zero or a positive"),
    *mount_and_run(("--attr-timeout", "inf"), "--attr-timeout: must be zero or a positive"),
    *mount_and_run(("--source-timeout", "0"), "--source-timeout: must be a positive"),
    *mount_and_run(("--read-ahead-kb=-1",), "--read-ahead-kb: must be at least 0"),
    *mount_and_run(("--max-background", "0"), "--max-background: must be at least 1"),
    *mount_and_run(("--max-background", "70000"), "--max-background: must be at most 65535"),
    *mount_and_run(("--cache-dir", "{src}/cache"), "must be outside the source"),
    *mount_and_run(("--cache-dir", "{tmp}/file"), "is not a directory"),
    *mount_and_run(("--cache-dir", "{tmp}/data"), "is not empty and is not fusecache's"),
    *mount_and_run(("--cache-dir", "{tmp}/ro/cache"), "is read-only"),
    *mount_and_run(("--log-file", "{tmp}/missing/dir/fusecache.log"),
                   "directory {tmp}/missing/dir does not exist"),
    *mount_and_run(("--log-file", "{tmp}"), "is a directory"),
    *mount_and_run((), "FUSECACHE_PARALLEL='0': must be at least 1", {"FUSECACHE_PARALLEL": "0"}),
    *mount_and_run((), "FUSECACHE_MEM_CACHE='4X': cannot parse size",
                   {"FUSECACHE_MEM_CACHE": "4X"}),
    *mount_and_run((), "FUSECACHE_SHA256='maybe': must be 1", {"FUSECACHE_SHA256": "maybe"}),
    *mount_and_run((), "must be outside the source", {"FUSECACHE_CACHE_DIR": "{src}"}),
    (("mount", "{tmp}/none", "{mnt}"), {}, "source {tmp}/none does not exist"),
    (("mount", "{src}", "{tmp}/none"), {}, "mountpoint {tmp}/none does not exist"),
    (("run", "{src}", "{mnt}"), {}, "COMMAND is missing"),
    (("run", "{src}", "{mnt}", "--"), {}, "COMMAND is missing"),
    (("run", "{src}", "{mnt}", "--", "no-such-command-here"), {}, "not found"),
    (("run", "{src}", "{mnt}", "--", "{tmp}/file"), {}, "is not executable"),
    (("run", "{src}", "{mnt}", "--warm", "{src}", *COMMAND), {}, "is not under the mountpoint"),
    (("run", "{src}", "{mnt}", "--warm-wait", *COMMAND), {}, "--warm-wait needs"),
    (("run", "{src}", "{mnt}", *COMMAND), {"FUSECACHE_WARM_WAIT": "sometimes"},
     "FUSECACHE_WARM_WAIT='sometimes'"),
    (("umount", "{tmp}/none"), {}, "{tmp}/none does not exist"),
    (("umount", "{mnt}"), {}, "is not mounted"),
    (("umount", "/proc"), {}, "/proc is a proc mount, not a fusecache one"),
    (("bench", "--scale", "0"), {}, "--scale: must be a fraction in (0, 1]"),
    (("bench", "--scale", "3"), {}, "--scale: must be a fraction in (0, 1]"),
    (("bench", "--rate", "0"), {}, "--rate: must be at least 1"),
    (("bench", "--models", "nope.safetensors"), {}, "the stand-in has no model nope"),
    (("bench", "{src}", "--models", "nope.safetensors"), {}, "no model nope.safetensors in"),
    (("bench", "{tmp}/none"), {}, "is not a directory"),
    (("bench", "--out", "{tmp}/file"), {}, "--out {tmp}/file is not a directory"),
    (("bench", "--mount-option=--parallel=0"), {}, "--parallel: must be at least 1"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "env", "words"), CASES,
                         ids=[" ".join(a) + "".join(f" {k}={v}" for k, v in e.items())
                              for a, e, _ in CASES])
def test_bad_input_is_one_line_and_exit_2_and_changes_nothing(
        tmp_path: Path, argv: tuple[str, ...], env: dict[str, str], words: str) -> None:
    for name in ("src", "mnt"):
        (tmp_path / name).mkdir()
    (tmp_path / "file").write_text("not a directory, not executable")
    user_data(tmp_path / "data")
    fill = {"src": tmp_path / "src", "mnt": tmp_path / "mnt", "tmp": tmp_path}
    with read_only_dir(tmp_path / "ro"):
        before = snapshot(tmp_path)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FUSECACHE_")}
        environ |= {k: v.format(**fill) for k, v in env.items()}
        res = subprocess.run([sys.executable, "-m", "fusecache",
                              *(a.format(**fill) for a in argv)], env=environ,
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2, (res.returncode, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert words.format(**fill) in lines[0]
        assert "Errno" not in lines[0] and "Traceback" not in res.stderr
        assert snapshot(tmp_path) == before  # nothing made, changed or deleted
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.unit
def test_every_mount_option_has_an_environment_variable_in_help() -> None:
    parser = build_parser()
    for command in ("mount", "run"):
        sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert f"[env {env_name(action)}]" in " ".join(text.split()), action.dest


@pytest.mark.unit
def test_the_environment_sets_options_and_a_flag_wins(monkeypatch, tmp_path: Path) -> None:
    parse = build_parser().parse_args
    base = ["run", str(tmp_path / "s"), str(tmp_path / "m")]
    monkeypatch.setenv("FUSECACHE_MEM_CACHE", "4G")
    monkeypatch.setenv("FUSECACHE_PARALLEL", "3")
    monkeypatch.setenv("FUSECACHE_SHA256", "yes")
    monkeypatch.setenv("FUSECACHE_FEED_PAGE_CACHE", "off")
    monkeypatch.setenv("FUSECACHE_WARM", f"{tmp_path}/m/a '{tmp_path}/m/b c'")
    monkeypatch.setenv("FUSECACHE_DISK_CACHE", "")  # empty: as if unset
    args = parse([*base, "--", "true"])
    assert (args.mem_cache, args.parallel, args.sha256, args.feed_page_cache) == (
        4 << 30, 3, True, False)
    assert args.warm == [tmp_path / "m" / "a", tmp_path / "m" / "b c"]
    assert args.disk_cache == 100 << 30 and args.fetch_size == 8 << 20  # the defaults
    assert args.command_argv == ["true"]
    args = parse([*base, "--parallel", "5", "--no-sha256", "--warm", "x", "--", "true", "-v"])
    assert (args.parallel, args.sha256, args.warm) == (5, False, [Path("x")])
    assert args.command_argv == ["true", "-v"] and not args.verbose
