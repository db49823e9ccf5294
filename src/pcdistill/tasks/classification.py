"""Image classification: a student, an optional frozen teacher, the :class:`~pcdistill.distiller.Distiller`
and top-1 / top-5 accuracy."""
from __future__ import annotations

import torch
from torch import nn

from pcdistill import data as data_lib
from pcdistill.config import Config, ConfigError
from pcdistill.data.base import stratified_carve
from pcdistill.distiller import Distiller
from pcdistill.losses import build_loss
from pcdistill.models.weights import load_weights
from pcdistill.tasks.base import Task, check_loss_fits, create_model, load_teacher


def build(cfg: Config, ctx) -> Task:
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
        counts = ctx.all_reduce_sum(counts)
        total = max(counts[2].item(), 1.0)
        return {"acc": 100.0 * counts[0].item() / total, "top5": 100.0 * counts[1].item() / total}

    metadata = {"model": cfg.model.name, "model_options": cfg.model.options, "num_classes": info.num_classes,
                "in_channels": info.in_channels, "dataset": cfg.data.name}
    return Task(module, student, train_loader, eval_loaders, evaluate, "acc", metadata)
