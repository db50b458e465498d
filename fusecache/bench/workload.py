"""The web-UI workload: a first switch hashes then loads a model, a second switch only loads."""

from __future__ import annotations

import ctypes
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HASH_READ = 1 << 20  # the web UI hashes in 1 MiB reads
CHUNK = 1 << 20  # what a plain sequential reader asks for at a time


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_READ):
            h.update(chunk)
    return h.hexdigest()


def read_range(path: Path, start: int, stop: int) -> int:
    """Read bytes [start, stop) of *path* in CHUNK preads; return how many arrived."""
    fd = os.open(path, os.O_RDONLY)
    try:
        got, off = 0, start
        while off < stop:
            n = len(os.pread(fd, min(CHUNK, stop - off), off))
            if n == 0:
                break
            got, off = got + n, off + n
        return got
    finally:
        os.close(fd)


def read_whole(path: Path) -> int:
    """Read all of *path* in CHUNK preads; return how many bytes arrived."""
    return read_range(path, 0, path.stat().st_size)


def page_in(path: Path) -> None:
    """Bring what the page cache lacks of *path* back in, leaving what it holds untouched.

    Reading the file would mark every page just used. On a VM that pages out
    memory idle for a while (this one: 60 s), that would make these pages look
    younger than the same model's pages through fusecache, both last used when
    the stand-in served that model's first switch.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def read_parallel(path: Path, readers: int) -> int:
    """Read the whole file with *readers* threads, each taking one consecutive share."""
    size = path.stat().st_size
    share = -(-size // readers)
    with ThreadPoolExecutor(readers) as pool:
        return sum(pool.map(lambda i: read_range(path, i * share, min(size, (i + 1) * share)),
                            range(readers)))


def load_model(path: Path) -> int:
    """Load as the web UI does, copying every tensor into fresh parameters; return bytes."""
    import torch

    if path.suffix == ".ckpt":
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
    params = {k: torch.empty_like(v).copy_(v) for k, v in state.items()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    del state, params
    return total


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20


def steady_allocator() -> bool:
    """Let every load reuse the memory the last one freed, as a long-running web UI does.

    glibc moves its mmap threshold as large blocks are freed, so whether a load's
    tensors got fresh pages (a fault per 4 KiB) or reused freed ones depended on the
    loads that came before. Measured: the same 794 MB load from the page cache took
    0.35 s after one history and 0.09 s after another, in the same process. That
    swamped the difference between a file in fusecache and a local one. Fixed
    thresholds take the history out. False where the C library has no mallopt.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # Tensors up to 32 MiB come from the heap, and the heap keeps what is freed.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def first_switch(path: Path) -> None:
    sha256_file(path)
    load_model(path)


def second_switch(path: Path) -> None:
    load_model(path)
