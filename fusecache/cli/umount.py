"""`fusecache umount`: unmount a fusecache mount and wait for its daemon to exit."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusecache.cli.common import UsageError
from fusecache.daemon import mount_type, unmount

OUR_TYPE = "fuse.fusecache"  # mount.serve mounts with subtype=fusecache


def register(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("umount", help="unmount and wait for the daemon to exit",
                       description="Unmount a fusecache mount and wait for its daemon to exit.")
    u.add_argument("mountpoint", type=Path)
    u.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    path: Path = args.mountpoint
    kind = mount_type(path)
    if kind is None:
        if not os.path.lexists(path):
            raise UsageError(f"{path} does not exist")
        raise UsageError(f"{path} is not mounted")
    if kind != OUR_TYPE:
        raise UsageError(f"{path} is a {kind} mount, not a fusecache one")
    unmount(path)
    return 0
