"""Rebuild a trained network from a ``pcdistill train`` weights file alone (its metadata names the model)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from pcdistill.models.registry import build as create
from pcdistill.models.weights import is_safetensors, load_weights, read_metadata, resolve_weights


def load_model(path: str | Path) -> nn.Module:
    """The network a ``pcdistill train`` run trained, rebuilt from its weights file and loaded, in eval mode.

    ``path`` is a run folder or its ``model.safetensors``; the model name, options and class count come
    from the file's metadata, so no config is needed. Use it as the teacher of your own loop. A causal_lm
    run gives its Hugging Face model (the same as ``AutoModelForCausalLM.from_pretrained(run / "hf")``);
    a ``.gguf`` file, a folder holding one, or a teacher name of ``pcdistill fetch`` (``smollm2-135m``)
    gives the causal LM that transformers reads from that GGUF file.
    """
    from pcdistill.lm.fetch import is_fetchable, resolve
    from pcdistill.lm.gguf import gguf_file
    if is_fetchable(path) or gguf_file(path) is not None:
        from pcdistill.lm.models import create_causal_lm
        return create_causal_lm({"path": str(resolve(path))}).eval()
    path = resolve_weights(path)
    if not is_safetensors(path):
        raise ValueError(f"{str(path)!r} is not a safetensors file written by `pcdistill train` (a .pt file is a "
                         f"training checkpoint); pass the run folder or its model.safetensors")
    meta = read_metadata(path)
    if meta.get("task") == "causal_lm":
        return _causal_lm(path, meta)
    if "model" not in meta or "num_classes" not in meta:
        raise ValueError(f"weights file {str(path)!r} has no model metadata (model, num_classes); it was not "
                         f"written by `pcdistill train`: build the model yourself and use load_weights")
    options = dict(meta.get("model_options") or {})
    if meta.get("task") == "detection":
        from pcdistill.detection.models import create_detector
        net = create_detector(meta["model"], meta["num_classes"], **options)
    else:
        net = create(meta["model"], num_classes=meta["num_classes"], in_channels=meta.get("in_channels"),
                            **options)
    load_weights(net, path)
    return net.eval()


def _causal_lm(path: Path, meta: dict) -> nn.Module:
    """A causal_lm run's student: its config type, options and vocabulary size from the metadata, then its weights."""
    from pcdistill.lm.models import CONFIGS, create_causal_lm, save_tied_once
    name = meta.get("model")
    # started from a folder or from another model's layers: the sizes are in the run's hf/ export, not the metadata
    if name == "hf" or name not in CONFIGS or meta.get("init"):
        folder = Path(path).parent / "hf"
        if not (folder / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is a causal LM started from a pretrained folder; its config is in the "
                             f"run's hf/ folder, which is missing: load {str(folder)!r} with from_pretrained")
        return create_causal_lm({"path": str(folder)}).eval()
    net = create_causal_lm({"config": name} | dict(meta.get("model_options") or {})
                           | {"vocab_size": meta["vocab_size"]})
    save_tied_once(net)  # the file names a tied tensor once, as the run saved it
    load_weights(net, path)
    return net.eval()
