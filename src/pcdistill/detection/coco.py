"""COCO-format detection data: a validated dataset, a deterministic DDP-aware loader and the
registry of detection datasets.

Items of `CocoDetection` are `(image, target)`:

* image: float32 (3, H, W) in [0, 1] (RGB; torchvision's detectors normalize it themselves);
* target: `{"boxes": float32 (n, 4) xyxy in pixels of the image, "labels": int64 (n,) in 1..C,
  "image_id": int}`, crowd annotations (`iscrowd=1`) left out.

Category ids map to contiguous labels 1..C in increasing category-id order (0 is the background of
the detectors); `dataset.categories` keeps the map and the names, to turn predictions back into
category ids for evaluation. Annotations are checked when the dataset is built; a problem stops
with a `DatasetError` naming the file, the image id or annotation id and the fix.

Registered datasets (`build_detection_dataset(name, root=..., split=...)`):

* `coco`: `root/annotations/instances_{train2017,val2017}.json` and `root/{train2017,val2017}/`;
  train = train2017 minus a val split of `val_fraction` of its images carved by `seed`, val = that
  carved part, test = val2017;
* `shapes`: the synthetic dataset of `pcdistill.detection.shapes`, written on first use;
* `fashion_scenes`: Fashion-MNIST items on textured canvases (`pcdistill.detection.fashion_scenes`), written on first use.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from pcdistill.data.base import DatasetError, derive_seed
from pcdistill.data.loaders import ShardedLoader
from pcdistill.registry import Registry

SPLITS = ("train", "val", "test")
DEGENERATE = ("error", "drop")
# Boxes may stick out of the image by this much (annotation rounding); they are clipped to it.
BOX_TOLERANCE = 1.0

COCO_HOW_TO = (
    "download the official COCO 2017 archives train2017.zip and val2017.zip (\"2017 Train/Val images\") and "
    "annotations_trainval2017.zip (\"2017 Train/Val annotations\") from https://cocodataset.org/#download and "
    "extract them into that folder"
)


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous labels 1..C <-> COCO category ids: label i + 1 is category `ids[i]`, named `names[i]`;
    `ids` is increasing."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (the background excluded)."""
        return len(self.ids)

    def labels(self) -> dict[int, int]:
        """{category id: label}."""
        return {category_id: label for label, category_id in enumerate(self.ids, start=1)}

    def category_id(self, label: int) -> int:
        return self.ids[int(label) - 1]


def load_coco(path: str | os.PathLike, how_to_obtain: str = "") -> COCO:
    """pycocotools' `COCO` of an instances json, read quietly and cached per (path, mtime, size), so
    splits carved from one file share one index. Missing or unreadable files raise DatasetError."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"missing COCO annotation file {path}; {how_to_obtain}") from None
    return _load_coco(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_coco(path: str, mtime_ns: int, size: int) -> COCO:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(path)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError, KeyError, TypeError) as err:
        raise DatasetError(
            f"{path} is not a COCO instances json ({type(err).__name__}: {err}); expected an object with "
            f"\"images\" (id, file_name, width, height), \"annotations\" (id, image_id, category_id, "
            f"bbox [x, y, w, h], iscrowd) and \"categories\" (id, name)"
        ) from None


def _four_finite(bbox) -> bool:
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox))


def _bbox_problem(bbox, width: int, height: int) -> str | None:
    """Why a COCO bbox [x, y, w, h] is unusable in a width x height image, or None."""
    if not _four_finite(bbox):
        return "is not 4 finite numbers [x, y, w, h]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "has a width or height <= 0"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t or x + w <= 0 or y + h <= 0:
        return f"lies outside the {width}x{height} image by more than {t:g} pixel"
    return None


def _zero_size(bbox) -> bool:
    """A bbox of finite numbers with a width or height of exactly 0 (and none negative)."""
    return _four_finite(bbox) and min(bbox[2:]) == 0


class CocoDetection(Dataset):
    """Detection dataset over a COCO instances json and its image folder (see the module docstring
    for the item format).

    Args:
        annotation_file: the `instances_*.json`.
        image_dir: folder holding the images' `file_name`s.
        image_ids: the images of this split, in this order (default: all, by increasing id).
        degenerate: what to do with finite boxes of width or height exactly 0 (the official
            train2017 holds two): "error" or "drop" (left out of the targets, ids kept in
            `dropped_annotations`). Negative sizes are always an error.
        drop_empty: leave out images without any (non-crowd, kept) box, as is usual for training.
        how_to_obtain: appended to error messages about missing files.
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, *,
                 image_ids: list[int] | None = None, degenerate: str = "error", drop_empty: bool = False,
                 how_to_obtain: str = ""):
        if degenerate not in DEGENERATE:
            raise DatasetError(f"degenerate must be one of {DEGENERATE}; got {degenerate!r}")
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self._how_to = how_to_obtain or (
            f"expected a COCO instances json at {self.annotation_file} and the images under {self.image_dir}"
        )
        self.coco = load_coco(self.annotation_file, self._how_to)
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.categories = CategoryMap(tuple(int(c["id"]) for c in cats),
                                      tuple(str(c.get("name", c["id"])) for c in cats))
        if not self.categories.ids:
            raise DatasetError(f"{self.annotation_file} defines no categories; {self._how_to}")
        if image_ids is None:
            image_ids = sorted(self.coco.imgs)
        self.dropped_annotations: list[int] = []
        self._label_of = self.categories.labels()
        self._records = []
        for image_id in image_ids:
            record = self._load_record(int(image_id), degenerate)
            if len(record[3]) or not drop_empty:
                self._records.append(record)
        self.image_ids = [record[0] for record in self._records]

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (detectors need C + 1 outputs)."""
        return self.categories.num_classes

    def _fail(self, what: str) -> DatasetError:
        return DatasetError(f"{self.annotation_file}: {what}; {self._how_to}")

    def _load_record(self, image_id: int, degenerate: str):
        """(image_id, path, (width, height), boxes float32 (n, 4) xyxy, labels int64 (n,)), validated."""
        info = self.coco.imgs.get(image_id)
        if info is None:
            raise self._fail(f"image id {image_id} is not in the json")
        try:
            width, height, file_name = int(info["width"]), int(info["height"]), str(info["file_name"])
        except (KeyError, TypeError, ValueError):
            raise self._fail(f"image {image_id} needs integer width, height and a file_name; got {info}") from None
        path = self.image_dir / file_name
        if not path.is_file():
            raise self._fail(f"image {image_id}: missing image file {path}")
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            ann_id = ann.get("id")
            if ann.get("category_id") not in self.coco.cats:
                raise self._fail(f"annotation {ann_id} of image {image_id} has unknown category id "
                                 f"{ann.get('category_id')!r} (known: {list(self.categories.ids)})")
            bbox = ann.get("bbox")
            problem = _bbox_problem(bbox, width, height)
            if problem is not None:
                if degenerate == "drop" and _zero_size(bbox):
                    self.dropped_annotations.append(ann_id)
                    continue
                raise self._fail(f"annotation {ann_id} of image {image_id} has bbox {bbox!r}, which {problem}")
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = bbox
            boxes.append((max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)))
            labels.append(self._label_of[ann["category_id"]])
        return (image_id, path, (width, height), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._records)

    def target(self, index: int, flip: bool = False) -> dict:
        """The target of item `index` without reading the image; `flip` mirrors the boxes."""
        image_id, _, (width, _), boxes, labels = self._records[index]
        boxes = torch.from_numpy(boxes.copy())
        if flip:
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        return {"boxes": boxes, "labels": torch.from_numpy(labels.copy()), "image_id": image_id}

    def sample(self, index: int, flip: bool = False) -> tuple[torch.Tensor, dict]:
        """Item `index`, mirrored left-right (image and boxes) when `flip` is true."""
        image_id, path, size, _, _ = self._records[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if image.size != size:
            raise self._fail(f"image {image_id}: {path} is {image.size[0]}x{image.size[1]} but the json says "
                             f"{size[0]}x{size[1]}")
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)
        if flip:
            tensor = tensor.flip(-1)
        return tensor, self.target(index, flip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return self.sample(index)


def collate(batch) -> tuple[list[torch.Tensor], list[dict]]:
    """(list of images, list of targets) from a list of (image, target) items."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


class _Keyed(Dataset):
    """Items keyed by (index, flip)."""

    def __init__(self, dataset: CocoDetection):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]):
        return self.dataset.sample(*key)


class DetectionLoader(ShardedLoader):
    """Batches of `(list of images, list of targets)` on `device` from a `CocoDetection`.

    * train: shuffled by `DistributedSampler(shuffle=True, drop_last=True)` seeded by `seed` and the
      epoch (disjoint shards per rank), incomplete last batch dropped, each sample flipped
      left-right with probability 1/2 (if `flip`) by draws from a generator seeded by
      (seed, epoch, rank);
    * eval: rank r reads indices range(r, N, world_size) in order, nothing flipped or dropped.

    The global RNGs are not used: `set_epoch(e)` and iterating again reproduces the epoch.
    """

    def __init__(self, dataset: CocoDetection, *, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, device="cpu", flip: bool = True):
        super().__init__(dataset, batch_size, train, seed, rank, world_size, device, augment=flip)
        self.num_workers = int(num_workers)

    def keys(self) -> list[tuple[int, bool]]:
        """The (index, flip) pairs this rank reads this epoch, in order (from batch 0)."""
        order = self._indices().tolist()
        if not self.train:
            return [(i, False) for i in order]
        flips = torch.rand(len(order), generator=self._generator()) < 0.5
        return [(i, bool(f) and self.augment) for i, f in zip(order, flips.tolist())]

    def __iter__(self):
        # The DataLoader draws its workers' base seed from `generator`, not from the global RNG.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, 1))
        keys = self.keys()[self.start_batch * self.batch_size:]
        loader = DataLoader(_Keyed(self.dataset), batch_size=self.batch_size, sampler=keys,
                            num_workers=self.num_workers, collate_fn=collate, generator=generator)
        for images, targets in loader:
            images = [image.to(self.device) for image in images]
            yield images, [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                           for t in targets]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
DetectionBuilder = Callable[..., CocoDetection]
DETECTION_DATASETS: Registry[DetectionBuilder] = Registry("detection dataset")
_COMMON = ("root", "split", "val_fraction", "seed")


def register_detection_dataset(name: str) -> Callable[[DetectionBuilder], DetectionBuilder]:
    """Decorator registering `builder(*, root, split, val_fraction, seed, **options) -> CocoDetection`."""
    return DETECTION_DATASETS.register(name)


def list_detection_datasets() -> list[str]:
    """Names of the registered detection datasets, sorted."""
    return DETECTION_DATASETS.names()


def build_detection_dataset(name: str, *, root: str | os.PathLike | None = None, split: str,
                            val_fraction: float = 0.1, seed: int = 0, **options) -> CocoDetection:
    """The `split` ("train", "val" or "test") of detection dataset `name`.

    `val_fraction` in [0, 1) and `seed` choose the val split carved from the official training
    images (identical on every rank) where a dataset carves one. `options` are the dataset's own
    keyword options; an unknown one is a DatasetError.
    """
    try:
        builder = DETECTION_DATASETS.get(name)
    except ValueError as err:
        raise DatasetError(str(err)) from None
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}; got {split!r} for detection dataset {name!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatasetError(f"val_fraction must lie in [0, 1); got {val_fraction!r} for detection dataset {name!r}")
    known = [p for p in inspect.signature(builder).parameters if p not in _COMMON]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(f"unknown option(s) {', '.join(map(repr, unknown))} for detection dataset {name!r}; "
                           f"its options are: {', '.join(known) if known else '(none)'}")
    return builder(root=root, split=split, val_fraction=float(val_fraction), seed=int(seed), **options)


def _coco_layout(root) -> str:
    return (f"expected {root}/annotations/instances_train2017.json, {root}/annotations/instances_val2017.json "
            f"and the image folders {root}/train2017/ and {root}/val2017/; {COCO_HOW_TO}")


def carve_images(image_ids: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, carved) sorted image ids, `carved` holding round(val_fraction * N) of them drawn by `seed`."""
    ids = sorted(image_ids)
    generator = torch.Generator().manual_seed(derive_seed(seed))
    order = torch.randperm(len(ids), generator=generator).tolist()
    cut = int(round(val_fraction * len(ids)))
    carved = sorted(ids[i] for i in order[:cut])
    kept = sorted(ids[i] for i in order[cut:])
    return kept, carved


@register_detection_dataset("coco")
def coco(*, root, split: str, val_fraction: float, seed: int, degenerate: str = "drop") -> CocoDetection:
    """COCO 2017 (Lin et al., ECCV 2014). Training images without boxes are left out of the train
    split; `degenerate` (default "drop") handles the zero-size boxes of the official train2017."""
    if root is None:
        raise DatasetError(f"detection dataset 'coco' has no default folder: set its root; {_coco_layout('ROOT')}")
    root = Path(root)
    how_to = _coco_layout(root)
    if split == "test":
        return CocoDetection(root / "annotations" / "instances_val2017.json", root / "val2017",
                             degenerate=degenerate, how_to_obtain=how_to)
    annotation_file = root / "annotations" / "instances_train2017.json"
    kept, carved = carve_images(list(load_coco(annotation_file, how_to).imgs), val_fraction, seed)
    return CocoDetection(annotation_file, root / "train2017", image_ids=kept if split == "train" else carved,
                         degenerate=degenerate, drop_empty=split == "train", how_to_obtain=how_to)
