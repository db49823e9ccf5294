"""Tests of pcdistill.detection: RoI-logit alignment and distillation, COCO data, shapes, evaluation."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pcdistill.data.base import DatasetError
from pcdistill.detection import (CocoDetection, DetectionLoader, RoIDistiller, build_detection_dataset, coco_evaluate,
                                 create_detector, list_detectors, merge_predictions, predict, summarize,
                                 shapes_detector_options, to_coco_results, write_shapes)
from pcdistill.losses import DKDLoss, KDLoss, PCDLoss, get_method, list_methods

NUM_CLASSES = 4  # 3 object classes + background
TINY = dict(min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128), box_batch_size_per_image=32,
            rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=50)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run far faster on one thread than on two cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_detector(seed: int = 0, **options):
    torch.manual_seed(seed)
    return create_detector("fasterrcnn_resnet18_fpn", NUM_CLASSES, **{**TINY, **options})


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 34.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def record_pool_inputs(model):
    """List that receives the proposals passed to `model`'s RoI pooler on each call."""
    seen = []
    model.roi_heads.box_roi_pool.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    return seen


# ----------------------------------------------------------------------------------------------
# Models and distillation
# ----------------------------------------------------------------------------------------------
def test_detector_registry_and_options():
    assert list_detectors() == ["fasterrcnn_mobilenet_v3_fpn", "fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn",
                                "fasterrcnn_resnet50_fpn"]
    model = tiny_detector(box_positive_fraction=0.5, trainable_backbone_layers=2, min_size=(56, 64))
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert model.roi_heads.fg_bg_sampler.positive_fraction == 0.5
    assert model.transform.min_size == (56, 64)
    assert not model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert model.backbone.body.layer3[0].conv1.weight.requires_grad
    assert [s for (s,) in model.rpn.anchor_generator.sizes] == [8, 16, 32, 64, 128]
    shapes_model = create_detector("fasterrcnn_resnet18_fpn", 6, **shapes_detector_options(64))
    assert [s for (s,) in shapes_model.rpn.anchor_generator.sizes] == [4, 8, 16, 32, 64]
    assert shapes_model.transform.min_size == (64,) and shapes_model.transform.max_size == 64
    with pytest.raises(TypeError, match="anchor_size"):
        create_detector("fasterrcnn_resnet18_fpn", NUM_CLASSES, anchor_size=(8,))
    with pytest.raises(ValueError, match="fasterrcnn_resnet18_fpn"):
        create_detector("fasterrcnn_resnet18", NUM_CLASSES)


def test_teacher_and_student_logits_are_aligned_row_by_row():
    student = tiny_detector()
    teacher = copy.deepcopy(student)
    distiller = RoIDistiller(student, teacher, KDLoss()).eval()  # eval: same BatchNorm statistics in both
    student_seen, teacher_seen = record_pool_inputs(student), record_pool_inputs(teacher)
    images, targets = batch()
    s_logits, t_logits, labels, proposals = distiller.roi_logits(images, targets)
    assert s_logits.shape == t_logits.shape == (labels.numel(), NUM_CLASSES)
    assert torch.equal(s_logits, t_logits)
    assert len(teacher_seen) == len(student_seen) == 1
    for mine, theirs, returned in zip(student_seen[0], teacher_seen[0], proposals):
        assert torch.equal(mine, theirs) and torch.equal(mine, returned)
    # The sampled proposals include every ground-truth box, labelled with its class.
    for boxes, target, image_labels in zip(proposals, targets, labels.split([len(p) for p in proposals])):
        for box, label in zip(target["boxes"], target["labels"]):
            hit = (boxes == box).all(dim=1)
            assert hit.any() and (image_labels[hit] == label).all()
    assert (labels == 0).any() and (labels > 0).any()


def test_teacher_pools_the_students_training_samples():
    student, teacher = tiny_detector(0), tiny_detector(1)
    distiller = RoIDistiller(student, teacher, PCDLoss()).train()
    student_seen, teacher_seen = record_pool_inputs(student), record_pool_inputs(teacher)
    images, targets = batch()
    _, losses = distiller(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "distill"}
    assert student.training and not teacher.training
    assert sum(len(p) for p in student_seen[0]) == 2 * 32
    for mine, theirs in zip(student_seen[0], teacher_seen[0]):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("method", [m for m in list_methods() if get_method(m).row_spec is not None])
def test_distill_loss_is_zero_when_student_equals_teacher(method):
    loss = get_method(method).module()
    student = tiny_detector()
    distiller = RoIDistiller(student, copy.deepcopy(student), loss).eval()
    s_logits, t_logits, labels, _ = distiller.roi_logits(*batch())
    assert distiller.distill_loss(s_logits, t_logits, labels).abs().item() < 1e-6


def test_dkd_receives_the_proposal_labels_and_warmup_scales_the_term():
    class SpyDKD(DKDLoss):
        def forward(self, student_logits, teacher_logits, target, *, valid=None):
            self.target = target
            return super().forward(student_logits, teacher_logits, target, valid=valid)

    spy = SpyDKD()
    distiller = RoIDistiller(tiny_detector(0), tiny_detector(1), spy, alpha=2.0, warmup_epochs=2.0).train()
    images, targets = batch()
    torch.manual_seed(5)
    out = distiller.rois(images, targets)
    torch.manual_seed(5)  # the RoI sampler draws from the global RNG
    _, losses = distiller(images, targets, epoch=0.5)
    assert torch.equal(spy.target, out.labels)
    expected = 2.0 * 0.25 * DKDLoss()(out.student_logits, out.teacher_logits, out.labels)
    torch.testing.assert_close(losses["distill"], expected)


def test_gradients_reach_the_student_never_the_teacher():
    student, teacher = tiny_detector(0), tiny_detector(1)
    distiller = RoIDistiller(student, teacher, PCDLoss(), box_reg_weight=1.0).train()
    _, losses = distiller(*batch(), epoch=1.0, progress=0.5)
    assert "distill_box" in losses
    (losses["distill"] + losses["distill_box"]).backward(retain_graph=True)
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert student.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_checks_compatibility_and_eval_returns_detections():
    student = tiny_detector()
    with pytest.raises(ValueError, match="student has 4, teacher has 6"):
        RoIDistiller(student, create_detector("fasterrcnn_resnet18_fpn", 6, **TINY), KDLoss())
    with pytest.raises(ValueError, match="min_size: student \\(64,\\), teacher \\(96,\\)"):
        RoIDistiller(student, tiny_detector(min_size=96), KDLoss())
    vanilla = RoIDistiller(student, None).eval()
    detections = vanilla(batch()[0])
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}
    _, losses = vanilla.train()(*batch())
    assert "distill" not in losses and len(losses) == 4


# ----------------------------------------------------------------------------------------------
# COCO data, written by hand
# ----------------------------------------------------------------------------------------------
CATEGORIES = [{"id": 7, "name": "bee"}, {"id": 3, "name": "ant"}, {"id": 12, "name": "cat"}]
LABEL_OF = {3: 1, 7: 2, 12: 3}  # contiguous labels in increasing category-id order


def write_coco(root, images=None, annotations=None, categories=CATEGORIES, seed=0, skip_files=()):
    """A COCO instances json + PNG images under root/images; returns (json path, {image id: pixels})."""
    rng = np.random.default_rng(seed)
    if images is None:
        images = [{"id": 5, "file_name": "a.png", "width": 40, "height": 30},
                  {"id": 9, "file_name": "b.png", "width": 32, "height": 48}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2.5, 3.0, 10.0, 20.0], "iscrowd": 0, "area": 200.0},
            {"id": 2, "image_id": 5, "category_id": 12, "bbox": [20, 0, 20, 30], "iscrowd": 0, "area": 600.0},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1, "area": 25.0},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [1, 2, 30, 44], "iscrowd": 0, "area": 1320.0},
        ]
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels = {}
    for image in images:
        array = rng.integers(0, 256, (image["height"], image["width"], 3), dtype=np.uint8)
        if image["file_name"] not in skip_files:
            Image.fromarray(array).save(root / "images" / image["file_name"])
        pixels[image["id"]] = array
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, pixels


def test_coco_round_trip(tmp_path):
    path, pixels = write_coco(tmp_path)
    dataset = CocoDetection(path, tmp_path / "images")
    assert dataset.image_ids == [5, 9] and len(dataset) == 2 and dataset.num_classes == 3
    assert dataset.categories.ids == (3, 7, 12) and dataset.categories.names == ("ant", "bee", "cat")
    assert [dataset.categories.category_id(label) for label in (1, 2, 3)] == [3, 7, 12]
    truth = json.loads(path.read_text())["annotations"]
    for index, image_id in enumerate([5, 9]):
        image, target = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, *pixels[image_id].shape[:2])
        assert torch.equal(image, torch.from_numpy(pixels[image_id]).permute(2, 0, 1).float() / 255)
        anns = [a for a in truth if a["image_id"] == image_id and not a["iscrowd"]]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        assert target["image_id"] == image_id
        assert torch.equal(target["boxes"], expected)
        assert target["labels"].tolist() == [LABEL_OF[a["category_id"]] for a in anns]
        assert target["labels"].dtype == torch.int64

    flipped, target = dataset.sample(0, flip=True)
    assert torch.equal(flipped, dataset[0][0].flip(-1))
    assert torch.equal(target["boxes"], torch.tensor([[27.5, 3.0, 37.5, 23.0], [0.0, 0.0, 20.0, 30.0]]))


def test_detection_loader_is_seeded_and_sharded(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 16, "height": 16} for i in range(1, 9)]
    annotations = [{"id": i, "image_id": i, "category_id": 3, "bbox": [1, 2, 6, 8], "iscrowd": 0} for i in range(1, 9)]
    path, _ = write_coco(tmp_path, images, annotations)
    dataset = CocoDetection(path, tmp_path / "images")
    shards = [DetectionLoader(dataset, batch_size=2, train=True, seed=3, rank=r, world_size=2) for r in range(2)]
    for loader in shards:
        loader.set_epoch(1)
    keys = [loader.keys() for loader in shards]
    assert sorted(i for part in keys for i, _ in part) == list(range(8))
    state = torch.get_rng_state()
    images_a, targets_a = next(iter(shards[0]))
    shards[0].set_epoch(1)
    images_b, targets_b = next(iter(shards[0]))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
    for (index, flip), target in zip(keys[0], targets_a):
        assert target["boxes"].tolist() == [[9.0, 2.0, 15.0, 10.0] if flip else [1.0, 2.0, 7.0, 10.0]]
    eval_loader = DetectionLoader(dataset, batch_size=3, train=False, rank=1, world_size=2)
    assert eval_loader.keys() == [(i, False) for i in (1, 3, 5, 7)] and len(eval_loader) == 2


@pytest.mark.parametrize("case, message", [
    ("missing_file", "image 9: missing image file .*b.png"),
    ("negative_width", "annotation 4 of image 9 has bbox \\[1, 2, -3, 44\\]"),
    ("outside", "annotation 2 of image 5 .* outside the 40x30 image"),
    ("not_numbers", "annotation 1 of image 5 .* not 4 finite numbers"),
    ("unknown_category", "annotation 4 of image 9 has unknown category id 99"),
    ("zero_height", "annotation 1 of image 5 .* width or height <= 0"),
])
def test_malformed_annotations_name_the_culprit(tmp_path, case, message):
    _, _ = write_coco(tmp_path)
    document = json.loads((tmp_path / "instances.json").read_text())
    anns = {a["id"]: a for a in document["annotations"]}
    skip = ()
    if case == "missing_file":
        skip = ("b.png",)
    elif case == "negative_width":
        anns[4]["bbox"] = [1, 2, -3, 44]
    elif case == "outside":
        anns[2]["bbox"] = [20, 0, 22, 30]
    elif case == "not_numbers":
        anns[1]["bbox"] = [1, 2, 3]
    elif case == "unknown_category":
        anns[4]["category_id"] = 99
    else:
        anns[1]["bbox"] = [2, 3, 10, 0]
    path, _ = write_coco(tmp_path, document["images"], document["annotations"], skip_files=skip)
    if skip:
        (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DatasetError, match=message):
        CocoDetection(path, tmp_path / "images")


def test_zero_size_boxes_can_be_dropped_and_missing_json_is_explained(tmp_path):
    document_path, _ = write_coco(tmp_path)
    document = json.loads(document_path.read_text())
    document["annotations"][0]["bbox"] = [2, 3, 10, 0]
    document_path.write_text(json.dumps(document))
    dataset = CocoDetection(document_path, tmp_path / "images", degenerate="drop")
    assert dataset.dropped_annotations == [1] and dataset[0][1]["labels"].tolist() == [3]

    missing = tmp_path / "nowhere" / "instances.json"
    with pytest.raises(DatasetError, match=f"missing COCO annotation file {missing}"):
        CocoDetection(missing, tmp_path / "images")
    with pytest.raises(DatasetError, match="annotations/instances_train2017.json.*cocodataset.org"):
        build_detection_dataset("coco", root=tmp_path / "coco", split="train")


def test_coco_builder_carves_val_from_train2017(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(1, 11)]
    annotations = [{"id": i, "image_id": i, "category_id": 7, "bbox": [1, 1, 4, 4], "iscrowd": 0} for i in range(1, 10)]
    path, _ = write_coco(tmp_path, images, annotations)
    (tmp_path / "annotations").mkdir()
    path.rename(tmp_path / "annotations" / "instances_train2017.json")
    (tmp_path / "images").rename(tmp_path / "train2017")
    train = build_detection_dataset("coco", root=tmp_path, split="train", val_fraction=0.3, seed=1)
    val = build_detection_dataset("coco", root=tmp_path, split="val", val_fraction=0.3, seed=1)
    assert len(val) == 3 and not set(train.image_ids) & set(val.image_ids)
    # Image 10 has no box: left out of train only.
    assert sorted(train.image_ids + val.image_ids) == [i for i in range(1, 11) if i in val.image_ids or i != 10]
    again = build_detection_dataset("coco", root=tmp_path, split="val", val_fraction=0.3, seed=1)
    assert again.image_ids == val.image_ids


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
SHAPES = dict(seed=3, train_images=6, val_images=2, test_images=3, image_size=64)


def test_shapes_are_valid_coco_and_load_through_the_coco_reader(tmp_path):
    root = write_shapes(tmp_path / "shapes", **SHAPES)
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.imgs) == count and sorted(coco.cats) == [1, 2, 3, 4, 5]
        assert coco.anns
        for ann in coco.anns.values():
            x, y, w, h = ann["bbox"]
            assert ann["image_id"] in coco.imgs and ann["category_id"] in coco.cats
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            assert 0 < ann["area"] <= w * h
    dataset = build_detection_dataset("shapes", root=tmp_path / "shapes", split="train",
                                      data_seed=3, train_images=6, val_images=2, test_images=3, image_size=64)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and dataset.categories.names[0] == "circle"
    assert target["labels"].min() >= 1 and target["labels"].max() <= 5

    stamp = (root / "train" / "000001.png").stat().st_mtime_ns
    write_shapes(root, **SHAPES)
    assert (root / "train" / "000001.png").stat().st_mtime_ns == stamp
    other = write_shapes(tmp_path / "again", **SHAPES)
    for name in ("annotations/instances_train.json", "train/000006.png", "test/000003.png"):
        assert (other / name).read_bytes() == (root / name).read_bytes()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def test_perfect_predictions_score_100_and_no_predictions_score_0(tmp_path, capsys):
    root = write_shapes(tmp_path / "shapes", **SHAPES)
    dataset = CocoDetection(root / "annotations" / "instances_test.json", root / "test")
    targets = [dataset.target(i) for i in range(len(dataset))]
    detections = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    per_rank = [to_coco_results(detections[r::2], targets[r::2], dataset.categories) for r in range(2)]
    metrics = summarize(dataset, merge_predictions(per_rank))
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(100.0)
    assert summarize(dataset, []) == {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert capsys.readouterr().out == ""  # pycocotools' printing is swallowed


def test_model_evaluation_runs_per_rank_and_merges(tmp_path):
    root = write_shapes(tmp_path / "shapes", **SHAPES)
    dataset = CocoDetection(root / "annotations" / "instances_test.json", root / "test")
    model = create_detector("fasterrcnn_resnet18_fpn", 6, **{**TINY, "box_score_thresh": 0.0}).train()
    whole = predict(model, dataset, batch_size=1)
    assert model.training and whole
    shards = [predict(model, dataset, batch_size=1, rank=r, world_size=2) for r in range(2)]
    assert merge_predictions(shards) == merge_predictions([whole])
    metrics = coco_evaluate(model, dataset, gather=lambda mine: [mine])
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(math.isnan(v) or 0.0 <= v <= 100.0 for v in metrics.values())
