"""Writers of tiny datasets in the exact on-disk formats `pcdistill.data` reads, for the tests.

They are written from the format descriptions (IDX headers with struct, CIFAR pickles opcode by
opcode as Python 2's cPickle wrote them), not with the library's own code, so they serve as
independent references.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.uint8 if num_classes <= 256 else np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX file of a uint8 array: magic 0x00000800 + ndim, big-endian uint32 dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.name.endswith(".gz"):
        blob = gzip.compress(blob)
    path.write_bytes(blob)


def write_mnist_folder(root: Path, n_train: int = 100, n_test: int = 30, gz: bool = False, seed: int = 0) -> dict:
    """The four (Fashion-)MNIST IDX files with random 28x28 images and balanced labels 0..9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = balanced_labels(n, 10, rng)
        image_name, label_name = IDX_NAMES[split]
        suffix = ".gz" if gz else ""
        write_idx(root / (image_name + suffix), images)
        write_idx(root / (label_name + suffix), labels)
        arrays[split] = (images, labels)
    return arrays


def py2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2's cPickle does at protocol 2, where every str is a byte string.

    Supports what the CIFAR files contain: dicts with bytes keys, bytes, ints, lists of those and
    2-d uint8 numpy arrays (rebuilt through numpy.core.multiarray._reconstruct, as numpy 1.x wrote).
    """
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def integer(i: int) -> None:
        if 0 <= i < 256:
            out.extend(b"K" + bytes([i]))
        elif 0 <= i < 65536:
            out.extend(b"M" + struct.pack("<H", i))
        else:
            out.extend(b"J" + struct.pack("<i", i))

    def save(value) -> None:
        if isinstance(value, bytes):
            string(value)
        elif isinstance(value, (int, np.integer)):
            integer(int(value))
        elif isinstance(value, list):
            out.extend(b"](")
            for item in value:
                save(item)
            out.extend(b"e")
        elif isinstance(value, dict):
            out.extend(b"}(")
            for key, item in value.items():
                save(key)
                save(item)
            out.extend(b"u")
        elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 2:
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            out.extend(b"K\x00\x85")  # shape (0,)
            string(b"b")
            out.extend(b"\x87R(K\x01")  # _reconstruct(ndarray, (0,), 'b'); state: version 1
            integer(value.shape[0])
            integer(value.shape[1])
            out.extend(b"\x86cnumpy\ndtype\n")
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R(K\x03")  # dtype('u1', 0, 1); its state: version 3
            string(b"|")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")  # ... then fortran=False
            string(value.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(f"py2_pickle does not support {type(value).__name__}")

    save(obj)
    out.extend(b".")
    return bytes(out)


def cifar_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> dict:
    """`root/cifar-10-batches-py/` with data_batch_1..5, test_batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data, labels = cifar_rows(n, rng), [int(v) for v in balanced_labels(n, 10, rng)]
        record = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                  b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(py2_pickle(record))
        batches[name] = (data, labels)
    names = [f"class{i}".encode() for i in range(10)]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return batches


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """`root/cifar-100-python/` with train, test and meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = cifar_rows(n, rng)
        fine = [int(v) for v in balanced_labels(n, 100, rng)]
        record = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                  b"coarse_labels": [v // 5 for v in fine], b"data": data}
        (folder / name).write_bytes(py2_pickle(record))
        splits[name] = (data, fine)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return splits


def write_imagefolder(root: Path, classes=("cat", "dog", "eel"), n_train: int = 6, n_val: int = 2,
                      size=(12, 10), seed: int = 0) -> None:
    """`root/{train,val}/<class>/<i>.png`, small random RGB PNGs (width x height = size)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
