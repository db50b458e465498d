"""The web-UI workload: a first switch hashes then loads a model, a second switch only loads."""

from __future__ import annotations

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


def first_switch(path: Path) -> None:
    sha256_file(path)
    load_model(path)


def second_switch(path: Path) -> None:
    load_model(path)
