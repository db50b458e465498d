"""The web-UI workload: a first switch hashes then loads a model, a second switch only loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_READ = 1 << 20  # the web UI hashes in 1 MiB reads


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_READ):
            h.update(chunk)
    return h.hexdigest()


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
