"""The protocol between a task and the trainer, and the helpers the tasks share.

A task turns a config into a :class:`Task`: the module to train, the network to export, loaders, an
evaluator. The trainer only sums the named losses the module returns and asks the task for metrics.
Collectives go through the ``ctx`` a task is given (``ctx.all_reduce_sum``, ``ctx.gather_objects``,
``ctx.barrier``), so no task imports the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from pcdistill import models
from pcdistill.config import Config, ConfigError
from pcdistill.models.timm_models import is_timm_name, pretrained_num_classes
from pcdistill.models.weights import load_weights, read_metadata, resolve_weights


@dataclass
class Task:
    module: nn.Module  # forward(inputs, targets, epoch=, progress=) -> (outputs, dict of weighted losses)
    student: nn.Module  # the network being trained, exported at the end
    train_loader: Any
    eval_loaders: dict[str, Any]  # split name -> loader; empty splits are left out
    evaluate: Callable[[nn.Module, Any], dict[str, float]]
    headline: str  # the metric the summary reports: "acc" (top-1 %), "AP", "ppl"
    metadata: dict[str, object] = field(default_factory=dict)  # written into model.safetensors
    lower_is_better: tuple[str, ...] = ()  # metrics whose best over epochs is the smallest (e.g. "ppl")
    export: Callable[[nn.Module, Path], None] | None = None  # extra files for the run folder at the end


def create_model(section: str, name: str, shape, options: dict) -> nn.Module:
    """``models.create`` with errors that name the config section."""
    num_classes, in_channels = shape if isinstance(shape, tuple) else (shape.num_classes, shape.in_channels)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in options:
            raise ConfigError(f"{section}.options.{key} is set, but the {key.replace('_', ' ')} comes from the "
                              f"dataset ({value} here); remove {section}.options.{key}")
    try:
        return models.create(name, num_classes=num_classes, in_channels=in_channels, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err} (see `pcdistill list models`)") from None


def load_teacher(cfg: Config, num_classes: int, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The teacher ``build()`` makes, with ``cfg.teacher.weights`` loaded; None without a teacher.

    ``num_classes`` is what the dataset needs (for detection, with the background); weights trained
    for another count are refused before loading.
    """
    if not cfg.teacher.name:
        return None
    if not cfg.teacher.weights:
        if cfg.teacher.options.get("pretrained") is True:  # a timm teacher with timm's own weights
            try:
                trained_for = pretrained_num_classes(cfg.teacher.name) if is_timm_name(cfg.teacher.name) else None
            except ValueError as err:  # timm is not installed
                raise ConfigError(f"teacher: {err}") from None
            if trained_for not in (None, num_classes):
                raise ConfigError(f"teacher {cfg.teacher.name}: timm's pretrained weights are for {trained_for} "
                                  f"classes, the dataset has {num_classes}, so its head would be untrained; "
                                  f"fine-tune it first (model.name: {cfg.teacher.name}, options: {{pretrained: "
                                  f"true}}) and set teacher.weights to that run")
            return build()
        raise ConfigError(f"teacher.weights is not set: the {cfg.teacher.name} teacher would be untrained; "
                          f"point it to a model.safetensors from a teacher run (pcdistill train "
                          f"<teacher config> --out DIR writes DIR/model.safetensors) or to a torch checkpoint")
    try:
        path = resolve_weights(cfg.teacher.weights)
    except FileNotFoundError as err:
        raise ConfigError(f"teacher.weights: {err}") from None
    try:
        meta = read_metadata(path)
    except ValueError as err:
        raise ConfigError(f"teacher.weights: {err}") from None
    if meta.get("num_classes") not in (None, num_classes):
        raise ConfigError(f"teacher.weights {str(path)!r} was trained for {meta['num_classes']} classes but "
                          f"dataset {cfg.data.name!r} has {num_classes}; teacher and student must share classes")
    teacher = build()
    try:
        load_weights(teacher, path)
    except ValueError as err:
        raise ConfigError(f"teacher.weights: {err}") from None
    return teacher


def check_loss_fits(cfg: Config, num_classes: int) -> None:
    """Loss options bounded by the class count (PCD's stages: the method table's ``fits``), checked before a
    run folder is written."""
    from pcdistill.losses import get_method
    try:
        get_method(cfg.distill.method).check_fits(num_classes, cfg.distill.loss)
    except (TypeError, ValueError) as err:
        given = ", ".join(f"distill.loss.{k}={v}" for k, v in cfg.distill.loss.items()) or "distill.loss's defaults"
        raise ConfigError(f"{given} does not fit the {num_classes} classes of dataset {cfg.data.name!r} "
                          f"(method {cfg.distill.method}): {err}") from None
