"""The model set, named and sized after the study's test table, scaled down for quick runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (file name, size in GB) from the study's Stable Diffusion test table.
MODELS: list[tuple[str, float]] = [
    ("Anything-v4.5-pruned-mergedVae.safetensors", 3.97),
    ("Anything-v5.0-PRT-RE.safetensors", 1.99),
    ("CounterfeitV30_v30.safetensors", 3.95),
    ("Deliberate_v2.safetensors", 1.99),
    ("DreamShaper_6_NoVae.safetensors", 5.55),
    ("cetusMix_Coda2.safetensors", 3.59),
    ("chilloutmix_NiPrunedFp32Fix.safetensors", 3.97),
    ("pastelmix-fp32.ckpt", 3.97),
    ("revAnimated_v122.safetensors", 5.13),
    ("sd_xl_base_1.0.safetensors", 6.46),
]
TENSORS = 1000  # a real SD checkpoint holds about a thousand tensors


def target_size(gb: float, scale: float) -> int:
    return int(gb * 1e9 * scale)


def _tensors(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    each = max(2, size // TENSORS) // 2 * 2
    return {
        f"model.diffusion_model.block{i:04d}.weight": np.frombuffer(rng.bytes(each), "<f2")
        for i in range(TENSORS)
    }


def write_model(path: Path, size: int, seed: int) -> None:
    """A real safetensors file, or a real torch zip checkpoint for .ckpt, of about *size* bytes."""
    tmp = path.with_name(path.name + ".part")
    tensors = _tensors(size, seed)
    if path.suffix == ".ckpt":
        import torch

        state = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
        torch.save({"state_dict": state}, tmp)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp))
    tmp.rename(path)


def ensure_models(directory: Path, names: list[str], scale: float) -> list[Path]:
    """Create the named models in *directory* unless present; return their paths."""
    sizes = dict(MODELS)
    paths = []
    for seed, name in enumerate(names):
        path = directory / name
        if not path.exists():
            write_model(path, target_size(sizes[name], scale), seed)
        paths.append(path)
    return paths
