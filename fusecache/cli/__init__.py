"""The fusecache command: one module per subcommand, registered in COMMANDS.

A command module has `register(sub)`, which adds its parser with
`sub.add_parser(NAME, ...)` and sets `handler=` to a function taking the parsed
arguments and returning the exit code. A handler raises UsageError for bad input
(one line, exit 2) and MountError when a mount fails (one line, exit 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fusecache import __version__, blockio
from fusecache.cli import bench, mount, run, stats, umount, warm
from fusecache.cli.common import EXIT_USAGE, CommandParser, HelpFormatter, UsageError
from fusecache.cli.options import build_config
from fusecache.daemon import MountError

COMMANDS = (mount, run, umount, warm, stats, bench)

__all__ = ["COMMANDS", "build_config", "build_parser", "main"]


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        try:
            impl = blockio.selected()[1]
        except blockio.NativeMissing as exc:
            impl = f"unusable: {exc}"
        print(f"fusecache {__version__} (block copy: {impl})")
        parser.exit(0)


def _add_commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in COMMANDS:
        command.register(sub)
    return sub


def build_parser() -> argparse.ArgumentParser:
    """The parser of the fusecache command and its subcommands."""
    parser = CommandParser(
        prog="fusecache",
        description="A read-only caching layer over a slow FUSE mount such as ossfs, or over "
        "the bucket itself (s3://, oss://): large parallel read-ahead, memory and disk block "
        "caches, kernel page-cache reuse, and each byte of a model fetched once.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and which block copy (C or Python) is in use")
    _add_commands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except UsageError as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MountError as exc:
        print(f"fusecache: {exc}", file=sys.stderr)
        return 1
