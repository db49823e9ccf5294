"""Deterministic, DDP-aware batch loaders and the batched augmentation of in-memory datasets.

`make_loader` returns an iterable of (images float32 (B, C, H, W), targets int64 (B,)) on a device,
images normalized with the dataset's `DataInfo.mean` / `std`:

* train: shuffled by `torch.utils.data.DistributedSampler(shuffle=True, drop_last=True)` seeded by
  `seed` and the epoch (ranks get disjoint shards), augmented, incomplete last batch dropped;
* eval: rank r reads indices range(r, N, world_size) in order, nothing dropped, nothing padded,
  so sums of per-rank counts are exact.

All randomness of an epoch (order and augmentation) is drawn from generators seeded by
(seed, epoch, rank); the global RNGs are neither read nor changed, so calling `set_epoch(e)` and
iterating again reproduces the epoch bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from pcdistill.data.base import Augment, SampleDataset, TensorDataset, derive_seed


def crop_flip(images: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-sample shifted crop, then per-sample horizontal flip, of `images` (B, C, H, W) as one gather.

    With `padded` the batch zero-padded by `pad` pixels on every side,
    out[b, :, i, j] = padded[b, :, i + dy[b], dx[b] + (W - 1 - j if flip[b] else j)];
    dy, dx are int64 (B,) in [0, 2 * pad], flip is bool (B,). dy = dx = pad and flip false give
    back `images`; dy = dx = pad and flip true mirror it left-right.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad)).view(b, c, -1)
    j = torch.arange(w, device=device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - j, j)
    rows = dy[:, None] + torch.arange(h, device=device)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.gather(2, flat).view(b, c, h, w)


def draw_augmentation(n: int, augment: Augment, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of one batch of `n` samples: shift offsets int64 (2, n) and flips bool (n,).

    They come from `generator` (a CPU generator) in a fixed order, so a batch's augmentation is a
    function of the generator state only, whatever the device."""
    offsets = torch.randint(0, 2 * augment.pad + 1, (2, n), generator=generator)
    if augment.flip:
        flip = torch.randint(0, 2, (n,), generator=generator).bool()
    else:
        flip = torch.zeros(n, dtype=torch.bool)
    return offsets, flip


def augment_batch(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to `augment.pad` pixels (zero padding) and, if `augment.flip`, random
    horizontal flip with probability 1/2, per sample (draws from `draw_augmentation`)."""
    offsets, flip = draw_augmentation(images.shape[0], augment, generator)
    offsets, flip = offsets.to(images.device), flip.to(images.device)
    return crop_flip(images, augment.pad, offsets[0], offsets[1], flip)


class ShardedLoader:
    """Index bookkeeping shared by the loaders (also detection's): sampler, epoch, length, shard.

    Subclasses iterate over `_indices()` from `start_batch` on, drawing randomness from `_generator()`.
    """

    def __init__(self, dataset, batch_size: int, train: bool, seed: int, rank: int, world_size: int, device,
                 augment: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.augment = bool(augment) and self.train
        self.epoch = 0
        self.start_batch = 0
        self._pin = self.device.type == "cuda"
        self._sampler = (
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
            if train
            else None
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration produces, from batch
        `start_batch` on (to resume mid-epoch: the batches yielded equal those of a full pass)."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        if self._sampler is not None:
            self._sampler.set_epoch(self.epoch)

    def _indices(self) -> torch.Tensor:
        """Dataset indices this rank reads this epoch, in order (int64)."""
        if self._sampler is not None:
            return torch.tensor(list(self._sampler), dtype=torch.int64)[: self.num_samples]
        return torch.arange(self.rank, len(self.dataset), self.world_size, dtype=torch.int64)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank))

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        if self._sampler is not None:
            return len(self) * self.batch_size
        return len(range(self.rank, len(self.dataset), self.world_size))

    def __len__(self) -> int:
        if self._sampler is not None:
            return max(0, self._sampler.num_samples) // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)


class TensorLoader(ShardedLoader):
    """Loader of a `TensorDataset`: one gather per batch, then transfer, augmentation and
    normalization as whole-batch tensor ops on the target device."""

    def __init__(self, dataset: TensorDataset, **kwargs):
        super().__init__(dataset, **kwargs)
        info = dataset.info
        mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as x * scale - shift.
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (mean / std).to(self.device)

    def __iter__(self):
        order = self._indices()
        generator = self._generator()
        for batch, start in enumerate(range(0, len(self) * self.batch_size, self.batch_size)):
            index = order[start : start + self.batch_size]
            if batch < self.start_batch:  # skipped, but its random draws are consumed as in a full pass
                if self.augment:
                    draw_augmentation(len(index), self.dataset.augment, generator)
                continue
            images, targets = self.dataset.gather(index, pin_memory=self._pin)
            images = images.to(self.device, non_blocking=self._pin)
            targets = targets.to(self.device, non_blocking=self._pin)
            if self.augment:
                images = augment_batch(images, self.dataset.augment, generator)
            yield images.float().mul_(self._scale).sub_(self._shift), targets


class _SeededSamples(torch.utils.data.Dataset):
    """Items keyed by (index, sample_seed): the sample is read with the CPU torch RNG seeded by
    `sample_seed` and the RNG state restored afterwards, so per-sample torchvision transforms are
    deterministic and independent of the number of workers, and the caller's RNG is untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            # default_generator only: torch.manual_seed would also reseed the CUDA generators.
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]


class _Keys:
    """The (index, seed) keys of the current epoch, as a sampler the DataLoader re-reads each epoch."""

    def __init__(self):
        self.keys: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class SampleLoader(ShardedLoader):
    """Loader of a `SampleDataset` through a `torch.utils.data.DataLoader` (workers, per-sample
    transforms); same order semantics as `TensorLoader`."""

    def __init__(self, dataset: SampleDataset, *, num_workers: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self._keys = _Keys()
        self._loader_generator = torch.Generator()
        self._loader = DataLoader(
            _SeededSamples(dataset.with_transform(self.augment)),
            batch_size=self.batch_size,
            sampler=self._keys,
            drop_last=self.train,
            num_workers=num_workers,
            pin_memory=self._pin,
            generator=self._loader_generator,
        )

    def __iter__(self):
        generator = self._generator()
        order = self._indices()
        seeds = torch.randint(0, 2**63 - 1, (len(order),), generator=generator)
        skip = self.start_batch * self.batch_size
        self._keys.keys = list(zip(order.tolist(), seeds.tolist()))[skip:]
        # Worker base seeds are drawn from this generator when the DataLoader starts iterating.
        self._loader_generator.manual_seed(derive_seed(self.seed, self.epoch, self.rank, 1))
        for images, targets in self._loader:
            yield images.to(self.device, non_blocking=self._pin), targets.to(self.device, non_blocking=self._pin)


def make_loader(
    dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
):
    """A loader over `dataset` for one rank of `world_size` (see the module docstring).

    The result has `len()` (batches per epoch), `num_samples` (samples per epoch on this rank) and
    `set_epoch(epoch, start_batch=0)`, to call before each epoch. `num_workers` applies to sample
    datasets (imagefolder); in-memory datasets are batched in the calling process, which is faster
    than any worker pipeline for them. `augment=False` turns training augmentation off.
    """
    common = dict(batch_size=batch_size, train=train, seed=seed, rank=rank, world_size=world_size, device=device,
                  augment=augment)
    if isinstance(dataset, TensorDataset):
        return TensorLoader(dataset, **common)
    if isinstance(dataset, SampleDataset):
        return SampleLoader(dataset, num_workers=num_workers, **common)
    raise TypeError(f"make_loader needs a dataset from pcdistill.data.build, got {type(dataset).__name__}")
