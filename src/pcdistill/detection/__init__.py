"""Object detection: Faster R-CNN + FPN detectors, RoI-logit distillation (the detection recipe of
DKD, Zhao et al., CVPR 2022), COCO-format data and COCO evaluation.

    train = build_detection_dataset("shapes", root="data/shapes", split="train")
    test = build_detection_dataset("shapes", root="data/shapes", split="test")
    options = shapes_detector_options(128)
    teacher = create_detector("fasterrcnn_resnet50_fpn", train.num_classes + 1, **options)
    student = create_detector("fasterrcnn_resnet18_fpn", train.num_classes + 1, **options)
    model = RoIDistiller(student, teacher, PCDLoss(), alpha=1.0, warmup_epochs=1)
    loader = DetectionLoader(train, batch_size=4, train=True, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for step, (images, targets) in enumerate(loader):
            _, losses = model(images, targets, epoch=epoch + step / len(loader))
            sum(losses.values()).backward(); ...
    metrics = coco_evaluate(model.student, test)   # {"AP", "AP50", "AP75", "APs", "APm", "APl"}
"""
from pcdistill.detection import fashion_scenes as _fashion_scenes  # noqa: F401  (registers `fashion_scenes`)
from pcdistill.detection import shapes as _shapes  # noqa: F401  (registers the `shapes` dataset)
from pcdistill.detection.coco import (DETECTION_DATASETS, CategoryMap, CocoDetection, DetectionLoader,
                                      build_detection_dataset, collate, list_detection_datasets,
                                      register_detection_dataset)
from pcdistill.detection.distill import RoIDistiller, RoIOutputs, check_compatible
from pcdistill.detection.fashion_scenes import fashion_scenes_detector_options, write_fashion_scenes
from pcdistill.detection.evaluate import METRICS, coco_evaluate, merge_predictions, predict, summarize, to_coco_results
from pcdistill.detection.models import DETECTORS, create_detector, detector_num_classes, list_detectors
from pcdistill.detection.shapes import shapes_detector_options, write_shapes

__all__ = [
    "DETECTION_DATASETS", "DETECTORS", "METRICS", "CategoryMap", "CocoDetection", "DetectionLoader", "RoIDistiller",
    "RoIOutputs", "build_detection_dataset", "check_compatible", "coco_evaluate", "collate", "create_detector",
    "detector_num_classes", "list_detection_datasets", "list_detectors", "merge_predictions", "predict",
    "register_detection_dataset", "shapes_detector_options", "summarize", "to_coco_results", "write_shapes",
    "fashion_scenes_detector_options", "write_fashion_scenes",
]
