"""COCO bbox evaluation (pycocotools' COCOeval) of a detector on a `CocoDetection` split.

Results are COCO result dicts `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}` in
pixels of the original images, with the dataset's original category ids. The metrics are
COCOeval's bbox `stats[0:6]` times 100: AP (IoU .50:.95), AP50, AP75, APs, APm, APl; an area
range without ground truth (COCOeval's -1) is reported as NaN, and no prediction at all gives 0.

Distributed use: each rank runs `predict(model, dataset, rank=r, world_size=w)` on its share
(images r, r + w, ...), the lists are gathered (e.g. `torch.distributed.all_gather_object`), and
`summarize(dataset, merge_predictions(lists))` scores them; `coco_evaluate(..., gather=fn)` does
all three.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Callable

import torch
from pycocotools.cocoeval import COCOeval

from pcdistill.detection.coco import CategoryMap, CocoDetection, DetectionLoader

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(detections: list[dict], targets: list[dict], categories: CategoryMap) -> list[dict]:
    """COCO result dicts of detections (torchvision format: boxes xyxy, labels 1..C, scores), one per
    box; `targets` give the image ids, in the same order as `detections`."""
    results = []
    for detection, target in zip(detections, targets):
        boxes = detection["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        labels = detection["labels"].tolist()
        scores = detection["scores"].tolist()
        image_id = int(target["image_id"])
        for box, label, score in zip(xywh, labels, scores):
            results.append({"image_id": image_id, "category_id": categories.category_id(label),
                            "bbox": box, "score": float(score)})
    return results


def _loader(source, batch_size: int, rank: int, world_size: int, device, num_workers: int) -> DetectionLoader:
    if isinstance(source, DetectionLoader):
        if source.train:
            raise ValueError("evaluation needs an eval loader (train=False): a train loader shuffles, flips and drops")
        return source
    return DetectionLoader(source, batch_size=batch_size, train=False, rank=rank, world_size=world_size,
                           device=device, num_workers=num_workers)


@torch.no_grad()
def predict(model: torch.nn.Module, loader_or_dataset, *, batch_size: int = 4, rank: int = 0, world_size: int = 1,
            num_workers: int = 0) -> list[dict]:
    """COCO results of `model` (a detector, or anything returning torchvision detections in eval mode)
    on this rank's share of the images. A loader is used as given; a dataset is read in order by an
    eval `DetectionLoader` on the model's device. The model's train/eval mode is restored."""
    device = next(model.parameters()).device
    loader = _loader(loader_or_dataset, batch_size, rank, world_size, device, num_workers)
    was_training = model.training
    model.eval()
    try:
        results = []
        for images, targets in loader:
            results.extend(to_coco_results(model(images), targets, loader.dataset.categories))
        return results
    finally:
        model.train(was_training)


def merge_predictions(per_rank: list[list[dict]]) -> list[dict]:
    """One result list from per-rank lists, ordered by image id (stable within an image)."""
    merged = [result for part in per_rank for result in part]
    return sorted(merged, key=lambda r: r["image_id"])


def summarize(dataset: CocoDetection, predictions: list[dict]) -> dict[str, float]:
    """COCO bbox metrics (see the module docstring) of `predictions` on the images of `dataset`,
    without COCOeval's printing."""
    if not predictions:
        return {name: 0.0 for name in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds fields to the dicts it is given.
        detections = dataset.coco.loadRes([dict(p) for p in predictions])
        evaluator = COCOeval(dataset.coco, detections, "bbox")
        evaluator.params.imgIds = list(dataset.image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (100.0 * float(v) if v >= 0 else math.nan) for name, v in zip(METRICS, evaluator.stats[:6])}


def coco_evaluate(model: torch.nn.Module, loader_or_dataset, *, batch_size: int = 4, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0,
                  gather: Callable[[list[dict]], list[list[dict]]] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl of `model` on a dataset or eval loader.

    With several ranks, pass `gather(obj) -> [obj of rank 0, obj of rank 1, ...]` (a wrapper of
    `torch.distributed.all_gather_object`); every rank then returns the same metrics.
    """
    predictions = predict(model, loader_or_dataset, batch_size=batch_size, rank=rank, world_size=world_size,
                          num_workers=num_workers)
    per_rank = gather(predictions) if gather is not None else [predictions]
    dataset = loader_or_dataset.dataset if isinstance(loader_or_dataset, DetectionLoader) else loader_or_dataset
    return summarize(dataset, merge_predictions(per_rank))
