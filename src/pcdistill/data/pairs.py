"""`fashion_mnist_pairs`: a 100-class task made of real Fashion-MNIST images.

A sample is two Fashion-MNIST images side by side (1 x 28 x 56); its class is
10 * left_label + right_label. Pairs are drawn deterministically from `pairs_seed`: the 100 classes
are dealt out evenly (counts differ by at most one) in a random order, then each half is an image
of the required label drawn uniformly from the split's pool.

No image is shared between splits: val_fraction of the Fashion-MNIST training images (stratified,
by `seed`) form the val pool and the rest the train pool; test pairs use the t10k images only.
The val split has round(val_fraction / (1 - val_fraction) * train_pairs) pairs, so train and val
pairs keep the image split's proportions. Pairs are composed per batch from the source images.
Source files: see `pcdistill.data.idx` (same folder as `fashion_mnist`).
"""
from __future__ import annotations

import torch

from pcdistill.data.base import (
    Augment,
    DataInfo,
    DatasetError,
    Splits,
    TensorDataset,
    derive_seed,
    register_dataset,
    stratified_carve,
)
from pcdistill.data.idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_HOWTO,
    FASHION_MNIST_INFO,
    FASHION_MNIST_ROOT,
    load_idx_split,
)

INFO = DataInfo(
    name="fashion_mnist_pairs",
    num_classes=100,
    in_channels=1,
    image_size=(28, 56),
    mean=FASHION_MNIST_INFO.mean,
    std=FASHION_MNIST_INFO.std,
    class_names=tuple(f"{left} | {right}" for left in FASHION_MNIST_CLASSES for right in FASHION_MNIST_CLASSES),
)
# A flip would swap the halves, i.e. change the class.
AUGMENT = Augment(pad=2, flip=False)


class PairDataset(TensorDataset):
    """Pairs (source[left[i]], source[right[i]]) of images from `source` uint8 (M, 1, H, W)
    concatenated along the width, with targets 10 * labels[left] + labels[right]."""

    def __init__(self, source: torch.Tensor, labels: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
        self.source = source
        self.labels = labels
        self.left = left
        self.right = right
        self.targets = 10 * labels[left] + labels[right]
        self.info = INFO
        self.augment = AUGMENT

    def gather(self, index: torch.Tensor, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        _, c, h, w = self.source.shape
        out = torch.empty((len(index), c, h, 2 * w), dtype=torch.uint8, pin_memory=pin_memory)
        torch.cat((self.source[self.left[index]], self.source[self.right[index]]), dim=3, out=out)
        targets = self.targets[index]
        return out, targets.pin_memory() if pin_memory else targets

    def subset(self, index: torch.Tensor) -> "PairDataset":
        return PairDataset(self.source, self.labels, self.left[index], self.right[index])


def draw_pairs(labels: torch.Tensor, pool: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) int64 (count,) indices into `labels`, all taken from `pool`, such that the
    pair classes 10 * labels[left] + labels[right] are balanced over the 100 classes."""
    generator = torch.Generator().manual_seed(seed)
    classes = (torch.arange(count) % 100)[torch.randperm(count, generator=generator)]
    pool_labels = labels[pool]
    by_label = pool[torch.sort(pool_labels, stable=True).indices]
    counts = torch.bincount(pool_labels, minlength=10)
    starts = torch.cumsum(counts, 0) - counts
    needed = torch.unique(torch.cat((classes // 10, classes % 10)))
    if (counts[needed] == 0).any():
        missing = needed[counts[needed] == 0].tolist()
        raise DatasetError(
            f"cannot draw Fashion-MNIST pairs: the image pool has no image of label(s) {missing}; "
            f"use the full Fashion-MNIST files. {FASHION_MNIST_HOWTO}"
        )

    def pick(wanted: torch.Tensor) -> torch.Tensor:
        offset = (torch.rand(count, dtype=torch.float64, generator=generator) * counts[wanted]).long()
        return by_label[starts[wanted] + torch.minimum(offset, counts[wanted] - 1)]

    left = pick(classes // 10)
    right = pick(classes % 10)
    return left, right


@register_dataset("fashion_mnist_pairs")
def fashion_mnist_pairs(
    *,
    root: str | None,
    val_fraction: float,
    seed: int,
    pairs_seed: int = 0,
    train_pairs: int = 60000,
    test_pairs: int = 10000,
) -> Splits:
    """Splits of side-by-side Fashion-MNIST pairs; `root` defaults to the Debian package's folder."""
    for option, value in (("train_pairs", train_pairs), ("test_pairs", test_pairs)):
        if int(value) < 1:
            raise DatasetError(f"fashion_mnist_pairs option {option} must be >= 1, got {value!r}")
    folder = root or FASHION_MNIST_ROOT
    train_images, train_labels = load_idx_split(folder, "train", FASHION_MNIST_HOWTO)
    test_images, test_labels = load_idx_split(folder, "t10k", FASHION_MNIST_HOWTO)
    train_pool, val_pool = stratified_carve(train_labels, val_fraction, seed)
    val_pairs = int(round(val_fraction / (1.0 - val_fraction) * int(train_pairs)))

    def split(images, labels, pool, count, tag):
        left, right = draw_pairs(labels, pool, count, derive_seed(pairs_seed, tag))
        return PairDataset(images, labels, left, right)

    return Splits(
        train=split(train_images, train_labels, train_pool, int(train_pairs), 0),
        val=split(train_images, train_labels, val_pool, val_pairs, 1),
        test=split(test_images, test_labels, torch.arange(len(test_labels)), int(test_pairs), 2),
        info=INFO,
    )
