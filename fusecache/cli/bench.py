"""`fusecache bench`: check the bench's inputs, then time model switching with and without."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusecache.cli.common import UsageError, integer


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], not {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="time model switching with and without fusecache",
        description="Run the Stable Diffusion web-UI workload (sha256 then load on a first "
        "switch, load only on a second) on SOURCE_DIR and through a temporary fusecache mount "
        "over it, and print both. Without SOURCE_DIR, start a local OSS stand-in (an S3 server "
        "on loopback mounted with s3fs, bandwidth-capped) with generated models.",
    )
    b.add_argument("source", nargs="?", type=Path, default=None, metavar="SOURCE_DIR",
                   help="a directory holding the models (default: the stand-in)")
    b.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="model file names (default: the study's ten)")
    b.add_argument("--scale", type=_scale, default=0.02,
                   help="model size as a fraction of the real one (stand-in only)")
    b.add_argument("--rate", type=integer(1), default=None, metavar="MB/S",
                   help="the stand-in's bandwidth cap: set it to your store's throughput to "
                   "see the network-bound case (stand-in only; needs root) (default: 400)")
    b.add_argument("--out", type=Path, default=Path("bench/out"),
                   help="where result.json and switching.png go")
    b.add_argument("--mount-option", action="append", default=[], metavar="OPT",
                   help="extra option for the fusecache mount, e.g. --mount-option=--mem-cache=2G")
    b.add_argument("-v", "--verbose", action="store_true",
                   help="also print diagnostics: where the daemons' replies came from, reclaim")
    b.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        from fusecache.bench import models
        from fusecache.bench.run import run_bench
    except ImportError as exc:
        raise UsageError(f"the bench needs its extras ({exc.name} is missing): "
                         "pip install 'fusecache[bench]'") from None
    known = [name for name, _ in models.MODELS]
    names = args.models or known
    if args.source is not None:
        if not args.source.is_dir():
            raise UsageError(f"source {args.source} is not a directory")
        if args.rate is not None:
            raise UsageError("--rate caps the stand-in; it cannot cap SOURCE_DIR")
        missing = [n for n in names if not (args.source / n).is_file()]
        if missing:
            raise UsageError(f"no model {missing[0]} in {args.source}")
    else:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"the stand-in has no model {unknown[0]}; it has "
                             f"{', '.join(known)}")
        if args.rate is not None and os.geteuid() != 0:
            raise UsageError("--rate needs root (it caps the stand-in with tc)")
    _check_out(args.out)
    _check_mount_options(args.mount_option)
    return run_bench(args.source, names, args.scale, args.out, args.mount_option,
                     rate_mbps=args.rate, verbose=args.verbose)


def _check_out(out: Path) -> None:
    """--out may be made, but only where a directory can be made."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a directory")
    ancestor = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be written: {ancestor} is not a writable directory")


def _check_mount_options(extra: list[str]) -> None:
    """The bench's --mount-option values, checked as `fusecache mount` would check them."""
    from fusecache.cli import build_parser

    build_parser().parse_args(["mount", "SOURCE", "MOUNTPOINT", *extra])
