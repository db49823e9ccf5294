"""The `fashion_scenes` generator: valid COCO, deterministic, and items that never cross splits.

The Fashion-MNIST files are tiny IDX files written by tests/data_fixtures.py (from the format
description, not the library's reader). Their train labels are 0..4 and their test labels 5..9, so
the category ids of the scenes show, without trusting the generator's own records, which file the
items came from.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from pcdistill.data.base import DatasetError
from pcdistill.detection import (build_detection_dataset, list_detection_datasets, merge_predictions, summarize,
                                 to_coco_results, write_fashion_scenes)
from pcdistill.detection.coco import CocoDetection
from tests.data_fixtures import IDX_NAMES, write_idx

SCENES = dict(seed=5, val_fraction=0.25, split_seed=1, train_images=12, val_images=6, test_images=6, image_size=64,
              min_objects=2, max_objects=4, min_scale=12, max_scale=32)
N_TRAIN, N_TEST = 80, 30


def fashion_folder(root, seed: int = 0) -> dict:
    """IDX files of items with ink (a bright blob on black, as Fashion-MNIST items are); returns the labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, n, classes in (("train", N_TRAIN, range(0, 5)), ("t10k", N_TEST, range(5, 10))):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for k in range(n):
            top, left = rng.integers(0, 8, 2)
            height, width = rng.integers(12, 21, 2)
            images[k, top:top + height, left:left + width] = rng.integers(60, 256, (height, width))
        labels[split] = rng.permutation(np.arange(n) % len(classes) + classes[0]).astype(np.uint8)
        image_name, label_name = IDX_NAMES[split]
        write_idx(root / image_name, images)
        write_idx(root / label_name, labels[split])
    return labels


@pytest.fixture
def fashion(tmp_path):
    return tmp_path / "fmnist", fashion_folder(tmp_path / "fmnist")


def annotations(root, split):
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


def test_scenes_are_valid_coco_that_scores_100_on_itself(tmp_path, fashion):
    folder, _ = fashion
    root = write_fashion_scenes(tmp_path / "scenes", fashion_root=folder, **SCENES)
    for split, count in (("train", 12), ("val", 6), ("test", 6)):
        coco = annotations(root, split)
        assert len(coco.imgs) == count and sorted(coco.cats) == list(range(1, 11))
        assert coco.cats[1]["name"] == "T-shirt/top" and coco.cats[7]["name"] == "Shirt"
        per_image = [len(coco.imgToAnns[i]) for i in coco.imgs]
        assert max(per_image) <= 4 and sum(per_image) >= 2 * count * 0.75  # a few placements may fail
        for ann in coco.anns.values():
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert 0 < w <= 32 and 0 < h <= 32 and 16 <= ann["area"] <= w * h and ann["iscrowd"] == 0
        dataset = CocoDetection(root / "annotations" / f"instances_{split}.json", root / split)
        targets = [dataset.target(i) for i in range(len(dataset))]
        detections = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
        metrics = summarize(dataset, merge_predictions([to_coco_results(detections, targets, dataset.categories)]))
        assert metrics["AP"] == pytest.approx(100.0)


def test_items_never_cross_splits(tmp_path, fashion):
    folder, labels = fashion
    root = write_fashion_scenes(tmp_path / "scenes", fashion_root=folder, **SCENES)
    used = {}
    for split in ("train", "val", "test"):
        anns = list(annotations(root, split).anns.values())
        # Category ids come from the labels in the IDX files: 1..5 only in the train file, 6..10 only in t10k.
        categories = {a["category_id"] for a in anns}
        assert categories <= (set(range(6, 11)) if split == "test" else set(range(1, 6)))
        for a in anns:  # the recorded item is the one whose label the annotation carries
            assert a["category_id"] == labels[a["source"]][a["source_index"]] + 1
        used[split] = {(a["source"], a["source_index"]) for a in anns}
    assert {s for s, _ in used["train"] | used["val"]} == {"train"} and {s for s, _ in used["test"]} == {"t10k"}
    assert not used["train"] & used["val"]
    # The held-out items are a quarter of the train file, the same for every scene seed.
    again = write_fashion_scenes(tmp_path / "other_seed", fashion_root=folder, **(SCENES | {"seed": 6, "val_images": 30}))
    held_out = {a["source_index"] for a in annotations(again, "val").anns.values()}
    assert len(held_out) <= round(0.25 * N_TRAIN) and not held_out & {i for _, i in used["train"]}


def test_scenes_are_deterministic_and_written_once(tmp_path, fashion):
    folder, _ = fashion
    root = write_fashion_scenes(tmp_path / "scenes", fashion_root=folder, **SCENES)
    stamp = (root / "train" / "000001.png").stat().st_mtime_ns
    write_fashion_scenes(root, fashion_root=folder, **SCENES)
    assert (root / "train" / "000001.png").stat().st_mtime_ns == stamp
    other = write_fashion_scenes(tmp_path / "again", fashion_root=folder, **SCENES)
    for name in ("annotations/instances_train.json", "annotations/instances_test.json", "train/000012.png",
                 "val/000006.png", "test/000001.png"):
        assert (other / name).read_bytes() == (root / name).read_bytes()
    changed = write_fashion_scenes(tmp_path / "seed6", fashion_root=folder, **(SCENES | {"seed": 6}))
    assert (changed / "train/000001.png").read_bytes() != (root / "train/000001.png").read_bytes()


def test_the_registered_dataset_reads_the_scenes(tmp_path, fashion):
    folder, _ = fashion
    assert "fashion_scenes" in list_detection_datasets()
    options = {k: v for k, v in SCENES.items() if k not in ("seed", "val_fraction", "split_seed")}
    dataset = build_detection_dataset("fashion_scenes", root=tmp_path / "scenes", split="val", val_fraction=0.25,
                                      seed=1, fashion_root=str(folder), data_seed=5, **options)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and len(dataset) == 6 and dataset.categories.names[9] == "Ankle boot"
    assert target["labels"].min() >= 1 and target["labels"].max() <= 5
    written = write_fashion_scenes(tmp_path / "direct", fashion_root=folder, **SCENES)
    assert (written / "val/000003.png").read_bytes() == (tmp_path / "scenes/val/000003.png").read_bytes()


def test_bad_input_is_named(tmp_path, fashion):
    folder, _ = fashion
    with pytest.raises(DatasetError, match=r"nowhere.*t10k-images-idx3-ubyte"):
        write_fashion_scenes(tmp_path / "scenes", fashion_root=tmp_path / "nowhere", **SCENES)
    with pytest.raises(ValueError, match="val_fraction"):
        write_fashion_scenes(tmp_path / "scenes", fashion_root=folder, **(SCENES | {"val_fraction": 0.0}))
    with pytest.raises(ValueError, match="max_scale"):
        write_fashion_scenes(tmp_path / "scenes", fashion_root=folder, **(SCENES | {"max_scale": 80}))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        write_fashion_scenes(tmp_path / "scenes", fashion_root=folder, **SCENES)
