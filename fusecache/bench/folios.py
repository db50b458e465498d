"""How big are the page-cache folios that hold a file? `python -m fusecache.bench.folios FILE...`

A load that maps a model from the page cache takes one fault per folio or per
fault-around window (64 KiB), whichever is bigger. ext4 and xfs hold large folios;
FUSE held only 4 KiB ones before Linux's "fuse: enable large folios", so a mapped
load through any FUSE mount takes more faults than the same load from a local file.
This reads the answer for your kernel: it maps each file, touches every page (reading
it if it is not cached), and looks its frames up in /proc/self/pagemap and
/proc/kpageflags. Root only: without CAP_SYS_ADMIN the kernel hides frame numbers.
"""

from __future__ import annotations

import argparse
import mmap
import os
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 1 << 15, 1 << 16


def folio_sizes(path: Path, limit: int = 1 << 30) -> Counter[int]:
    """Folio sizes in bytes -> how many folios, over the first *limit* bytes of *path*."""
    with open(path, "rb") as f:
        length = min(os.fstat(f.fileno()).st_size, limit) // PAGE * PAGE
        if length == 0:
            return Counter()
        with mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ) as m:
            view = memoryview(m)
            for off in range(0, length, PAGE):  # fault every page in
                view[off]
            flags = _page_flags(_address(m), length // PAGE)
            view.release()
    sizes: Counter[int] = Counter()
    run = 0
    for page in flags:
        if page & KPF_COMPOUND_TAIL and run:
            run += 1
            continue
        if run:
            sizes[run * PAGE] += 1
        run = 1
    if run:
        sizes[run * PAGE] += 1
    return sizes


def _address(m: mmap.mmap) -> int:
    return int(np.frombuffer(m, np.uint8).ctypes.data)


def _page_flags(base: int, pages: int) -> list[int]:
    """The kpageflags of each page mapped from *base* on (0 for a page not present)."""
    out = []
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        pm.seek(base // PAGE * 8)
        entries = struct.unpack(f"{pages}Q", pm.read(pages * 8))
        for e in entries:
            if not e & PRESENT or not e & PFN_MASK:
                out.append(0)
                continue
            kf.seek((e & PFN_MASK) * 8)
            out.append(struct.unpack("Q", kf.read(8))[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusecache.bench.folios",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("folios: needs root (the kernel hides page frame numbers)", file=sys.stderr)
        return 2
    for path in args.files:
        try:
            sizes = folio_sizes(path)
        except OSError as exc:
            print(f"folios: {path}: {exc.strerror}", file=sys.stderr)
            return 1
        if not sizes:
            print(f"{path}: smaller than a page, nothing to map")
            continue
        total = sum(size * n for size, n in sizes.items())
        large = sum(size * n for size, n in sizes.items() if size > PAGE)
        biggest = max(sizes, default=0)
        print(f"{path}: {large / total:.0%} of its pages in folios over 4 KiB "
              f"(largest {biggest // 1024} KiB, {sum(sizes.values()):,} folios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
