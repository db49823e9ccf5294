"""One weight loader for every model: safetensors files and torch checkpoints, strictly checked.

    from pcdistill.models.weights import load_weights
    load_weights(model, "resnet32x4_vanilla/ckpt_epoch_240.pth")

Accepted files:

* safetensors (``.safetensors``, e.g. a run's ``model.safetensors``; a run folder stands for it);
* torch checkpoints (``.pth``, ``.pt``, ``.tar``, any other name), read with
  ``torch.load(weights_only=True)`` only: the state dict at the top level or under ``"model"``,
  ``"state_dict"``, ``"net"`` or ``"model_state"``. A file that needs pickled code is refused.

A ``module.`` prefix (``nn.DataParallel``/DDP) is stripped. CIFAR networks also accept the key names
of the CRD / RepDistiller / mdistiller zoo (:mod:`pcdistill.models.crd_names`). Loading is strict:
missing, unexpected and mis-shaped tensors are named in the error.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from pcdistill.models.crd_names import crd_key_map

STATE_DICT_KEYS = ("model", "state_dict", "net", "model_state")
_LAYOUT = ("a safetensors file, or a torch checkpoint (.pth/.pt/.tar) holding a state dict at the top "
           f"level or under one of {', '.join(map(repr, STATE_DICT_KEYS))}")


def resolve_weights(path: str | Path) -> Path:
    """A weights file from a path that is either the file or a run folder holding ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; expected {_LAYOUT}, or a run "
                                f"folder of `pcdistill train` (it holds model.safetensors)")
    return path


def is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def read_metadata(path: str | Path) -> dict[str, object]:
    """The JSON metadata of a safetensors file written by pcdistill; ``{}`` for torch checkpoints."""
    path = resolve_weights(path)
    if not is_safetensors(path):
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        return {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read weights file {str(path)!r}: {err}; expected {_LAYOUT}") from None


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The Python objects a file would need unpickled; [] when it is no pickle of objects at all."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file cannot be scanned; torch's message names the global
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return list(names)


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path, err)
        if not names:  # not a pickle at all, or a damaged one
            reason = str(err).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(err)
            raise ValueError(f"cannot read weights file {str(path)!r} as a torch checkpoint: {reason}; "
                             f"expected {_LAYOUT}") from None
        raise ValueError(
            f"refusing to load {str(path)!r}: it stores pickled Python objects ({', '.join(names[:5])}) besides "
            f"tensors, and unpickling them would run code from the file. pcdistill reads checkpoints with "
            f"torch.load(weights_only=True) only; where the file was made, save the weights alone with "
            f"torch.save(model.state_dict(), PATH) (or convert them to safetensors)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read weights file {str(path)!r} as a torch checkpoint: {err}; "
                         f"expected {_LAYOUT}") from None
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
        found = f"its top-level keys are {', '.join(map(repr, list(obj)[:8]))}"
        if "pcdistill" in obj and "student" in obj:
            found += (" (a pcdistill training checkpoint: a run's trained weights are its model.safetensors, "
                      "or pass the run folder)")
    else:
        found = f"it holds a {type(obj).__name__}"
    raise ValueError(f"weights file {str(path)!r} holds no state dict: {found}; expected {_LAYOUT}")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (any accepted layout), on the CPU, with a ``module.`` prefix stripped."""
    path = resolve_weights(path)
    if is_safetensors(path):
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read weights file {str(path)!r}: {err}; expected {_LAYOUT}") from None
    else:
        state = _torch_state_dict(path)
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _mismatch(state: dict, own: dict, shown: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Missing, unexpected and mis-shaped keys, named as the file's layout names them (``shown``: ours -> that)."""
    # Old checkpoints lack num_batches_tracked, which only matters for BN without momentum.
    missing = sorted(shown.get(k, k) for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(shown.get(k, k) for k in set(state) - set(own))
    wrong = [f"{shown.get(k, k)}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    return missing, unexpected, wrong


def load_weights(module: nn.Module, path: str | Path) -> dict[str, object]:
    """Load a weights file into ``module`` (strict) and return its metadata (``{}`` for torch files)."""
    path = resolve_weights(path)
    metadata = read_metadata(path)
    state = read_state_dict(path)
    own = module.state_dict()
    problems = _mismatch(state, own, {})
    crd = crd_key_map(module)
    if any(problems) and crd is not None:
        renamed = {crd.get(k, k): v for k, v in state.items()}
        crd_problems = _mismatch(renamed, own, {ours: theirs for theirs, ours in crd.items()})
        if sum(map(len, crd_problems)) < sum(map(len, problems)):  # report against the closer layout
            state, problems = renamed, crd_problems
    missing, unexpected, wrong = problems
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} tensors ({', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} tensors ({', '.join(unexpected[:3])})" if unexpected else "",
            f"{len(wrong)} shape mismatches ({', '.join(wrong[:3])})" if wrong else ""]))
        made_for = (f" (the file was written for model {metadata.get('model')!r} with "
                    f"{metadata.get('num_classes')} classes)" if metadata.get("model") else "")
        names = "pcdistill's key names" + (" or those of the CRD/mdistiller CIFAR zoo" if crd else "")
        raise ValueError(f"weights file {str(path)!r} does not fit this {type(module).__name__}{made_for}: "
                         f"{detail}; expected {names}, for the same architecture and class count")
    for key in set(own) - set(state):  # only num_batches_tracked can be left
        state[key] = own[key]
    module.load_state_dict(state)
    return metadata
