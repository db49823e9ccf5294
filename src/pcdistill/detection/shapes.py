"""`shapes`: a small synthetic detection dataset written as real COCO files, for CPU-sized runs.

Layout written under `root` (default `data/shapes`, relative to the working directory):

    root/manifest.json                       the generation parameters
    root/annotations/instances_{train,val,test}.json
    root/{train,val,test}/000001.png ...

Each RGB image (`image_size` square, 128 by default) has a noisy, textured background (smooth
colour fields, a finer grey texture, stray lines, pixel noise) and 1 to `max_objects` filled shapes
of 5 classes (circle, square, triangle, star, cross; category ids 1..5) with random sizes
(about 8% to 40% of the image side), rotations, colours and shading. Shapes may overlap: later ones
occlude earlier ones, and a placement is only kept if every shape keeps at least half of its
pixels visible. Each annotation's bbox is the tight extent of the shape's VISIBLE pixels and its
area the visible pixel count (iscrowd 0).

Everything derives from `seed`: image i of split s is drawn from `numpy.random.default_rng((seed,
s, i))`. Writing is idempotent: when `manifest.json` records the same parameters and all files are
present, nothing is rewritten. In distributed runs, write on one rank and wait at a barrier.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pcdistill.detection.coco import CocoDetection, register_detection_dataset
from pcdistill.detection.synthetic import (PLACEMENT_TRIES, SPLIT_CODES, finish, occludes_too_much,
                                           textured_background, write_dataset, write_split)

DEFAULT_ROOT = Path("data") / "shapes"
CLASSES = ("circle", "square", "triangle", "star", "cross")
FORMAT = "pcdistill-shapes"
VERSION = 1


def shapes_detector_options(image_size: int = 128) -> dict:
    """`create_detector` options suited to shapes images: no resizing, anchors of 1/16 to 1 image side,
    and 300 proposals per image at test time (Faster R-CNN's original count; the box head's cost on
    CPU grows with it, and an image holds at most a handful of shapes)."""
    side = int(image_size)
    return {"min_size": side, "max_size": side, "anchor_sizes": tuple(side // 16 * 2**k for k in range(5)),
            "rpn_post_nms_top_n_test": 300}


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square, triangle, star or cross of circumradius `radius`, rotated by `angle`."""
    if kind == "square":
        polar = [(radius, angle + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif kind == "triangle":
        polar = [(radius, angle + k * 2 * math.pi / 3) for k in range(3)]
    elif kind == "star":
        polar = [(radius if k % 2 == 0 else 0.45 * radius, angle + k * math.pi / 5) for k in range(10)]
    else:  # cross: a plus sign whose arms are a third of its width
        a, b = radius / math.sqrt(1 + 1 / 9), radius / (3 * math.sqrt(1 + 1 / 9))
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a),
                   (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        polar = [(math.hypot(x, y), angle + math.atan2(y, x)) for x, y in corners]
    return [(cx + r * math.cos(t), cy + r * math.sin(t)) for r, t in polar]


def _shape_mask(kind: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, angle), fill=1)
    return np.asarray(canvas, dtype=bool)


def _render(rng: np.random.Generator, size: int, max_objects: int):
    """One image: uint8 (size, size, 3) and a list of (category id, visible mask, {})."""
    image = textured_background(rng, size)
    owner = np.zeros((size, size), dtype=np.int32)  # 0: background, k: k-th placed shape
    placed: list[tuple[int, int]] = []  # (class index, full pixel count)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(PLACEMENT_TRIES):
            kind = int(rng.integers(len(CLASSES)))
            radius = rng.uniform(0.04, 0.2) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            mask = _shape_mask(CLASSES[kind], size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
            hidden, trial = occludes_too_much(owner, [p[1] for p in placed], mask)
            if mask.sum() >= 16 and not hidden:
                break
        else:
            continue
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        # Keep the shape distinguishable from the background it covers.
        if np.abs(colour - image[mask].mean(0)).max() < 0.3:
            colour = 1 - colour
        owner = trial
        placed.append((kind, int(mask.sum())))
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        direction = rng.normal(size=2)
        shade = 1 + 0.2 * ((xs - cx) * direction[0] + (ys - cy) * direction[1]) / (radius * np.linalg.norm(direction))
        image[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0, 1)
    return finish(image, rng), [(kind + 1, owner == k + 1, {}) for k, (kind, _) in enumerate(placed)]


def write_shapes(root: str | os.PathLike = DEFAULT_ROOT, *, seed: int = 0, train_images: int = 512,
                 val_images: int = 128, test_images: int = 256, image_size: int = 128,
                 max_objects: int = 5) -> Path:
    """Write the shapes dataset under `root` (see the module docstring) unless it is already there
    with these parameters; returns `root` as a Path."""
    if int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if int(max_objects) < 1 or min(int(train_images), int(val_images), int(test_images)) < 1:
        raise ValueError("max_objects and the image counts must be >= 1")
    root = Path(root)
    manifest = {"format": FORMAT, "version": VERSION, "seed": int(seed), "train_images": int(train_images),
                "val_images": int(val_images), "test_images": int(test_images), "image_size": int(image_size),
                "max_objects": int(max_objects)}
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]

    def render(rng):
        return _render(rng, manifest["image_size"], manifest["max_objects"])

    def write_splits():
        for split in SPLIT_CODES:
            write_split(root, split, manifest[f"{split}_images"], manifest["seed"], render, categories,
                        "pcdistill synthetic shapes", VERSION)

    return write_dataset(root, manifest, write_splits)


@register_detection_dataset("shapes")
def shapes(*, root, split: str, val_fraction: float, seed: int, data_seed: int = 0, train_images: int = 512,
           val_images: int = 128, test_images: int = 256, image_size: int = 128, max_objects: int = 5) -> CocoDetection:
    """The synthetic shapes dataset, written under `root` (default `data/shapes`) on first use and read
    back through `CocoDetection`. Its val split is generated, so `val_fraction` and `seed` do not
    apply; `data_seed` and the other options are those of `write_shapes`."""
    root = write_shapes(DEFAULT_ROOT if root is None else root, seed=data_seed, train_images=train_images,
                        val_images=val_images, test_images=test_images, image_size=image_size,
                        max_objects=max_objects)
    return CocoDetection(root / "annotations" / f"instances_{split}.json", root / split,
                         how_to_obtain=f"remove {root / 'manifest.json'} to have the shapes dataset written again")
