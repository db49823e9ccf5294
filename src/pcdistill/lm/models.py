"""Hugging Face causal language models: build one from a spec, and reach its last hidden states and output layer.

    student = create_causal_lm({"config": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 8192})
    teacher = create_causal_lm({"path": "teachers/qwen2-0.5b"})        # a save_pretrained folder, read locally
    teacher = create_causal_lm({"path": "smollm2-135m"})               # a GGUF file, a folder holding one, or a
                                                                      # name of `pcdistill fetch`
    ok, why = fusable(student)                                        # can the loss be fused with its lm_head?
    hidden = last_hidden_states(student, input_ids)                    # (B, L, H), the full logits never built

transformers is imported on first use (inside create_causal_lm), so the vision path never needs it.
"""
from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from pcdistill.registry import closest

from .fetch import resolve
from .gguf import gguf_file, load_gguf_model

CONFIGS = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "qwen2": "Qwen2Config"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# config attributes that change the logits after the output layer (Gemma 2/3, Cohere, Granite, ...)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def create_causal_lm(spec: dict) -> nn.Module:
    """``{"path": folder}``: ``AutoModelForCausalLM.from_pretrained(folder)``, local files only; or
    ``{"config": "llama" | "gpt2" | "qwen2", "vocab_size": V, <that config's keys>}``: a random init.

    ``path`` may also be a ``.gguf`` file or a folder holding one (:func:`pcdistill.lm.gguf.load_gguf_model`,
    dequantized to float32), or a teacher name of ``pcdistill fetch`` (``smollm2-135m``), which stands for
    the file that command put in the cache."""
    if not isinstance(spec, dict):
        raise TypeError(f"a causal LM spec is a dict with 'path' or 'config'; got {type(spec).__name__}")
    if ("path" in spec) == ("config" in spec):
        raise ValueError(f"a causal LM spec needs exactly one of 'path' (a save_pretrained folder) or 'config' "
                         f"({' | '.join(CONFIGS)}); got keys {sorted(spec)}")
    import transformers

    if "path" in spec:
        extra = sorted(set(spec) - {"path"})
        if extra:
            raise ValueError(f"a 'path' spec takes no other key; got {extra} (the folder's config.json holds the rest)")
        folder = resolve(spec["path"])
        file = gguf_file(folder)
        if file is not None:
            return load_gguf_model(file)
        if not (folder / "config.json").is_file() or not any((folder / name).is_file() for name in WEIGHT_FILES):
            raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: expected config.json and one of "
                                    f"{', '.join(WEIGHT_FILES)} (as written by model.save_pretrained(folder)), "
                                    f"or a .gguf file")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    name = spec["config"]
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}{closest(str(name), list(CONFIGS))}; known: {', '.join(CONFIGS)}")
    config_cls = getattr(transformers, CONFIGS[name])
    keys = {k: v for k, v in spec.items() if k != "config"}
    params = inspect.signature(config_cls.__init__).parameters
    defaults = {p: params[p].default for p in params if p not in ("self", "kwargs")}
    defaults |= {alias: defaults.get(key) for alias, key in getattr(config_cls, "attribute_map", {}).items()}
    for key, value in keys.items():
        if key not in defaults:
            # a suggestion of the value's kind first: hidden=8 means hidden_size, not hidden_act
            alike = [k for k, d in defaults.items() if d is None or type(d) is type(value)]
            raise ValueError(f"{CONFIGS[name]} has no key {key!r}{closest(key, alike) or closest(key, list(defaults))}")
    if "vocab_size" not in keys:
        raise ValueError(f"a {name!r} spec needs vocab_size (the tokenizer's vocabulary size)")
    return transformers.AutoModelForCausalLM.from_config(config_cls(**keys))


LAYER_KEY = re.compile(r"(^|\.)(layers|h)\.(\d+)\.")  # a decoder layer's index in a state dict key


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """A new causal LM of ``model``'s type and sizes with only its decoder layers ``layers`` (in that order):
    embeddings, final norm, output layer and those layers' weights copied, the prune-then-distill
    initialisation of DistilBERT (every other layer) and Minitron (depth pruning)."""
    import copy

    import transformers
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ValueError(f"layers must be a non-empty list of layer indices; got {layers!r}")
    if sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= total:
        raise ValueError(f"layers must be increasing indices in [0, {total}) (the source has {total} layers); "
                         f"got {layers}")
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Gemma)
        config.layer_types = [config.layer_types[i] for i in layers]
    if hasattr(config, "quantization_config"):  # a GGUF source was dequantized; the copy is a plain model
        del config.quantization_config
    pruned = transformers.AutoModelForCausalLM.from_config(config)
    source = model.state_dict()

    def origin(key: str) -> str:
        return LAYER_KEY.sub(lambda m: f"{m.group(1)}{m.group(2)}.{layers[int(m.group(3))]}.", key, count=1)
    pruned.load_state_dict({key: source[origin(key)] for key in pruned.state_dict()})
    return pruned


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP1 (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_layer(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight (V, H), bias (V,) or None)`` of the output embedding, or None when it is not an ``nn.Linear``."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    return (head.weight, head.bias) if isinstance(head, nn.Linear) else None


def _sharding(model: nn.Module) -> str | None:
    """Why the output weight is not whole outside forward (FSDP1 or FSDP2), or None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()):
        return "it is sharded by FSDP, which gathers the output weight only inside the model's forward"
    layer = output_layer(model)
    if layer is not None and isinstance(layer[0], DTensor):
        return "its output weight is a DTensor (sharded or tensor-parallel)"
    return None


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(unwrap(model).forward).parameters


def _no_cache(model: nn.Module) -> dict:
    """``use_cache=False`` where the forward takes it: training builds no key-value cache."""
    return {"use_cache": False} if _accepts(model, "use_cache") else {}


def fusable(model: nn.Module) -> tuple[bool, str]:
    """Whether the loss may be computed from the last hidden states and the output layer's weight, and why.

    Not under FSDP (the weight is sharded outside forward), nor when the output embedding is not an
    ``nn.Linear``, the config declares a logit transform (softcapping, a logit scale) or the forward
    takes no ``logits_to_keep``; else the model runs once on two tokens (no grad), its output layer must
    see ``hidden_states[-1]`` and its logits must be that layer's output, which catches a transform the
    config does not name (compared within the forward, so an autocast around it does not count).
    """
    sharded = _sharding(model)
    if sharded:
        return False, sharded
    inner = unwrap(model)
    if output_layer(inner) is None:
        head = getattr(inner, "get_output_embeddings", lambda: None)()
        return False, f"its output embedding is {type(head).__name__}, not an nn.Linear reachable via " \
                      f"get_output_embeddings()"
    configs = [getattr(inner, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    for config in filter(None, configs):
        for key in LOGIT_TRANSFORMS:
            value = getattr(config, key, None)
            if value is None or (key != "final_logit_softcapping" and value == 1):
                continue  # a scale of 1 changes nothing
            return False, f"its config sets {key}={value}, which transforms the logits after the output layer"
        if getattr(config, "tie_last_hidden_states", True) is False:
            return False, "its config sets tie_last_hidden_states=False, so hidden_states[-1] precedes the final norm"
    if not _accepts(inner, "logits_to_keep"):
        return False, "its forward has no logits_to_keep argument, so it computes the full logits anyway"
    if getattr(inner, "logits_from_output_layer", False):  # a cached teacher: lm_head(hidden states) by definition
        return True, "its logits are its output layer applied to its hidden states"
    return _probe(inner)


def _probe(model: nn.Module) -> tuple[bool, str]:
    """Run two tokens and check that the output layer sees ``hidden_states[-1]`` and that its output is the logits.

    Both sides are taken from the one forward (a hook on the output layer), so whatever autocast that forward
    runs under (Accelerate wraps it under ``bf16=True``) rounds both alike and only a real transform shows.
    """
    weight, _ = output_layer(model)
    head = unwrap(model).get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[0, 1]], device=weight.device), output_hidden_states=True,
                        **_no_cache(model))
    finally:
        hook.remove()
    if len(seen) != 1:
        return False, f"its forward called its output layer {len(seen)} times, not once on the last hidden states"
    head_in, head_out = seen[0]
    hidden, logits = out.hidden_states[-1], out.logits
    for mine, theirs, what in ((head_in, hidden, "the output layer's input differs from hidden_states[-1]"),
                               (head_out, logits, "its logits differ from lm_head(hidden_states[-1])")):
        if mine.shape != theirs.shape or not torch.allclose(mine.float(), theirs.float(), rtol=1e-3, atol=1e-3):
            diff = (mine.float() - theirs.float()).abs().max().item() if mine.shape == theirs.shape else float("nan")
            return False, f"{what} (largest difference {diff:.3g}): its forward transforms them around the output layer"
    return True, "its logits are lm_head(hidden_states[-1]) (checked on two tokens)"


def last_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The post-final-norm hidden states ``(B, L, H)``, through the model's own forward (wrappers see the call)."""
    kwargs = {"output_hidden_states": True, **_no_cache(model)}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # the lm_head runs on the last position only
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.hidden_states[-1]


def full_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own logits ``(B, L, V)`` (the unfused path: softcapping and scaling included)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, **_no_cache(model)).logits


def save_tied_once(model: nn.Module) -> None:
    """State dicts of ``model`` name a tied tensor once (safetensors refuses two names for one tensor, e.g. GPT-2's
    shared input and output embeddings); loading accepts the missing alias, which the tie fills."""
    first: dict[int, str] = {}
    aliases = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.append(name)
        else:
            first[id(param)] = name
    if not aliases:
        return

    def drop(module, state_dict, prefix, local_metadata):
        for alias in aliases:
            state_dict.pop(prefix + alias, None)

    def allow(module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not any(k == a or k.endswith("." + a) for a in aliases)]

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_post_hook(allow)
