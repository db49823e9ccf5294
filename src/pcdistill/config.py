"""Experiment configuration: typed dataclasses loaded from YAML, with dotted command-line overrides.

    cfg = load_config("configs/digits/pcd.yaml", ["trainer.epochs=3", "distill.loss.stages=4"])

YAML is read with a ``yaml.SafeLoader`` (a config is data and never executes code), narrowed to what a
Python user expects: booleans are ``true``/``false`` only (``yes``, ``no``, ``on``, ``off`` stay strings and
are refused where a boolean is expected), every Python float literal is a float (``1e-2``, ``5E-4``,
``1_000.5``; PyYAML alone reads ``1e-2`` as a string), and a key given twice in one mapping is an error
that names both lines. Overrides on the command line are parsed the same way. Unknown keys and wrong
types are errors that name the key and suggest the closest valid one. Sections:

data      name, root, val_fraction, split_seed (carves val from train; fixed across training seeds),
          train_samples (a stratified subset of the training split, by split_seed), augment,
          options (dataset-specific, e.g. ``pairs_seed``)
model     name (``pcdistill list models``, or ``timm/<name>`` for any timm model), options (model factory
          keyword arguments; ``pretrained: true`` for timm's own weights), weights (initial weights),
          init (``task: causal_lm`` only: ``{from: PATH, layers: [i, ...]}``, a student of that model's type
          and sizes with its embeddings, final norm, output layer and the listed layers copied)
teacher   name, weights (a ``model.safetensors`` file, a run folder, or a torch checkpoint such as the
          CRD/mdistiller ``ckpt_epoch_240.pth``), options, path (``task: causal_lm`` only: the run folder
          of a causal_lm teacher run, a Hugging Face ``save_pretrained`` folder, a ``.gguf`` file, or a
          name of ``pcdistill fetch`` such as ``smollm2-135m``), cache (``task: causal_lm`` only: a
          folder of the teacher's cached hidden states, ``pcdistill cache-teacher``; built when missing)
distill   method (``pcdistill list methods``: vanilla | kd | dkd | dist | pcd | rkl | jsd | tvd), ce_weight,
          alpha, warmup_epochs,
          loss (that method's arguments, e.g. temperature, stages), box_reg_weight (detection only)
optim     name (sgd | adamw), lr, momentum, weight_decay, nesterov, clip_grad_norm
schedule  name (multistep | cosine | constant), milestones, gamma, unit (epoch | iteration),
          warmup (linear learning-rate warmup, in that unit), min_lr
trainer   epochs, iterations, batch_size, eval_batch_size, seed, device, amp, compile, channels_last,
          num_workers, sync_bn, threads, log_every, eval_every (epochs; the last is always evaluated),
          checkpoint_every (steps)

``task``: classification | detection | causal_lm. For causal_lm, ``data.name`` is a text corpus
(``python_stdlib``, ``text``) with ``data.options`` block_size, vocab_size, tokenizer and the corpus's
options; ``model.name`` is ``llama`` | ``gpt2`` | ``qwen2`` (random init, sizes in ``model.options``) or
``hf`` (``model.weights``: a ``save_pretrained`` folder or a causal_lm run folder); see
``pcdistill.tasks.causal_lm``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcdistill.registry import closest


class ConfigError(ValueError):
    """An invalid configuration: the message names the key, the problem and what is accepted."""


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first: int, second: int):
        super().__init__(f"the key {key!r} appears twice in one mapping (lines {first} and {second}); "
                         f"YAML would silently keep only the second: merge them into one")
        self.key, self.lines = key, (first, second)


_DIGITS = r"[0-9](?:_?[0-9])*"
_POINT = rf"(?:(?:{_DIGITS})?\.{_DIGITS}|{_DIGITS}\.)"
# Python's float literal grammar (with a sign), plus YAML's .inf and .nan
FLOAT_LITERAL = re.compile(rf"^(?:[-+]?(?:(?:{_DIGITS}|{_POINT})[eE][-+]?{_DIGITS}|{_POINT})"
                           rf"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_BOOL_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with true/false-only booleans, Python float literals and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
ConfigLoader.add_implicit_resolver(_FLOAT_TAG, FLOAT_LITERAL, list("-+0123456789."))


def parse_yaml(text: str):
    """``text`` read as YAML data with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    train_samples: int | None = None
    augment: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "cnn_tiny"
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)  # causal_lm: {from: teacher path, layers: [i, ...]}


@dataclass
class TeacherConfig:
    name: str | None = None
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # causal_lm: a teacher run folder, a save_pretrained folder, a .gguf file or a fetch name
    cache: str | None = None  # causal_lm: a teacher cache folder (pcdistill cache-teacher), read instead of a forward


@dataclass
class DistillConfig:
    method: str = "vanilla"
    ce_weight: float = 1.0
    alpha: float = 1.0
    warmup_epochs: float = 0.0
    loss: dict[str, Any] = field(default_factory=dict)
    box_reg_weight: float = 0.0


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    clip_grad_norm: float | None = None


@dataclass
class ScheduleConfig:
    name: str = "multistep"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    unit: str = "epoch"
    warmup: float = 0.0
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 10
    iterations: int | None = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    compile: bool = False
    channels_last: bool = False
    num_workers: int = 0
    sync_bn: bool = False
    threads: int | None = None
    log_every: int = 50
    eval_every: int = 1
    checkpoint_every: int = 0


@dataclass
class Config:
    task: str = "classification"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class _MethodNames(Sequence):
    """The names of the method table (``pcdistill.losses.methods``), read when used: importing this module
    imports no torch."""

    def _names(self) -> list[str]:
        from pcdistill.losses import list_methods
        return list_methods()

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(tuple(self._names()))


CHOICES = {
    "task": ("classification", "detection", "causal_lm"),
    "distill.method": _MethodNames(),
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("multistep", "cosine", "constant"),
    "schedule.unit": ("epoch", "iteration"),
    "trainer.amp": ("none", "bf16", "fp16"),
}


# ----------------------------------------------------------------------------------------------
# dict <-> dataclasses, with type checks
# ----------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """``value`` checked against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_type_name(item)}; got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (key: value); got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _from_dict(cls, data, prefix: str):
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        if not prefix:
            raise ConfigError(f"the config must be a mapping of sections (data:, model:, ...); got {data!r}")
        section = prefix[:-1]
        raise ConfigError(f"{section} is a section, a mapping of keys ({', '.join(names)}); got {data!r}: "
                          f"set one of its keys, e.g. {section}.{names[0]}={data}")
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}{closest(full, [prefix + n for n in names])}; "
                              f"valid keys{' in ' + prefix[:-1] if prefix else ''}: {', '.join(names)}")
        tp = hints[key]
        kwargs[key] = (_from_dict(tp, value, full + ".") if dataclasses.is_dataclass(tp)
                       else _coerce(full, value, tp))
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """A validated :class:`Config` from a plain dict (as read from YAML)."""
    cfg = _from_dict(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# YAML and overrides
# ----------------------------------------------------------------------------------------------
def _parse_value(text: str):
    try:
        return parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``3``, ``true``, ``[1, 2]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. trainer.epochs=3")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key; write e.g. trainer.epochs=3")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        files = ", ".join(sorted(p.name for p in path.glob("*.yaml"))) or "none"
        raise ConfigError(f"config {str(path)!r} is a folder; pass one YAML file in it (it holds: {files}), "
                          f"e.g. {str(path / 'pcd.yaml')!r}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a YAML file such as "
                          f"configs/digits/pcd.yaml (see `pcdistill list`)")
    try:
        data = parse_yaml(path.read_text())
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {str(path)!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (data:, model:, ...)")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict | None = None) -> Config:
    """Read a YAML file (or start from ``base``, or the defaults), apply dotted overrides, validate."""
    data = read_yaml(path) if path is not None else (base or {})
    return from_dict(apply_overrides(data, list(overrides or [])))


class _PlainDumper(yaml.SafeDumper):
    """A value used twice is written out twice: no ``&id001`` / ``*id001`` for people to decode."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_yaml(data, **options) -> str:
    """``yaml.safe_dump`` without anchors and aliases (``options``: sort_keys, default_flow_style, width, ...)."""
    return yaml.dump(data, Dumper=_PlainDumper, **options)


def save_config(cfg: Config, path: str | Path, given: dict[str, str] | None = None) -> None:
    """Write ``cfg`` as YAML; ``given`` (key -> path as typed) goes into a header comment, for display."""
    header = "".join(f"# {key} was given as {value!r}\n" for key, value in (given or {}).items())
    Path(path).write_text(header + dump_yaml(to_dict(cfg), sort_keys=False))


# paths a run reads; stored absolute so that a run resumes or is evaluated from any directory
PATH_KEYS = ("data.root", "teacher.weights", "teacher.path", "teacher.cache")


def _is_fetchable(value: str) -> bool:
    from pcdistill.lm.fetch import is_fetchable
    return is_fetchable(value)


def resolve_paths(cfg: Config) -> tuple[Config, dict[str, str]]:
    """``cfg`` with relative ``PATH_KEYS`` made absolute (against the working directory), and the given forms."""
    given = {}
    sections = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or (key == "teacher.path" and _is_fetchable(value)):
            continue
        absolute = os.path.abspath(os.path.expanduser(value))
        if absolute != value:
            given[key] = value
            sections.setdefault(section, {})[name] = absolute
    changed = {section: dataclasses.replace(getattr(cfg, section), **fields) for section, fields in sections.items()}
    return dataclasses.replace(cfg, **changed), given


# what `pcdistill train --resume DIR key=value` may change: the length of the run, the learning rate,
# where files are, and how the work is done; anything else would make it a different experiment
RESUMABLE = ("trainer.epochs", "trainer.iterations", "optim.lr", "optim.clip_grad_norm", "trainer.amp",
             "trainer.device", "trainer.threads", "trainer.num_workers", "trainer.log_every", "trainer.eval_every",
             "trainer.checkpoint_every", "trainer.eval_batch_size", "data.root", "teacher.weights", "teacher.path",
             "teacher.cache")


def flat_config(cfg: Config) -> dict[str, object]:
    """``{"section.key": value}`` of every setting of ``cfg``."""
    out = {}
    for section, value in to_dict(cfg).items():
        if isinstance(value, dict):
            out |= {f"{section}.{k}": v for k, v in value.items()}
        else:
            out[section] = value
    return out


def resume_config(saved: dict, overrides: list[str]) -> tuple[Config, dict[str, tuple]]:
    """The config of a run being resumed (``saved``, from its checkpoint) with ``overrides`` applied.

    Returns the config and ``{key: (old, new)}`` of what changed; only :data:`RESUMABLE` keys may change.
    """
    old = from_dict(saved)
    new = load_config(None, overrides, base=to_dict(old))
    before, after = flat_config(old), flat_config(new)
    changed = {k: (before[k], after[k]) for k in after if before[k] != after[k]}
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        raise ConfigError(f"--resume cannot change {', '.join(refused)}: a resumed run keeps its experiment. "
                          f"Keys that may change on resume: {', '.join(RESUMABLE)}; for anything else start a "
                          f"new run with --out")
    return new, changed


# ----------------------------------------------------------------------------------------------
# Cross-field validation
# ----------------------------------------------------------------------------------------------
def _lookup(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_device(name: str) -> None:
    import torch
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        choices = ["auto", "cpu", "cuda"]
        hint = " (an NVIDIA GPU is 'cuda')" if name.lower().startswith("gpu") else closest(name, choices)
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N (a torch device name); got "
                          f"{name!r}{hint}") from None


def validate(cfg: Config) -> None:
    """Checks beyond types: choices, ranges, and what a distillation run needs."""
    for key, choices in CHOICES.items():
        value = _lookup(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}{closest(value, choices)}")
    t, d = cfg.trainer, cfg.distill
    _check_device(t.device)
    positive = {"trainer.epochs": t.epochs, "trainer.batch_size": t.batch_size, "optim.lr": cfg.optim.lr,
                "trainer.log_every": t.log_every, "trainer.eval_every": t.eval_every}
    if t.iterations is not None:
        positive["trainer.iterations"] = t.iterations
    if t.eval_batch_size is not None:
        positive["trainer.eval_batch_size"] = t.eval_batch_size
    if t.threads is not None:
        positive["trainer.threads"] = t.threads
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0; got {value}")
    for key, value in {"trainer.num_workers": t.num_workers, "trainer.checkpoint_every": t.checkpoint_every,
                       "distill.ce_weight": d.ce_weight, "distill.alpha": d.alpha,
                       "distill.warmup_epochs": d.warmup_epochs, "optim.weight_decay": cfg.optim.weight_decay,
                       "schedule.warmup": cfg.schedule.warmup, "schedule.min_lr": cfg.schedule.min_lr,
                       "distill.box_reg_weight": d.box_reg_weight}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0; got {value}")
    if cfg.data.train_samples is not None and cfg.data.train_samples <= 0:
        raise ConfigError(f"data.train_samples must be > 0 (or null for the whole split); got {cfg.data.train_samples}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must lie in [0, 1); got {cfg.data.val_fraction}")
    if sorted(cfg.schedule.milestones) != cfg.schedule.milestones:
        raise ConfigError(f"schedule.milestones must be increasing; got {cfg.schedule.milestones}")
    if d.method == "vanilla":
        if d.loss:
            others = ", ".join(m for m in CHOICES["distill.method"] if m != "vanilla")
            raise ConfigError(f"distill.loss is set ({d.loss}) but distill.method is 'vanilla', which uses no "
                              f"distillation loss; choose a method ({others}) or remove distill.loss")
    else:
        from pcdistill.losses import build_loss, list_methods, loss_arguments
        defaults = loss_arguments(d.method)
        foreign = [key for key in d.loss if key not in defaults]
        if foreign:  # often left over from the config's own method, e.g. pcd's stages after distill.method=kd
            owners = [m for m in list_methods() if m not in ("vanilla", d.method)
                      and foreign[0] in loss_arguments(m)]
            hint = (f" (it is {' and '.join(owners)}'s; distill.loss holds the options of distill.method: drop the "
                    f"other method's with distill.loss={{}}, or set {d.method}'s with distill.loss={{...}})"
                    if owners else closest(foreign[0], defaults))
            raise ConfigError(f"distill.loss.{foreign[0]} is not an option of {d.method}{hint}; {d.method} takes "
                              f"{', '.join(defaults)}")
        for key, value in d.loss.items():
            if isinstance(defaults.get(key), bool) and not isinstance(value, bool):
                raise ConfigError(f"distill.loss.{key} must be true or false; got {value!r} ({type(value).__name__})")
        try:
            build_loss(d.method, **d.loss)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"distill.loss: {err}") from None
        if not cfg.teacher.name:
            where = "teacher.path to its run folder" if cfg.task == "causal_lm" else \
                "teacher.weights to its trained model.safetensors"
            raise ConfigError(f"distill.method is {d.method!r}, which needs a teacher: set teacher.name "
                              f"(and {where})")
    if cfg.optim.clip_grad_norm is not None and cfg.optim.clip_grad_norm <= 0:
        raise ConfigError(f"optim.clip_grad_norm must be > 0 (or null for no clipping); got {cfg.optim.clip_grad_norm}")
    if cfg.task == "classification" and d.box_reg_weight:
        raise ConfigError("distill.box_reg_weight applies to detection only; set it to 0 or task: detection")
    if cfg.task == "detection":
        if cfg.model.weights:
            raise ConfigError("model.weights applies to classification; for detection leave it unset")
        if d.ce_weight != 1.0:
            raise ConfigError("distill.ce_weight must be 1 for detection: the detector's own losses "
                              "(classifier, box, RPN) are used unweighted")
        if cfg.trainer.channels_last or cfg.trainer.compile:
            raise ConfigError("trainer.channels_last and trainer.compile are for classification; "
                              "set them to false for detection")
    if cfg.task == "causal_lm":
        _validate_causal_lm(cfg)
    elif cfg.teacher.path or cfg.teacher.cache:
        key = "teacher.path" if cfg.teacher.path else "teacher.cache"
        raise ConfigError(f"{key} is for task: causal_lm; for task: {cfg.task} set teacher.weights instead")
    elif cfg.model.init:
        raise ConfigError(f"model.init is for task: causal_lm; for task: {cfg.task} set model.weights instead")


def _validate_causal_lm(cfg: Config) -> None:
    """What ``task: causal_lm`` accepts beyond the common checks (the rest is checked when the task is built)."""
    from pcdistill.losses import fused_methods, get_method
    d, t = cfg.distill, cfg.teacher
    if d.method not in fused_methods():
        why = get_method(d.method).unfused_because
        raise ConfigError(f"distill.method {d.method!r} is not available for task: causal_lm: it has no form fused "
                          f"with the output layer, which causal LMs distill through ({why}); "
                          f"choose one of {', '.join(fused_methods())}")
    if d.box_reg_weight:
        raise ConfigError("distill.box_reg_weight applies to detection only; set it to 0")
    if cfg.trainer.channels_last:
        raise ConfigError("trainer.channels_last is for images; set it to false for task: causal_lm")
    if cfg.data.train_samples is not None:
        raise ConfigError("data.train_samples is for classification; limit a text corpus with data.options "
                          "(e.g. max_files for python_stdlib)")
    for key in ("val_fraction", "root"):
        if key in cfg.data.options:
            raise ConfigError(f"data.options.{key}: set data.{key} instead (it is passed to the corpus)")
    if t.name:
        if t.weights:
            raise ConfigError("teacher.weights is for vision tasks; a causal_lm teacher is a folder: set teacher.path "
                              "to its run folder (or a save_pretrained folder) and remove teacher.weights")
        if t.options:
            raise ConfigError(f"teacher.options is set ({t.options}), but a causal_lm teacher's sizes come from the "
                              f"config.json of its folder (teacher.path); remove teacher.options")
        if not t.path:
            raise ConfigError(f"teacher.path is not set: the {t.name} teacher would be untrained; point it to the "
                              f"run folder of a causal_lm teacher run (pcdistill train <teacher config> --out DIR "
                              f"writes DIR/hf and DIR/tokenizer) or to a save_pretrained folder")
    elif t.path or t.cache:
        key, value = ("teacher.path", t.path) if t.path else ("teacher.cache", t.cache)
        raise ConfigError(f"{key} is set ({value!r}) but teacher.name is not; set teacher.name (hf, or the "
                          f"teacher's config type: llama, gpt2, qwen2) and teacher.path, or remove {key}")
    if cfg.model.name == "hf":
        if not cfg.model.weights:
            raise ConfigError("model.name 'hf' loads a pretrained student: set model.weights to its save_pretrained "
                              "folder (or a causal_lm run folder), or use a config type (llama, gpt2, qwen2) with "
                              "model.options for a random init")
        if cfg.model.options:
            raise ConfigError(f"model.options is set ({cfg.model.options}), but model.name 'hf' takes its sizes from "
                              f"the config.json of model.weights; remove model.options")
    elif cfg.model.weights:
        raise ConfigError(f"model.weights is set for model.name {cfg.model.name!r}, a random init; to start from "
                          f"pretrained weights use model.name: hf with model.weights: FOLDER")
    if cfg.model.init:
        _validate_init(cfg)


def _validate_init(cfg: Config) -> None:
    init, example = cfg.model.init, "model.init: {from: smollm2-135m, layers: [0, 10, 20, 29]}"
    if cfg.model.name == "hf":
        raise ConfigError("model.init builds a student of a config type (llama, gpt2, qwen2) from some layers of "
                          "another model; model.name 'hf' loads a whole one from model.weights: use one or the other")
    if sorted(init) != ["from", "layers"] or not isinstance(init["from"], str):
        raise ConfigError(f"model.init takes 'from' (a model path: a folder, a .gguf file or a fetch name) and "
                          f"'layers' (the indices of the layers to keep), e.g. {example}; got {init}")
    layers = init["layers"]
    if not isinstance(layers, list) or not layers or any(isinstance(i, bool) or not isinstance(i, int)
                                                         for i in layers):
        raise ConfigError(f"model.init.layers must be a non-empty list of layer indices, e.g. {example}; "
                          f"got {layers!r}")
    if cfg.model.options:
        raise ConfigError(f"model.options is set ({cfg.model.options}), but with model.init the student's sizes "
                          f"come from {init['from']!r} (its hidden size, heads, vocabulary); remove model.options")
