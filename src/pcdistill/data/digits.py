"""`digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), embedded in
scikit-learn, so no download and no root are needed.

Pixels are integers 0..16, stored as uint8 round(v * 255 / 16). There is no official test split:
a stratified 20% test split is carved with its own seed (`test_seed`), independent of the
train/val `seed`, and val is then carved from the remaining 80%.
"""
from __future__ import annotations

import numpy as np
import torch

from pcdistill.data.base import (
    Augment,
    DataInfo,
    InMemoryDataset,
    Splits,
    carve_val,
    register_dataset,
    stratified_carve,
)

TEST_FRACTION = 0.2

# Pixel mean/std (units of pixel/255) over the 80% non-test pool of the default test_seed=0.
INFO = DataInfo(
    name="digits",
    num_classes=10,
    in_channels=1,
    image_size=(8, 8),
    mean=(0.3044,),
    std=(0.3755,),
    class_names=tuple(str(d) for d in range(10)),
)


@register_dataset("digits")
def digits(*, root: str | None, val_fraction: float, seed: int, test_seed: int = 0) -> Splits:
    """Splits of sklearn's digits; `root` is ignored (the data ships with scikit-learn)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(bunch.target.astype(np.int64))
    full = InMemoryDataset(images, targets, INFO, Augment(pad=1))
    pool, test = stratified_carve(full.targets, TEST_FRACTION, test_seed)
    train, val = carve_val(full.subset(pool), val_fraction, seed)
    return Splits(train=train, val=val, test=full.subset(test), info=INFO)
