"""The detection task for the trainer: a Faster R-CNN student, its frozen teacher and COCO evaluation.

Built from a config with ``task: detection``; ``data.name`` is a detection dataset (``coco``,
``shapes``), ``model.name`` and ``teacher.name`` are detectors (``pcdistill list detectors``).
"""
from __future__ import annotations

from pcdistill.config import Config, ConfigError
from pcdistill.data import DatasetError
from pcdistill.detection.coco import DetectionLoader, build_detection_dataset
from pcdistill.detection.distill import RoIDistiller
from pcdistill.detection.evaluate import coco_evaluate
from pcdistill.detection.models import create_detector
from pcdistill.losses import build_loss
from pcdistill.tasks.base import Task, check_loss_fits, load_teacher


def _detector(section: str, name: str, num_classes: int, options: dict):
    try:
        return create_detector(name, num_classes, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err} (see `pcdistill list detectors`)") from None


def build(cfg: Config, ctx) -> Task:
    def split(name: str):
        return build_detection_dataset(cfg.data.name, root=cfg.data.root, split=name,
                                       val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed,
                                       **cfg.data.options)

    try:
        if ctx.is_main:  # a generated dataset (shapes) is written once, by rank 0
            split("train")
        ctx.barrier()
        train, val, test = split("train"), split("val"), split("test")
    except ValueError as err:  # unknown dataset or option
        if isinstance(err, DatasetError):
            raise
        raise ConfigError(f"data: {err} (see `pcdistill list detection_datasets`)") from None
    num_classes = train.num_classes + 1
    check_loss_fits(cfg, num_classes)
    student = _detector("model", cfg.model.name, num_classes, cfg.model.options)
    teacher = load_teacher(cfg, num_classes,
                           lambda: _detector("teacher", cfg.teacher.name, num_classes, cfg.teacher.options))
    loss = build_loss(cfg.distill.method, **cfg.distill.loss)
    try:
        module = RoIDistiller(student, teacher, loss, alpha=cfg.distill.alpha, warmup_epochs=cfg.distill.warmup_epochs,
                              box_reg_weight=cfg.distill.box_reg_weight)
    except ValueError as err:
        raise ConfigError(f"teacher/model: {err}") from None
    common = dict(seed=cfg.trainer.seed, rank=ctx.rank, world_size=ctx.world_size,
                  num_workers=cfg.trainer.num_workers, device=ctx.device)
    train_loader = DetectionLoader(train, batch_size=cfg.trainer.batch_size, train=True, flip=cfg.data.augment,
                                   **common)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} leaves no full batch: the train split of "
                          f"{cfg.data.name!r} has {len(train)} images over {ctx.world_size} process(es)")
    eval_batch = cfg.trainer.eval_batch_size or cfg.trainer.batch_size
    eval_loaders = {name: DetectionLoader(ds, batch_size=eval_batch, train=False, **common)
                    for name, ds in (("val", val), ("test", test)) if len(ds)}

    def evaluate(net, loader) -> dict[str, float]:
        return coco_evaluate(net, loader, gather=ctx.gather_objects)

    metadata = {"task": "detection", "model": cfg.model.name, "model_options": cfg.model.options,
                "num_classes": num_classes, "dataset": cfg.data.name,
                "class_names": list(train.categories.names)}
    return Task(module, student, train_loader, eval_loaders, evaluate, "AP", metadata)
