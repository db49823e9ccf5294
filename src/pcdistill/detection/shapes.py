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

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pcdistill.detection.coco import CocoDetection, register_detection_dataset

DEFAULT_ROOT = Path("data") / "shapes"
CLASSES = ("circle", "square", "triangle", "star", "cross")
FORMAT = "pcdistill-shapes"
VERSION = 1
MIN_VISIBLE = 0.5  # fraction of a shape's pixels that must stay visible
_PLACEMENT_TRIES = 20
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


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


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Random values on a `cells` x `cells` grid, bicubically upsampled: float (size, size, channels) in [0, 1]."""
    grid = rng.integers(0, 256, (cells, cells, channels), dtype=np.uint8)
    image = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    field = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    return field.reshape(size, size, channels)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    image = 0.25 + 0.5 * _smooth_field(rng, size, int(rng.integers(2, 6)), 3)
    image += 0.25 * (_smooth_field(rng, size, size // 8, 1) - 0.5)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(60, 256)), width=int(rng.integers(1, 3)))
    lines = np.asarray(canvas, dtype=np.float32)[..., None] / 255
    tint = rng.uniform(0, 1, 3).astype(np.float32)
    return image * (1 - lines) + tint * lines


def _render(rng: np.random.Generator, size: int, max_objects: int):
    """One image: uint8 (size, size, 3) and a list of (class index, visible mask)."""
    image = _background(rng, size)
    owner = np.zeros((size, size), dtype=np.int32)  # 0: background, k: k-th placed shape
    placed: list[tuple[int, int, np.ndarray]] = []  # (class index, full pixel count, colour)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            kind = int(rng.integers(len(CLASSES)))
            radius = rng.uniform(0.04, 0.2) * size
            cx, cy = rng.uniform(radius, size - radius, 2)
            mask = _shape_mask(CLASSES[kind], size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
            trial = np.where(mask, len(placed) + 1, owner)
            visible = np.bincount(trial.ravel(), minlength=len(placed) + 2)[1:]
            full = np.array([p[1] for p in placed] + [mask.sum()])
            if full[-1] >= 16 and np.all(visible >= MIN_VISIBLE * full):
                break
        else:
            continue
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        # Keep the shape distinguishable from the background it covers.
        if np.abs(colour - image[mask].mean(0)).max() < 0.3:
            colour = 1 - colour
        owner = trial
        placed.append((kind, int(mask.sum()), colour))
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        direction = rng.normal(size=2)
        shade = 1 + 0.2 * ((xs - cx) * direction[0] + (ys - cy) * direction[1]) / (radius * np.linalg.norm(direction))
        image[mask] = np.clip(colour[None, :] * shade[mask][:, None], 0, 1)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    pixels = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return pixels, [(kind, owner == k + 1) for k, (kind, _, _) in enumerate(placed)]


def _write_split(root: Path, split: str, count: int, seed: int, size: int, max_objects: int) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if re.fullmatch(r"\d{6}\.png", stale.name):
            stale.unlink()
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        rng = np.random.default_rng((seed, _SPLIT_CODES[split], index))
        pixels, shapes = _render(rng, size, max_objects)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for kind, visible in shapes:
            ys, xs = np.nonzero(visible)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": kind + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(visible.sum()), "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    document = {"info": {"description": f"pcdistill synthetic shapes, {split} split", "version": str(VERSION)},
                "images": images, "annotations": annotations, "categories": categories}
    _write_json(root / "annotations" / f"instances_{split}.json", document)


def _write_json(path: Path, document) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, path)


def _complete(root: Path, manifest: dict) -> bool:
    try:
        if json.loads((root / "manifest.json").read_text()) != manifest:
            return False
    except (OSError, ValueError):
        return False
    for split in _SPLIT_CODES:
        if not (root / "annotations" / f"instances_{split}.json").is_file():
            return False
        if not all((root / split / f"{i:06d}.png").is_file() for i in range(1, manifest[f"{split}_images"] + 1)):
            return False
    return True


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
    if _complete(root, manifest):
        return root
    (root / "manifest.json").unlink(missing_ok=True)
    for split in _SPLIT_CODES:
        _write_split(root, split, manifest[f"{split}_images"], manifest["seed"], manifest["image_size"],
                     manifest["max_objects"])
    _write_json(root / "manifest.json", manifest)
    return root


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
