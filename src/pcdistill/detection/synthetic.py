"""What the generated detection datasets (`shapes`, `fashion_scenes`) share: textured backgrounds,
occlusion-aware placement, and writing a split as COCO json + PNG files, idempotently.

A generated dataset lives under one root:

    root/manifest.json                       the generation parameters (written last)
    root/annotations/instances_{train,val,test}.json
    root/{train,val,test}/000001.png ...

and is complete when the manifest equals the requested parameters and every file is present.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
MIN_VISIBLE = 0.5  # fraction of an object's pixels that must stay visible
PLACEMENT_TRIES = 20

# render(rng) -> (uint8 (H, W, 3) pixels, [(category id, visible bool mask (H, W), extra annotation fields)])
Render = Callable[[np.random.Generator], tuple[np.ndarray, list[tuple[int, np.ndarray, dict]]]]


def smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Random values on a `cells` x `cells` grid, bicubically upsampled: float (size, size, channels) in [0, 1]."""
    grid = rng.integers(0, 256, (cells, cells, channels), dtype=np.uint8)
    image = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    field = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    return field.reshape(size, size, channels)


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour fields, a finer grey texture and stray lines: float32 (size, size, 3) in about [0, 1]."""
    image = 0.25 + 0.5 * smooth_field(rng, size, int(rng.integers(2, 6)), 3)
    image += 0.25 * (smooth_field(rng, size, size // 8, 1) - 0.5)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(60, 256)), width=int(rng.integers(1, 3)))
    lines = np.asarray(canvas, dtype=np.float32)[..., None] / 255
    tint = rng.uniform(0, 1, 3).astype(np.float32)
    return image * (1 - lines) + tint * lines


def occludes_too_much(owner: np.ndarray, full_counts: list[int], mask: np.ndarray) -> tuple[bool, np.ndarray]:
    """Whether pasting `mask` over the objects of `owner` (0: background, k: k-th object, whose full
    pixel counts are `full_counts`) leaves any of them, or the new one, less than MIN_VISIBLE
    visible; and the owner map after the paste."""
    trial = np.where(mask, len(full_counts) + 1, owner)
    visible = np.bincount(trial.ravel(), minlength=len(full_counts) + 2)[1:]
    full = np.array(full_counts + [int(mask.sum())])
    return not bool(np.all(visible >= MIN_VISIBLE * full)), trial


def finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float image plus a little pixel noise, as uint8."""
    image = image + rng.normal(0, 0.03, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_split(root: Path, split: str, count: int, seed: int, render: Render, categories: list[dict],
                description: str, version: int) -> None:
    """Images 1..count of `split`, image i drawn by `render(numpy.random.default_rng((seed, split code, i - 1)))`,
    and their COCO json; each bbox is the tight extent of the object's visible pixels, its area the
    visible pixel count."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if re.fullmatch(r"\d{6}\.png", stale.name):
            stale.unlink()
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        pixels, objects = render(np.random.default_rng((seed, SPLIT_CODES[split], index)))
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(folder / file_name)
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, visible, extra in objects:
            ys, xs = np.nonzero(visible)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(visible.sum()), "iscrowd": 0}
                               | extra)
    document = {"info": {"description": f"{description}, {split} split", "version": str(version)},
                "images": images, "annotations": annotations, "categories": categories}
    write_json(root / "annotations" / f"instances_{split}.json", document)


def write_json(path: Path, document) -> None:
    """`document` as json at `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, path)


def is_complete(root: Path, manifest: dict) -> bool:
    """Whether `root` holds a dataset generated with exactly `manifest` (`{split}_images` give the counts)."""
    try:
        if json.loads((root / "manifest.json").read_text()) != manifest:
            return False
    except (OSError, ValueError):
        return False
    for split in SPLIT_CODES:
        if not (root / "annotations" / f"instances_{split}.json").is_file():
            return False
        if not all((root / split / f"{i:06d}.png").is_file() for i in range(1, manifest[f"{split}_images"] + 1)):
            return False
    return True


def write_dataset(root: Path, manifest: dict, write_splits: Callable[[], None]) -> Path:
    """Run `write_splits()` unless `root` is complete for `manifest`, then record the manifest; returns `root`."""
    if is_complete(root, manifest):
        return root
    (root / "manifest.json").unlink(missing_ok=True)
    write_splits()
    write_json(root / "manifest.json", manifest)
    return root
