"""`imagefolder`: images in class folders (ImageNet layout), read with torchvision's ImageFolder.

Layout: `root/train/<class>/<image>` and `root/val/<class>/<image>`, with the same class folders in
both (any image format PIL reads; images are converted to RGB). `root/val` is the test split; the
val split is carved from `root/train` by `seed`. Per-sample transforms (torchvision):
train RandomResizedCrop(image_size) + RandomHorizontalFlip, eval Resize(image_size * 256 / 224) +
CenterCrop(image_size), both followed by ToTensor and ImageNet mean/std normalization.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from pcdistill.data.base import DataInfo, DatasetError, SampleDataset, Splits, carve_val, register_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layout(root: Path) -> str:
    return (
        f"expected the ImageNet layout {root}/train/<class>/<image> and {root}/val/<class>/<image> with the same "
        f"class folders in both; for ImageNet, extract the ILSVRC2012 train and val archives (https://image-net.org) "
        f"into those folders, sorting the val images into class folders, and point data.root at {root}"
    )


class FolderSplit(SampleDataset):
    """(path, class index) samples read with `loader`; items are (transform(image), target), the
    transform being the eval one unless the dataset comes from `with_transform(True)`."""

    def __init__(self, samples: list[tuple[str, int]], loader, info: DataInfo, train_transform, eval_transform):
        self.samples = samples
        self.targets = torch.tensor([target for _, target in samples], dtype=torch.int64)
        self.loader = loader
        self.info = info
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.transform = eval_transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target

    def subset(self, index: torch.Tensor) -> "FolderSplit":
        samples = [self.samples[i] for i in index.tolist()]
        return FolderSplit(samples, self.loader, self.info, self.train_transform, self.eval_transform)

    def with_transform(self, train: bool) -> "FolderSplit":
        view = copy.copy(self)
        view.transform = self.train_transform if train else self.eval_transform
        return view


def _scan(folder: Path, root: Path) -> ImageFolder:
    if not folder.is_dir():
        raise DatasetError(f"missing folder {folder}; {_layout(root)}")
    try:
        return ImageFolder(str(folder))
    except FileNotFoundError as err:
        raise DatasetError(f"{folder} holds no usable class folders ({err}); {_layout(root)}") from None


@register_dataset("imagefolder")
def imagefolder(*, root: str | None, val_fraction: float, seed: int, image_size: int = 224) -> Splits:
    """Splits of an ImageNet-style folder tree; `image_size` is the side of the square crops."""
    if root is None:
        raise DatasetError(f"dataset 'imagefolder' has no default folder: set data.root; {_layout(Path('ROOT'))}")
    if int(image_size) < 1:
        raise DatasetError(f"imagefolder option image_size must be >= 1, got {image_size!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist; {_layout(root)}")
    train_folder = _scan(root / "train", root)
    val_folder = _scan(root / "val", root)
    if train_folder.classes != val_folder.classes:
        only_train = sorted(set(train_folder.classes) - set(val_folder.classes))
        only_val = sorted(set(val_folder.classes) - set(train_folder.classes))
        raise DatasetError(
            f"class folders differ between {root / 'train'} and {root / 'val'}: only in train: {only_train or '-'}, "
            f"only in val: {only_val or '-'}; {_layout(root)}"
        )

    size = int(image_size)
    info = DataInfo(
        name="imagefolder",
        num_classes=len(train_folder.classes),
        in_channels=3,
        image_size=(size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=tuple(train_folder.classes),
    )
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
    eval_transform = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *normalize])

    def split(folder: ImageFolder) -> FolderSplit:
        return FolderSplit(folder.samples, folder.loader, info, train_transform, eval_transform)

    train, val = carve_val(split(train_folder), val_fraction, seed)
    return Splits(train=train, val=val, test=split(val_folder), info=info)
