"""`mnist` and `fashion_mnist`, read from the IDX files of their official distributions.

A folder holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
and `t10k-labels-idx1-ubyte`, each optionally gzipped (`.gz` appended). IDX format: a big-endian
uint32 magic number (0x00000803 for 3-d unsigned-byte arrays, i.e. images N x H x W;
0x00000801 for 1-d unsigned-byte arrays, i.e. labels N), one big-endian uint32 per dimension, then
the row-major uint8 payload of exactly prod(dims) bytes.

Fashion-MNIST: Debian package `dataset-fashion-mnist` (default root
/usr/share/datasets/fashion-mnist) or https://github.com/zalandoresearch/fashion-mnist.
MNIST: http://yann.lecun.com/exdb/mnist/ or one of its mirrors; no default root.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from pcdistill.data.base import Augment, DataInfo, DatasetError, InMemoryDataset, Splits, carve_val, register_dataset

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = tuple(name for pair in SPLIT_FILES.values() for name in pair)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HOWTO = (
    "Install them with `apt-get install dataset-fashion-mnist` (they land in /usr/share/datasets/fashion-mnist) "
    "or download them from https://github.com/zalandoresearch/fashion-mnist, and point data.root at their folder."
)
MNIST_HOWTO = (
    "Download the four IDX files of the MNIST database (http://yann.lecun.com/exdb/mnist/ or a mirror) "
    "and point data.root at their folder."
)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_INFO = DataInfo(
    name="fashion_mnist",
    num_classes=10,
    in_channels=1,
    image_size=(28, 28),
    mean=(0.2860,),
    std=(0.3530,),
    class_names=FASHION_MNIST_CLASSES,
)
MNIST_INFO = DataInfo(
    name="mnist",
    num_classes=10,
    in_channels=1,
    image_size=(28, 28),
    mean=(0.1307,),
    std=(0.3081,),
    class_names=tuple(str(d) for d in range(10)),
)


def _expected_layout(folder: Path) -> str:
    return f"expected {folder} to hold {', '.join(ALL_FILES)} (each optionally gzipped as NAME.gz)"


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array stored in the IDX file `path` (gzip-compressed when the name ends in .gz).

    `magic` is the expected magic number (IMAGES_MAGIC or LABELS_MAGIC); a wrong magic number, a
    short header or a payload whose length differs from the one the header declares is a
    `DatasetError` naming the file and the byte counts.
    """
    path = Path(path)
    ndim = magic & 0xFF
    what = "images (N x H x W)" if magic == IMAGES_MAGIC else "labels (N)"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"cannot read IDX file {path}: {err}; the file is damaged, fetch it again") from None
    where = " (after gzip decompression)" if path.suffix == ".gz" else ""
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(
            f"truncated IDX file {path}: an IDX header of {what} takes {header} bytes, "
            f"the file holds {len(raw)} bytes{where}; fetch the file again"
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(
            f"bad magic number 0x{found:08x} in {path}: an IDX file of {what} starts with 0x{magic:08x}; "
            f"the file is not what its name says or is damaged, fetch it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "oversized"
        raise DatasetError(
            f"{kind} IDX file {path}: its header declares dims {dims}, i.e. {expected} payload bytes, "
            f"but {actual} payload bytes follow the {header}-byte header{where}; fetch the file again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing file {folder / name} (nor {name}.gz found)")


def load_idx_split(folder: str | Path, split: str, howto: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 1, 28, 28) and labels int64 (N,) of `split` ("train" or "t10k") in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"data folder {folder} does not exist; {_expected_layout(folder)}. {howto}")
    image_name, label_name = SPLIT_FILES[split]
    try:
        image_path, label_path = _find(folder, image_name), _find(folder, label_name)
    except DatasetError as err:
        raise DatasetError(f"{err}; {_expected_layout(folder)}. {howto}") from None
    images = read_idx(image_path, IMAGES_MAGIC)
    labels = read_idx(label_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{image_path} holds images of {images.shape[1]}x{images.shape[2]} pixels, expected 28x28; "
            f"{_expected_layout(folder)}. {howto}"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
            f"the two files must come from the same release. {howto}"
        )
    if len(labels) and labels.max() > 9:
        raise DatasetError(f"{label_path} holds label {int(labels.max())}, expected labels 0..9. {howto}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _idx_splits(
    root: str | Path, val_fraction: float, seed: int, info: DataInfo, augment: Augment, howto: str
) -> Splits:
    train_images, train_labels = load_idx_split(root, "train", howto)
    test_images, test_labels = load_idx_split(root, "t10k", howto)
    train, val = carve_val(InMemoryDataset(train_images, train_labels, info, augment), val_fraction, seed)
    return Splits(train=train, val=val, test=InMemoryDataset(test_images, test_labels, info, augment), info=info)


@register_dataset("fashion_mnist")
def fashion_mnist(*, root: str | None, val_fraction: float, seed: int) -> Splits:
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes); augmentation: random crop
    28 with padding 2 and horizontal flip. `root` defaults to the Debian package's folder."""
    augment = Augment(pad=2, flip=True)
    return _idx_splits(root or FASHION_MNIST_ROOT, val_fraction, seed, FASHION_MNIST_INFO, augment, FASHION_MNIST_HOWTO)


@register_dataset("mnist")
def mnist(*, root: str | None, val_fraction: float, seed: int) -> Splits:
    """MNIST (60000 train / 10000 test, 1x28x28, 10 classes); augmentation: random crop 28 with
    padding 2, no flip (mirrored digits are not digits)."""
    if root is None:
        raise DatasetError(
            f"dataset 'mnist' has no default folder: set data.root to the folder holding {', '.join(ALL_FILES)} "
            f"(each optionally gzipped). {MNIST_HOWTO}"
        )
    return _idx_splits(root, val_fraction, seed, MNIST_INFO, Augment(pad=2), MNIST_HOWTO)
