"""Core types of `pcdistill.data`: dataset metadata, splits, in-memory datasets, split carving and
the dataset registry.

Two kinds of datasets exist:

* `TensorDataset` (and its subclass `InMemoryDataset`): small datasets held as uint8 image tensors
  (N, C, H, W) with int64 targets (N,). They are batched with one index op per batch by
  `pcdistill.data.make_loader`, and augmented on whole batches as described by their `Augment`.
* `SampleDataset`: datasets read sample by sample with per-sample transforms (ImageFolder);
  they go through a `torch.utils.data.DataLoader`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pcdistill.registry import Registry


class DatasetError(ValueError):
    """Missing or malformed data, or an invalid dataset option.

    The message is one paragraph: what is wrong, the path involved, the expected files or layout
    and how to obtain the data.
    """


@dataclass(frozen=True)
class DataInfo:
    """What a model and a trainer need to know about a classification dataset.

    `image_size` is (H, W) of the tensors the loaders yield; `mean` and `std` are per channel, in
    units of pixel/255, and are the ones the loaders normalize with.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Augment:
    """Batched training augmentation of a `TensorDataset`: a random shift (zero padding by `pad`
    pixels on every side, then a crop back to the original size) and an optional horizontal flip
    with probability 1/2."""

    pad: int = 0
    flip: bool = False


class TensorDataset:
    """A dataset whose samples are uint8 tensors (C, H, W) fetched in batches by `gather`."""

    info: DataInfo
    augment: Augment
    targets: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def gather(self, index: torch.Tensor, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, C, H, W) and int64 targets (B,) of the samples at `index` (int64 (B,))."""
        raise NotImplementedError

    def subset(self, index: torch.Tensor) -> "TensorDataset":
        """The samples at `index`, in that order, as a dataset of the same kind."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, targets = self.gather(torch.tensor([int(i)]))
        return images[0], int(targets[0])


class InMemoryDataset(TensorDataset):
    """Images uint8 (N, C, H, W) and targets int64 (N,) held in memory."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, info: DataInfo, augment: Augment):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        self.images = images.contiguous()
        self.targets = targets.to(torch.int64)
        self.info = info
        self.augment = augment

    def gather(self, index: torch.Tensor, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty((len(index),) + tuple(self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        torch.index_select(self.images, 0, index, out=out)
        targets = self.targets[index]
        return out, targets.pin_memory() if pin_memory else targets

    def subset(self, index: torch.Tensor) -> "InMemoryDataset":
        return InMemoryDataset(self.images[index], self.targets[index], self.info, self.augment)


class SampleDataset(torch.utils.data.Dataset):
    """A dataset read sample by sample; `with_transform(train)` gives the dataset whose items are
    (float32 normalized image (C, H, W), int target), augmented when `train` is true."""

    info: DataInfo
    targets: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def with_transform(self, train: bool) -> torch.utils.data.Dataset:
        raise NotImplementedError


@dataclass
class Splits:
    """The train, val and test datasets of one task, and its metadata. `val` may be empty."""

    train: Any
    val: Any
    test: Any
    info: DataInfo


def stratified_carve(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..N-1 into (kept, carved), `carved` holding round(fraction * N) of them.

    Each class contributes in proportion to its size (largest-remainder rounding, ties to the
    lower class id), and the members carved from a class are the first ones of a permutation drawn
    from `seed`; both index tensors are sorted. The result depends only on (targets, fraction, seed).
    """
    targets = targets.to(torch.int64)
    n = int(targets.shape[0])
    total = int(round(fraction * n))
    classes, counts = torch.unique(targets, return_counts=True)
    quotas = fraction * counts.double()
    take = quotas.floor().long()
    remainder = quotas - take
    extra = total - int(take.sum())
    # A stable sort on the negated remainder keeps ties in class order.
    order = torch.sort(-remainder, stable=True).indices
    take[order[:extra]] += 1

    generator = torch.Generator().manual_seed(derive_seed(seed))
    carved = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(targets == cls).flatten()
        carved.append(members[torch.randperm(len(members), generator=generator)[:k]])
    mask = torch.zeros(n, dtype=torch.bool)
    if carved:
        mask[torch.cat(carved)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def carve_val(train: Any, val_fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, val) subsets of a training set: a stratified `val_fraction` of it carved by `seed`."""
    keep, val = stratified_carve(train.targets, val_fraction, seed)
    return train.subset(keep), train.subset(val)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed that is a well-mixed function of the integers `parts` (e.g. seed, epoch, rank)."""
    words = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


DATASETS: Registry[Callable[..., Splits]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable[..., Splits]], Callable[..., Splits]]:
    """Decorator registering a dataset builder under `name`.

    A builder is called as `builder(root=..., val_fraction=..., seed=..., **options)` and returns
    `Splits`; its keyword-only parameters beyond those three are the dataset's options.
    """
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()


_COMMON = ("root", "val_fraction", "seed")


def build(name: str, *, root: str | None = None, val_fraction: float = 0.1, seed: int = 0, **options) -> Splits:
    """Build the train/val/test splits of dataset `name`.

    `val` is carved from the official training set (stratified, by `seed`, identical on every
    rank); `val_fraction` must lie in [0, 1), 0 giving an empty val split. `options` are the
    dataset's own options; an unknown one is a `DatasetError`.
    """
    try:
        builder = DATASETS.get(name)
    except ValueError as err:
        raise DatasetError(str(err)) from None
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatasetError(
            f"val_fraction must lie in [0, 1) (0 gives an empty val split), got {val_fraction!r} for dataset {name!r}"
        )
    known = [p for p in inspect.signature(builder).parameters if p not in _COMMON]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
            f"its options are: {', '.join(known) if known else '(none)'}"
        )
    return builder(root=root, val_fraction=float(val_fraction), seed=int(seed), **options)

