"""What the trainer trains: built from a config into a module, loaders, an evaluator and the network to export.

The trainer only sums the named losses a task's module returns and asks the task for metrics; the
methods live in :mod:`pcdistill.losses` and :class:`pcdistill.distiller.Distiller`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from pcdistill import data as data_lib
from pcdistill import models
from pcdistill.config import Config, ConfigError
from pcdistill.data.base import stratified_carve
from pcdistill.distiller import Distiller
from pcdistill.engine import distributed
from pcdistill.models.timm_models import is_timm_name, pretrained_num_classes
from pcdistill.models.weights import load_weights, read_metadata, resolve_weights
from pcdistill.losses import build_loss


@dataclass
class Task:
    module: nn.Module  # forward(inputs, targets, epoch=, progress=) -> (outputs, dict of weighted losses)
    student: nn.Module  # the network being trained, exported at the end
    train_loader: Any
    eval_loaders: dict[str, Any]  # split name -> loader; empty splits are left out
    evaluate: Callable[[nn.Module, Any], dict[str, float]]
    headline: str  # the metric the summary reports: "acc" (top-1 %) or "AP"
    metadata: dict[str, object] = field(default_factory=dict)  # written into model.safetensors


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
    """Loss arguments bounded by the class count (PCD's stages), checked before a run folder is written."""
    from pcdistill.losses import loss_arguments
    if cfg.distill.method == "vanilla":
        return
    stages = cfg.distill.loss.get("stages", loss_arguments(cfg.distill.method).get("stages"))
    if isinstance(stages, int) and stages > num_classes:
        raise ConfigError(f"distill.loss.stages={stages} exceeds the {num_classes} classes of the logits "
                          f"(dataset {cfg.data.name!r}); each stage splits the classes into that many groups, "
                          f"so stages must lie in [1, {num_classes}]")


def classification_task(cfg: Config, ctx: distributed.Context) -> Task:
    splits = data_lib.build(cfg.data.name, root=cfg.data.root, val_fraction=cfg.data.val_fraction,
                            seed=cfg.data.split_seed, **cfg.data.options)
    info = splits.info
    train_split = splits.train
    if cfg.data.train_samples is not None and cfg.data.train_samples < len(train_split):
        # a stratified, seeded subset: the same samples for every training seed and method
        keep = stratified_carve(train_split.targets, cfg.data.train_samples / len(train_split), cfg.data.split_seed)[1]
        train_split = train_split.subset(keep)
    check_loss_fits(cfg, info.num_classes)
    student = create_model("model", cfg.model.name, info, cfg.model.options)
    if cfg.model.weights:
        try:
            load_weights(student, cfg.model.weights)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model.weights: {err}") from None
    teacher = load_teacher(cfg, info.num_classes,
                           lambda: create_model("teacher", cfg.teacher.name, info, cfg.teacher.options))
    loss = build_loss(cfg.distill.method, **cfg.distill.loss)
    module = Distiller(student, teacher, loss, ce_weight=cfg.distill.ce_weight, alpha=cfg.distill.alpha,
                       warmup_epochs=cfg.distill.warmup_epochs)
    common = dict(seed=cfg.trainer.seed, rank=ctx.rank, world_size=ctx.world_size,
                  num_workers=cfg.trainer.num_workers, device=ctx.device)
    eval_batch = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
    train_loader = data_lib.make_loader(train_split, batch_size=cfg.trainer.batch_size, train=True,
                                        augment=cfg.data.augment, **common)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} leaves no full batch: the train split "
                          f"of {cfg.data.name!r} has {len(train_split)} samples over {ctx.world_size} process(es)")
    eval_loaders = {name: data_lib.make_loader(split, batch_size=eval_batch, train=False, **common)
                    for name, split in (("val", splits.val), ("test", splits.test)) if len(split)}

    def evaluate(net: nn.Module, loader) -> dict[str, float]:
        counts = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # top-1, top-5, total
        k = min(5, info.num_classes)
        for images, targets in loader:
            logits = net(images)
            top = logits.topk(k, dim=-1).indices
            hits = top == targets.unsqueeze(-1)
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(dim=-1).sum()
            counts[2] += targets.numel()
        counts = distributed.all_reduce_sum(counts, ctx)
        total = max(counts[2].item(), 1.0)
        return {"acc": 100.0 * counts[0].item() / total, "top5": 100.0 * counts[1].item() / total}

    metadata = {"model": cfg.model.name, "model_options": cfg.model.options, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "dataset": cfg.data.name}
    return Task(module, student, train_loader, eval_loaders, evaluate, "acc", metadata)


def build_task(cfg: Config, ctx: distributed.Context) -> Task:
    if cfg.task == "detection":
        from pcdistill.detection.task import detection_task  # imported lazily: pycocotools, torchvision ops
        return detection_task(cfg, ctx)
    return classification_task(cfg, ctx)
