"""`cifar10` and `cifar100` from the official "python version" archives of
https://www.cs.toronto.edu/~kriz/cifar.html ("CIFAR-10 python version", "CIFAR-100 python version").

Layout: `root` is the folder that holds `cifar-10-batches-py/` (files `data_batch_1` .. `data_batch_5`,
`test_batch`, `batches.meta`) or `cifar-100-python/` (files `train`, `test`, `meta`), or that folder
itself. Each file is a (Python 2) pickle of a dict with bytes keys: b"data" is uint8 (N, 3072), each
row the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in row-major order;
b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100) a list of N ints; the meta files hold
b"label_names" / b"fine_label_names".

The pickles are read by an unpickler that only resolves the few globals needed to rebuild numpy
arrays (and builtin containers) and refuses any other, so reading data never runs code from it.
"""
from __future__ import annotations

import codecs
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch

from pcdistill.data.base import Augment, DataInfo, DatasetError, InMemoryDataset, Splits, carve_val, register_dataset

AUGMENT = Augment(pad=4, flip=True)


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables that array and dtype pickles reference, under the module names that
    numpy 1.x (numpy.core) and 2.x (numpy._core) write."""
    callables = {
        "multiarray._reconstruct": np.zeros(1).__reduce__()[0],
        "multiarray.scalar": np.float64(0).__reduce__()[0],
        "numeric._frombuffer": np.zeros(1).__reduce_ex__(5)[0],
    }
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        for dotted, obj in callables.items():
            module, name = dotted.split(".")
            table[(f"{package}.{module}", name)] = obj
    return table


_SAFE_BUILTINS = {
    "list": list, "dict": dict, "tuple": tuple, "set": set, "frozenset": frozenset, "bytearray": bytearray,
}
_ALLOWED_GLOBALS = {
    **_numpy_globals(),
    **{(module, name): obj for module in ("builtins", "__builtin__") for name, obj in _SAFE_BUILTINS.items()},
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, "latin1"), a pure data conversion.
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                f"refusing to load {self.path}: it references {module}.{name}, but a CIFAR pickle holds only "
                f"numpy arrays, lists and dicts, and unpickling anything else could run code; replace the file "
                f"with one from the official archive at https://www.cs.toronto.edu/~kriz/cifar.html"
            ) from None


def load_pickle(path: str | Path):
    """The object in pickle file `path`, read with the restricted unpickler (bytes for Python 2 str)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(
            f"cannot unpickle {path} ({type(err).__name__}: {err}); the file is damaged or not a CIFAR "
            f"python-version file, fetch it again from https://www.cs.toronto.edu/~kriz/cifar.html"
        ) from None


def _as_str_keys(obj, path: Path, howto: str) -> dict:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, expected a dict. {howto}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in obj.items()}


class _Cifar:
    """Reader of one of the two CIFAR variants."""

    def __init__(self, name, folder, train_files, test_files, meta_file, label_key, names_key, info, archive):
        self.name = name
        self.folder = folder
        self.train_files = train_files
        self.test_files = test_files
        self.meta_file = meta_file
        self.label_key = label_key
        self.names_key = names_key
        self.info = info
        self.howto = (
            f'Download "{archive}" from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and point '
            f"data.root at the folder that contains {folder}/."
        )

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + (self.meta_file,)

    def layout(self, root: Path) -> str:
        return f"expected {root / self.folder} (or {root} itself) to hold {', '.join(self.files)}"

    def locate(self, root: str | None) -> Path:
        if root is None:
            raise DatasetError(f"dataset {self.name!r} has no default folder: set data.root. {self.howto}")
        root = Path(root)
        folder = root / self.folder if (root / self.folder).is_dir() else root
        if not folder.is_dir():
            raise DatasetError(f"data folder {root} does not exist; {self.layout(root)}. {self.howto}")
        missing = [name for name in self.files if not (folder / name).is_file()]
        if missing:
            raise DatasetError(
                f"missing {', '.join(missing)} in {folder}; {self.layout(root)}. {self.howto}"
            )
        return folder

    def read_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        batch = _as_str_keys(load_pickle(path), path, self.howto)
        if "data" not in batch or self.label_key not in batch:
            raise DatasetError(
                f"{path} lacks key b'data' or b'{self.label_key}' (has {sorted(batch)}). {self.howto}"
            )
        data = batch["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", None)
            raise DatasetError(
                f"{path}: b'data' must be a uint8 array (N, 3072), got {type(data).__name__} "
                f"{getattr(data, 'dtype', '')} {shape}. {self.howto}"
            )
        labels = np.asarray(batch[self.label_key], dtype=np.int64)
        if labels.shape != (data.shape[0],):
            raise DatasetError(
                f"{path}: {data.shape[0]} images but b'{self.label_key}' has shape {labels.shape}. {self.howto}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.info.num_classes):
            raise DatasetError(
                f"{path}: labels must lie in 0..{self.info.num_classes - 1}, found {labels.min()}..{labels.max()}. "
                f"{self.howto}"
            )
        return data.reshape(-1, 3, 32, 32), labels

    def read_split(self, folder: Path, files: tuple[str, ...], info: DataInfo) -> InMemoryDataset:
        batches = [self.read_batch(folder / name) for name in files]
        images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
        labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        return InMemoryDataset(images, labels, info, AUGMENT)

    def class_names(self, folder: Path) -> tuple[str, ...]:
        path = folder / self.meta_file
        names = _as_str_keys(load_pickle(path), path, self.howto).get(self.names_key)
        if not isinstance(names, list) or len(names) != self.info.num_classes:
            raise DatasetError(
                f"{path}: b'{self.names_key}' must list {self.info.num_classes} class names. {self.howto}"
            )
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)

    def splits(self, root: str | None, val_fraction: float, seed: int) -> Splits:
        folder = self.locate(root)
        info = dataclasses.replace(self.info, class_names=self.class_names(folder))
        train, val = carve_val(self.read_split(folder, self.train_files, info), val_fraction, seed)
        test = self.read_split(folder, self.test_files, info)
        return Splits(train=train, val=val, test=test, info=info)


CIFAR10 = _Cifar(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    info=DataInfo("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    archive="CIFAR-10 python version",
)
CIFAR100 = _Cifar(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    info=DataInfo("cifar100", 100, 3, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    archive="CIFAR-100 python version",
)


@register_dataset("cifar10")
def cifar10(*, root: str | None, val_fraction: float, seed: int) -> Splits:
    """CIFAR-10 (50000 train / 10000 test, 3x32x32, 10 classes); augmentation: random crop 32 with
    padding 4 and horizontal flip."""
    return CIFAR10.splits(root, val_fraction, seed)


@register_dataset("cifar100")
def cifar100(*, root: str | None, val_fraction: float, seed: int) -> Splits:
    """CIFAR-100 with its 100 fine labels (50000 train / 10000 test, 3x32x32); augmentation: random
    crop 32 with padding 4 and horizontal flip."""
    return CIFAR100.splits(root, val_fraction, seed)
