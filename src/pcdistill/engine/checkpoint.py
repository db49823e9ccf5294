"""Atomic checkpoints (``torch.save``, read back with ``weights_only=True``) and safetensors export.

Weights files are read by :mod:`pcdistill.models.weights`, the one loader.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    _replace_atomically(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: the run folder has no checkpoints/last.pt; "
                                f"it was not started with `pcdistill train ... --out DIR`, or never finished an epoch")
    return torch.load(path, map_location="cpu", weights_only=True)


def export_weights(module: nn.Module, path: str | Path, metadata: dict[str, object]) -> None:
    """Save ``module``'s state dict as safetensors (atomically), with JSON-encoded ``metadata``."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; a weights file is as shareable as the others
    _replace_atomically(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
