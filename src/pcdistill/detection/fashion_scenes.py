"""`fashion_scenes`: detection of real product photos, Fashion-MNIST items pasted on textured canvases.

Layout written under `root` (default `data/fashion_scenes`), as for `shapes` (see
`pcdistill.detection.synthetic`): `manifest.json`, `annotations/instances_{train,val,test}.json`,
`{train,val,test}/000001.png ...`.

Each RGB image (`image_size` square, 128 by default) has a textured background (the one of
`shapes`) and `min_objects` to `max_objects` Fashion-MNIST items, each resized from 28 x 28 to a
random side of `min_scale` to `max_scale` pixels, mirrored at random, tinted with a random colour
and pasted where its pixels are not black. The 10 categories (ids 1..10) are Fashion-MNIST's
classes, several of which look alike (T-shirt/top, pullover, coat, shirt). Items may overlap: later
ones occlude earlier ones, and a placement is only kept if every item keeps at least half of its
pixels visible. A bbox is the tight extent of the item's visible pixels, its area their count.

Where the items come from (no test item is ever seen in training):

* train scenes: Fashion-MNIST's train images, minus a held-out part;
* val scenes: that held-out part, a stratified `val_fraction` of the train images carved by
  `split_seed` (the same images as the val split of the `fashion_mnist` classification dataset);
* test scenes: Fashion-MNIST's test (t10k) images only.

Every annotation records its item as `"source"` ("train" or "t10k", the IDX file) and
`"source_index"` (the image's index in that file); pycocotools ignores the extra fields.

Everything derives from `seed` and `split_seed`: image i of split s is drawn from
`numpy.random.default_rng((seed, s, i))`. Writing is idempotent (the manifest records the
parameters and the IDX files' sizes). The IDX files are read from `fashion_root` (default
/usr/share/datasets/fashion-mnist, see `pcdistill.data.idx`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pcdistill.data.base import DatasetError, stratified_carve
from pcdistill.data.idx import (ALL_FILES, FASHION_MNIST_CLASSES, FASHION_MNIST_HOWTO, FASHION_MNIST_ROOT,
                                load_idx_split)
from pcdistill.detection.coco import CocoDetection, register_detection_dataset
from pcdistill.detection.synthetic import (PLACEMENT_TRIES, SPLIT_CODES, finish, occludes_too_much,
                                           textured_background, write_dataset, write_split)

DEFAULT_ROOT = Path("data") / "fashion_scenes"
FORMAT = "pcdistill-fashion-scenes"
VERSION = 1
INK = 0.05  # an item's pixels darker than this (of 1) are its black surround, not the item
MIN_PIXELS = 16  # smallest visible item kept


def fashion_scenes_detector_options(image_size: int = 128) -> dict:
    """`create_detector` options for these scenes: no resizing, anchors of 1/16 to 1 image side, 300
    proposals per image at test time."""
    side = int(image_size)
    return {"min_size": side, "max_size": side, "anchor_sizes": tuple(side // 16 * 2**k for k in range(5)),
            "rpn_post_nms_top_n_test": 300}


def _source_sizes(folder: Path) -> dict[str, int | None]:
    """Byte size of each IDX file of `folder` (None when missing): part of the manifest, so other files regenerate."""
    sizes = {}
    for name in ALL_FILES:
        found = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        sizes[found.name if found else name] = found.stat().st_size if found else None
    return sizes


def item_pools(train_labels: torch.Tensor, test_count: int, val_fraction: float, split_seed: int) -> dict:
    """{split: (IDX file, indices of its images that split's scenes draw from)}."""
    kept, carved = stratified_carve(train_labels, val_fraction, split_seed)
    return {"train": ("train", kept.numpy()), "val": ("train", carved.numpy()),
            "test": ("t10k", np.arange(test_count))}


def _render(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, pool: np.ndarray, source: str,
            m: dict):
    """One scene: uint8 (size, size, 3) and a list of (category id, visible mask, source fields)."""
    size = m["image_size"]
    image = textured_background(rng, size)
    owner = np.zeros((size, size), dtype=np.int32)  # 0: background, k: k-th placed item
    placed: list[tuple[int, int, int]] = []  # (source index, category id, full pixel count)
    for _ in range(int(rng.integers(m["min_objects"], m["max_objects"] + 1))):
        for _ in range(PLACEMENT_TRIES):
            index = int(pool[rng.integers(len(pool))])
            side = int(rng.integers(m["min_scale"], m["max_scale"] + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            item = Image.fromarray(items[index])
            if rng.random() < 0.5:
                item = item.transpose(Image.FLIP_LEFT_RIGHT)
            gray = np.zeros((size, size), dtype=np.float32)
            gray[y0:y0 + side, x0:x0 + side] = np.asarray(item.resize((side, side), Image.BILINEAR)) / 255
            mask = gray > INK
            hidden, trial = occludes_too_much(owner, [p[2] for p in placed], mask)
            if mask.sum() >= MIN_PIXELS and not hidden:
                break
        else:
            continue
        tint = rng.uniform(0.35, 1.0, 3).astype(np.float32)
        colour = tint[None, :] * (0.2 + 0.8 * gray[mask][:, None])
        # Keep the item distinguishable from the background it covers.
        if np.abs(colour.mean(0) - image[mask].mean(0)).max() < 0.25:
            colour = 1 - colour
        image[mask] = colour
        owner = trial
        placed.append((index, int(labels[index]) + 1, int(mask.sum())))
    return finish(image, rng), [(category, owner == k + 1, {"source": source, "source_index": index})
                                for k, (index, category, _) in enumerate(placed)]


def write_fashion_scenes(root: str | os.PathLike = DEFAULT_ROOT, *, fashion_root: str | os.PathLike | None = None,
                         seed: int = 0, val_fraction: float = 0.1, split_seed: int = 0, train_images: int = 1024,
                         val_images: int = 128, test_images: int = 256, image_size: int = 128,
                         min_objects: int = 1, max_objects: int = 6, min_scale: int = 16,
                         max_scale: int = 64) -> Path:
    """Write the scenes under `root` (see the module docstring) unless they are already there with
    these parameters; returns `root` as a Path. A missing or malformed IDX folder is a DatasetError."""
    if not 1 <= int(min_objects) <= int(max_objects):
        raise ValueError(f"need 1 <= min_objects <= max_objects; got {min_objects}, {max_objects}")
    if not 4 <= int(min_scale) <= int(max_scale) <= int(image_size):
        raise ValueError(f"need 4 <= min_scale <= max_scale <= image_size; got {min_scale}, {max_scale}, {image_size}")
    if min(int(train_images), int(val_images), int(test_images)) < 1:
        raise ValueError("the image counts must be >= 1")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1): the val scenes need held-out items; got {val_fraction}")
    root, source = Path(root), Path(fashion_root or FASHION_MNIST_ROOT)
    manifest = {"format": FORMAT, "version": VERSION, "seed": int(seed), "val_fraction": float(val_fraction),
                "split_seed": int(split_seed), "train_images": int(train_images), "val_images": int(val_images),
                "test_images": int(test_images), "image_size": int(image_size), "min_objects": int(min_objects),
                "max_objects": int(max_objects), "min_scale": int(min_scale), "max_scale": int(max_scale),
                "fashion_root": str(source.resolve()), "fashion_files": _source_sizes(source)}
    categories = [{"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(FASHION_MNIST_CLASSES)]

    def write_splits():
        files = {name: load_idx_split(source, name, FASHION_MNIST_HOWTO) for name in ("train", "t10k")}
        arrays = {name: (images[:, 0].numpy(), labels.numpy()) for name, (images, labels) in files.items()}
        pools = item_pools(files["train"][1], len(files["t10k"][1]), val_fraction, split_seed)
        for split in SPLIT_CODES:
            name, pool = pools[split]
            if len(pool) == 0:
                raise DatasetError(f"the {split} scenes have no Fashion-MNIST items to draw from in {source} "
                                   f"(val_fraction {val_fraction} of {len(files['train'][1])} train images)")
            items, labels = arrays[name]

            def render(rng, items=items, labels=labels, pool=pool, name=name):
                return _render(rng, items, labels, pool, name, manifest)

            write_split(root, split, manifest[f"{split}_images"], manifest["seed"], render, categories,
                        "pcdistill fashion scenes (Fashion-MNIST items on textured canvases)", VERSION)

    return write_dataset(root, manifest, write_splits)


@register_detection_dataset("fashion_scenes")
def fashion_scenes(*, root, split: str, val_fraction: float, seed: int, fashion_root: str | None = None,
                   data_seed: int = 0, train_images: int = 1024, val_images: int = 128, test_images: int = 256,
                   image_size: int = 128, min_objects: int = 1, max_objects: int = 6, min_scale: int = 16,
                   max_scale: int = 64) -> CocoDetection:
    """Fashion-MNIST scenes, written under `root` (default `data/fashion_scenes`) on first use and read
    back through `CocoDetection`. `val_fraction` and `seed` (data.split_seed) choose the held-out
    items of the val scenes; `data_seed` draws the scenes; the other options are those of
    `write_fashion_scenes`."""
    root = write_fashion_scenes(DEFAULT_ROOT if root is None else root, fashion_root=fashion_root, seed=data_seed,
                                val_fraction=val_fraction, split_seed=seed, train_images=train_images,
                                val_images=val_images, test_images=test_images, image_size=image_size,
                                min_objects=min_objects, max_objects=max_objects, min_scale=min_scale,
                                max_scale=max_scale)
    return CocoDetection(root / "annotations" / f"instances_{split}.json", root / split,
                         how_to_obtain=f"remove {root / 'manifest.json'} to have the scenes written again")
