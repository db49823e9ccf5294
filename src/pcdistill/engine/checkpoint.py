"""Atomic checkpoints (``torch.save``, read back with ``weights_only=True``) and safetensors export."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
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
    _replace_atomically(tmp, path)


def read_metadata(path: str | Path) -> dict[str, object]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    return {k: json.loads(v) for k, v in raw.items()}


def resolve_weights(path: str | Path) -> Path:
    """A weights file from a path that is either the file or a run folder holding ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; expected a model.safetensors written "
                                f"by `pcdistill train` (in its --out folder) or that folder itself")
    return path


def load_weights(module: nn.Module, path: str | Path) -> dict[str, object]:
    """Load safetensors weights into ``module`` (strict) and return the file's metadata."""
    path = resolve_weights(path)
    try:
        state = load_file(str(path))
        metadata = read_metadata(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read weights file {str(path)!r}: {err}; expected a safetensors file "
                         f"written by `pcdistill train`") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else "",
            f"unexpected {len(unexpected)} tensors (e.g. {unexpected[0]})" if unexpected else "",
            f"shape mismatches: {', '.join(wrong[:3])}" if wrong else ""]))
        made_for = f" (the file was written for model {metadata.get('model')!r} with " \
                   f"{metadata.get('num_classes')} classes)" if metadata else ""
        raise ValueError(f"weights file {str(path)!r} does not fit this model{made_for}: {detail}")
    module.load_state_dict(state)
    return metadata
