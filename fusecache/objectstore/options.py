"""`fusecache mount`'s options for an object-store source, kept here so cli.py gains few lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusecache.cli.common import seconds
from fusecache.config import SourceConfig
from fusecache.objectstore.location import (
    LocationError,
    StoreLocation,
    is_store_url,
    parse_store_url,
)


def source_argument(text: str) -> Path | str:
    """SOURCE as given: a directory (Path), or an s3:// or oss:// URL, parsed by location_of."""
    return text if is_store_url(text) else Path(text)


def add_arguments(parser: argparse._ActionsContainer) -> None:
    """--endpoint, --region and --list-ttl, for s3:// and oss:// sources."""
    parser.add_argument("--endpoint", default=None, metavar="URL",
                        help="the object store's endpoint for an s3:// or oss:// SOURCE, e.g. "
                        "https://oss-cn-hangzhou-internal.aliyuncs.com (default: AWS's for "
                        "s3://, the --region's for oss://)")
    parser.add_argument("--region", default=None, metavar="REGION",
                        help="the store's region for an s3:// or oss:// SOURCE (default: "
                        "AWS_REGION, else us-east-1 for s3://)")
    parser.add_argument("--list-ttl", type=seconds(zero_ok=False), default=SourceConfig.list_ttl,
                        metavar="SECONDS",
                        help="for an s3:// or oss:// SOURCE, how long a directory's listing "
                        "(and the sizes and ETags in it) is believed: a replaced object is "
                        "read as new content at most this late")


def location_of(args: argparse.Namespace) -> StoreLocation | None:
    """The bucket to mount, or None for a directory SOURCE; LocationError if it cannot be."""
    if isinstance(args.source, Path):
        if args.endpoint is not None or args.region is not None:
            raise LocationError("--endpoint and --region are for s3:// and oss:// sources")
        return None
    return parse_store_url(args.source, args.endpoint, args.region)
