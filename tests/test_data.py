"""Tests of pcdistill.data: formats, splits, loaders, determinism and error messages.

All data is written to tmp_path in the exact on-disk formats (see data_fixtures.py); nothing here
reads /usr/share/datasets or the network.
"""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from tests.data_fixtures import (
    IDX_NAMES,
    write_cifar10,
    write_cifar100,
    write_idx,
    write_imagefolder,
    write_mnist_folder,
)
from pcdistill.data import DataInfo, DatasetError, Splits, build, list_datasets, make_loader
from pcdistill.data.base import Augment, InMemoryDataset, stratified_carve
from pcdistill.data.loaders import augment_batch, crop_flip

# ----------------------------------------------------------------------------------------------
# helpers


def synthetic(n: int = 103, channels: int = 1, size=(6, 5), pad: int = 1, flip: bool = True, seed: int = 0):
    """A dataset whose targets are the sample indices, so loaders can be checked index by index."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, *size), dtype=torch.uint8, generator=g)
    info = DataInfo("synthetic", n, channels, size, (0.25,) * channels, (0.5,) * channels)
    return InMemoryDataset(images, torch.arange(n), info, Augment(pad=pad, flip=flip))


def epoch_batches(loader, epoch: int):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def denormalize(x: torch.Tensor, info: DataInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return torch.round((x * std + mean) * 255)


# ----------------------------------------------------------------------------------------------
# registry, options, carving


def test_registered_names():
    assert set(list_datasets()) >= {
        "digits", "mnist", "fashion_mnist", "fashion_mnist_pairs", "cifar10", "cifar100", "imagefolder"
    }


def test_unknown_dataset_option_and_val_fraction():
    with pytest.raises(DatasetError, match=r"did you mean 'cifar10'"):
        build("cifar01")
    with pytest.raises(DatasetError, match=r"'test_sed'.*test_seed"):
        build("digits", test_sed=1)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            build("digits", val_fraction=bad)


def test_stratified_carve():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, carved = stratified_carve(targets, 0.2, seed=3)
    assert len(carved) == 20 and len(keep) == 80
    assert torch.bincount(targets[carved]).tolist() == [10, 6, 4]
    assert not set(keep.tolist()) & set(carved.tolist())
    assert sorted(keep.tolist() + carved.tolist()) == list(range(100))
    assert torch.equal(carved, stratified_carve(targets, 0.2, seed=3)[1])
    assert not torch.equal(carved, stratified_carve(targets, 0.2, seed=4)[1])
    # Uneven quotas: the total is still round(fraction * N).
    keep, carved = stratified_carve(torch.tensor([0] * 7 + [1] * 7 + [2] * 7), 0.1, seed=0)
    assert len(carved) == 2 and len(keep) == 19
    assert len(stratified_carve(targets, 0.0, seed=0)[1]) == 0


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_splits_and_pixels():
    from sklearn.datasets import load_digits

    ref = load_digits()
    splits = build("digits", val_fraction=0.1, seed=0)
    assert isinstance(splits, Splits)
    assert splits.info.num_classes == 10 and splits.info.image_size == (8, 8) and splits.info.in_channels == 1
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1294, 144, 359)
    test_counts = torch.bincount(splits.test.targets, minlength=10)
    expected = np.bincount(ref.target) * 0.2
    assert (torch.abs(test_counts - torch.from_numpy(expected)) <= 1).all()

    # Every image of every split is a reference image with its label, each used exactly once.
    ref_rows = {}
    for image, label in zip(np.round(ref.images * 255 / 16).astype(np.uint8), ref.target):
        ref_rows.setdefault(image.tobytes(), []).append(int(label))
    seen = {}
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        for image, label in zip(split.images[:, 0].numpy(), split.targets.tolist()):
            assert label in ref_rows[image.tobytes()]
            seen[image.tobytes()] = seen.get(image.tobytes(), 0) + 1
    assert seen == {key: len(labels) for key, labels in ref_rows.items()}

    # The test split depends on test_seed only.
    other = build("digits", val_fraction=0.3, seed=5)
    assert torch.equal(other.test.images, splits.test.images)
    assert not torch.equal(build("digits", test_seed=1).test.images, splits.test.images)
    assert len(build("digits", val_fraction=0.0).val) == 0


# ----------------------------------------------------------------------------------------------
# IDX: mnist / fashion_mnist


@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets_decode_exactly(tmp_path, gz):
    arrays = write_mnist_folder(tmp_path, n_train=100, n_test=30, gz=gz)
    for name in ("mnist", "fashion_mnist"):
        splits = build(name, root=str(tmp_path), val_fraction=0.0)
        assert len(splits.val) == 0
        assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train"][0]))
        assert splits.train.targets.tolist() == arrays["train"][1].tolist()
        assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["t10k"][0]))
        assert splits.test.targets.tolist() == arrays["t10k"][1].tolist()
    assert build("mnist", root=str(tmp_path)).train.augment == Augment(pad=2, flip=False)
    assert build("fashion_mnist", root=str(tmp_path)).train.augment == Augment(pad=2, flip=True)


def test_idx_val_split_is_stratified_and_disjoint(tmp_path):
    arrays = write_mnist_folder(tmp_path, n_train=200, n_test=10)
    splits = build("fashion_mnist", root=str(tmp_path), val_fraction=0.1, seed=7)
    assert (len(splits.train), len(splits.val)) == (180, 20)
    assert torch.bincount(splits.val.targets, minlength=10).tolist() == [2] * 10
    written = {img.tobytes(): i for i, img in enumerate(arrays["train"][0])}
    train_ids = {written[img.tobytes()] for img in splits.train.images[:, 0].numpy()}
    val_ids = {written[img.tobytes()] for img in splits.val.images[:, 0].numpy()}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 200
    again = build("fashion_mnist", root=str(tmp_path), val_fraction=0.1, seed=7)
    assert torch.equal(again.val.images, splits.val.images)


def test_idx_truncated_file(tmp_path):
    write_mnist_folder(tmp_path, n_train=20, n_test=10)
    path = tmp_path / IDX_NAMES["train"][0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError) as err:
        build("mnist", root=str(tmp_path))
    message = str(err.value)
    assert str(path) in message and str(20 * 28 * 28) in message and str(20 * 28 * 28 - 100) in message


def test_idx_truncated_gzip_stream(tmp_path):
    write_mnist_folder(tmp_path, n_train=20, n_test=10, gz=True)
    path = tmp_path / (IDX_NAMES["t10k"][0] + ".gz")
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DatasetError, match=str(path)):
        build("fashion_mnist", root=str(tmp_path))


def test_idx_bad_magic_and_mismatched_counts(tmp_path):
    arrays = write_mnist_folder(tmp_path, n_train=20, n_test=10)
    # Labels written where images are expected: magic 0x00000801 instead of 0x00000803.
    write_idx(tmp_path / IDX_NAMES["train"][0], arrays["train"][1])
    with pytest.raises(DatasetError, match=r"bad magic number 0x00000801.*0x00000803") as err:
        build("mnist", root=str(tmp_path))
    assert str(tmp_path / IDX_NAMES["train"][0]) in str(err.value)

    write_idx(tmp_path / IDX_NAMES["train"][0], arrays["train"][0][:15])
    with pytest.raises(DatasetError, match=r"15 images but .* 20 labels"):
        build("mnist", root=str(tmp_path))

    write_idx(tmp_path / IDX_NAMES["train"][0], np.zeros((20, 28, 27), np.uint8))
    with pytest.raises(DatasetError, match="28x27"):
        build("mnist", root=str(tmp_path))


def test_idx_missing_folder_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        build("fashion_mnist", root=str(missing))
    message = str(err.value)
    assert str(missing) in message and "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message

    write_mnist_folder(tmp_path, n_train=10, n_test=10)
    (tmp_path / IDX_NAMES["t10k"][1]).unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        build("mnist", root=str(tmp_path))
    with pytest.raises(DatasetError, match="data.root"):
        build("mnist")


# ----------------------------------------------------------------------------------------------
# fashion_mnist_pairs


def test_pairs(tmp_path):
    arrays = write_mnist_folder(tmp_path, n_train=200, n_test=50)
    train_images, train_labels = (torch.from_numpy(a) for a in arrays["train"])
    test_images, test_labels = (torch.from_numpy(a) for a in arrays["t10k"])
    splits = build("fashion_mnist_pairs", root=str(tmp_path), val_fraction=0.2, train_pairs=400, test_pairs=300)
    assert splits.info.num_classes == 100 and splits.info.image_size == (28, 56)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (400, 100, 300)
    assert splits.train.augment.flip is False

    for split, images, labels in ((splits.train, train_images, train_labels), (splits.val, train_images, train_labels),
                                  (splits.test, test_images, test_labels)):
        pixels, targets = split.gather(torch.arange(len(split)))
        assert pixels.shape == (len(split), 1, 28, 56)
        assert torch.equal(pixels[:, 0, :, :28], images[split.left])
        assert torch.equal(pixels[:, 0, :, 28:], images[split.right])
        assert torch.equal(targets, 10 * labels[split.left].long() + labels[split.right].long())
        counts = torch.bincount(targets, minlength=100)
        assert counts.max() - counts.min() <= 1

    train_pool = set(splits.train.left.tolist()) | set(splits.train.right.tolist())
    val_pool = set(splits.val.left.tolist()) | set(splits.val.right.tolist())
    assert not train_pool & val_pool
    assert len(val_pool) <= 40 and len(train_pool) <= 160

    same = build("fashion_mnist_pairs", root=str(tmp_path), val_fraction=0.2, train_pairs=400, test_pairs=300)
    assert torch.equal(same.train.left, splits.train.left) and torch.equal(same.test.right, splits.test.right)
    other = build("fashion_mnist_pairs", root=str(tmp_path), val_fraction=0.2, train_pairs=400, test_pairs=300,
                  pairs_seed=1)
    assert not torch.equal(other.train.left, splits.train.left)

    loader = make_loader(splits.train, batch_size=64, train=True)
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 28, 56) and y.max() < 100


def test_pairs_default_val_count(tmp_path):
    write_mnist_folder(tmp_path, n_train=100, n_test=20)
    splits = build("fashion_mnist_pairs", root=str(tmp_path), train_pairs=900, test_pairs=10)
    assert len(splits.val) == 100  # 0.1 / 0.9 * 900
    assert len(build("fashion_mnist_pairs", root=str(tmp_path), val_fraction=0.0, test_pairs=10).val) == 0


# ----------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("folder_itself", [False, True])
def test_cifar10(tmp_path, folder_itself):
    batches = write_cifar10(tmp_path, per_batch=20, n_test=20)
    root = tmp_path / "cifar-10-batches-py" if folder_itself else tmp_path
    splits = build("cifar10", root=str(root), val_fraction=0.0)
    assert splits.info.class_names == tuple(f"class{i}" for i in range(10))
    assert splits.info.in_channels == 3 and splits.train.augment == Augment(pad=4, flip=True)
    rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(splits.train) == 100 and splits.train.targets.tolist() == labels
    images = splits.train.images.numpy()
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    for n, c, y, x in ((0, 0, 0, 0), (3, 1, 5, 7), (99, 2, 31, 30), (42, 2, 17, 0)):
        assert images[n, c, y, x] == rows[n, c * 1024 + y * 32 + x]
    assert np.array_equal(splits.test.images.numpy().reshape(20, -1), batches["test_batch"][0])
    assert splits.test.targets.tolist() == batches["test_batch"][1]

    carved = build("cifar10", root=str(root), val_fraction=0.2, seed=1)
    assert (len(carved.train), len(carved.val)) == (80, 20)
    assert torch.bincount(carved.val.targets, minlength=10).tolist() == [2] * 10


def test_cifar100_and_python3_pickles(tmp_path):
    splits_written = write_cifar100(tmp_path, n_train=200, n_test=100)
    splits = build("cifar100", root=str(tmp_path), val_fraction=0.5)
    assert splits.info.num_classes == 100 and splits.info.class_names[7] == "fine7"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (100, 100, 100)
    assert splits.test.targets.tolist() == splits_written["test"][1]
    assert np.array_equal(splits.test.images.numpy().reshape(100, -1), splits_written["test"][0])

    # Files re-saved by Python 3 (protocol 2 writes bytes via _codecs.encode; 4 and 5 natively).
    folder = tmp_path / "cifar-100-python"
    for protocol in (2, 4, 5):
        data, fine = splits_written["test"]
        (folder / "test").write_bytes(pickle.dumps({b"data": data, b"fine_labels": fine}, protocol=protocol))
        assert np.array_equal(build("cifar100", root=str(tmp_path)).test.images.numpy().reshape(100, -1), data)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_code_in_pickles(tmp_path):
    write_cifar10(tmp_path, per_batch=10, n_test=10)
    marker = tmp_path / "pwned"
    target = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match=r"refusing .*data_batch_3.*(posix|os|nt)\.system"):
        build("cifar10", root=str(tmp_path))
    assert not marker.exists()


def test_cifar_missing_files_and_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        build("cifar100", root=str(tmp_path / "absent"))
    message = str(err.value)
    assert str(tmp_path / "absent") in message and "cifar-100-python" in message
    assert "CIFAR-100 python version" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message

    write_cifar10(tmp_path, per_batch=10, n_test=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_4"):
        build("cifar10", root=str(tmp_path))

    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"\x80\x02}(U\x04data")
    with pytest.raises(DatasetError, match="cannot unpickle .*data_batch_4"):
        build("cifar10", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# imagefolder


def test_imagefolder(tmp_path):
    write_imagefolder(tmp_path, n_train=6, n_val=2)
    splits = build("imagefolder", root=str(tmp_path), val_fraction=1 / 3, image_size=8)
    assert splits.info.class_names == ("cat", "dog", "eel") and splits.info.image_size == (8, 8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)
    assert torch.bincount(splits.val.targets).tolist() == [2, 2, 2]
    assert not {p for p, _ in splits.train.samples} & {p for p, _ in splits.val.samples}
    assert all("/val/" in p for p, _ in splits.test.samples)

    state = torch.get_rng_state()
    train = make_loader(splits.train, batch_size=4, train=True, seed=3)
    first, again = epoch_batches(train, 2), epoch_batches(train, 2)
    assert len(first) == len(train) == 3 and train.num_samples == 12
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert first[0][0].shape == (4, 3, 8, 8) and first[0][0].dtype == torch.float32
    assert torch.equal(torch.get_rng_state(), state)

    evaluation = make_loader(splits.test, batch_size=4, train=False)
    batches = epoch_batches(evaluation, 0)
    assert [len(y) for _, y in batches] == [4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == splits.test.targets.tolist()


def test_imagefolder_workers_do_not_change_batches(tmp_path):
    write_imagefolder(tmp_path, n_train=4, n_val=1)
    splits = build("imagefolder", root=str(tmp_path), val_fraction=0.0, image_size=8)
    serial = epoch_batches(make_loader(splits.train, batch_size=4, train=True, num_workers=0), 1)
    parallel = epoch_batches(make_loader(splits.train, batch_size=4, train=True, num_workers=1), 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(serial, parallel))


def test_imagefolder_errors(tmp_path):
    write_imagefolder(tmp_path, n_train=2, n_val=1)
    (tmp_path / "val" / "eel").rename(tmp_path / "val" / "fox")
    with pytest.raises(DatasetError, match=r"only in train: \['eel'\], only in val: \['fox'\]"):
        build("imagefolder", root=str(tmp_path))
    (tmp_path / "val" / "fox" / "0.png").unlink()
    with pytest.raises(DatasetError, match=r"val holds no usable class folders .*fox"):
        build("imagefolder", root=str(tmp_path))
    for child in (tmp_path / "val").rglob("*.png"):
        child.unlink()
    for child in (tmp_path / "val").iterdir():
        child.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(DatasetError, match=f"missing folder {tmp_path / 'val'}.*train/<class>/<image>"):
        build("imagefolder", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# loaders


def test_eval_loader_covers_every_index_once_over_ranks():
    data = synthetic(n=103)
    seen = []
    for rank in range(2):
        loader = make_loader(data, batch_size=10, train=False, rank=rank, world_size=2)
        targets = torch.cat([y for _, y in epoch_batches(loader, 0)])
        assert targets.tolist() == list(range(rank, 103, 2))
        assert loader.num_samples == len(targets) and len(loader) == -(-len(targets) // 10)
        seen += targets.tolist()
    assert sorted(seen) == list(range(103))


def test_eval_loader_normalizes_without_augmentation():
    data = synthetic(n=20, channels=3, pad=2)
    info = data.info
    x, y = next(iter(make_loader(data, batch_size=20, train=False)))
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    expected = (data.images.float() / 255 - mean) / std
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_train_loader_shards_are_disjoint_and_drop_last():
    data = synthetic(n=103)
    shards = []
    for rank in range(2):
        loader = make_loader(data, batch_size=10, train=True, seed=4, rank=rank, world_size=2)
        batches = epoch_batches(loader, 3)
        assert len(batches) == len(loader) == 5 and loader.num_samples == 50
        assert all(len(y) == 10 for _, y in batches)
        shards.append(set(torch.cat([y for _, y in batches]).tolist()))
    assert not shards[0] & shards[1]


def test_train_loader_determinism():
    data = synthetic(n=64)
    state = torch.get_rng_state()
    loader = make_loader(data, batch_size=16, train=True, seed=1)
    first, again = epoch_batches(loader, 5), epoch_batches(loader, 5)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    fresh = epoch_batches(make_loader(data, batch_size=16, train=True, seed=1), 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, fresh))
    other_epoch = torch.cat([y for _, y in epoch_batches(loader, 6)])
    assert not torch.equal(torch.cat([y for _, y in first]), other_epoch)
    other_seed = epoch_batches(make_loader(data, batch_size=16, train=True, seed=2), 5)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other_seed]))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_loader_output_is_a_shifted_flipped_copy():
    """Each augmented sample equals its source shifted by at most `pad` (zero fill), maybe mirrored."""
    data = synthetic(n=40, size=(6, 5), pad=1, flip=True)
    loader = make_loader(data, batch_size=8, train=True, seed=0)
    flips, shifts = set(), set()
    for x, y in epoch_batches(loader, 0):
        raw = denormalize(x, data.info)
        for image, index in zip(raw, y.tolist()):
            padded = torch.nn.functional.pad(data.images[index].float(), (1, 1, 1, 1))
            matches = [
                (dy, dx, flip)
                for dy in range(3)
                for dx in range(3)
                for flip in (False, True)
                if torch.equal(image, (lambda c: c.flip(-1) if flip else c)(padded[:, dy:dy + 6, dx:dx + 5]))
            ]
            assert matches, f"sample {index} is not a shifted/flipped copy"
            flips |= {m[2] for m in matches}
            shifts |= {m[:2] for m in matches}
    assert flips == {False, True} and len(shifts) == 9


def test_crop_flip_reference():
    images = torch.randint(0, 256, (4, 2, 5, 6), dtype=torch.uint8)
    centred = torch.full((4,), 2)
    no = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(crop_flip(images, 2, centred, centred, no), images)
    assert torch.equal(crop_flip(images, 2, centred, centred, ~no), images.flip(-1))
    flip = torch.tensor([True, False, True, False])
    mixed = crop_flip(images, 2, centred, centred, flip)
    assert torch.equal(mixed[flip], images[flip].flip(-1)) and torch.equal(mixed[~flip], images[~flip])

    dy, dx = torch.tensor([0, 4, 1, 2]), torch.tensor([3, 0, 4, 2])
    out = crop_flip(images, 2, dy, dx, no)
    reference = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)))
    for b in range(4):
        assert np.array_equal(out[b].numpy(), reference[b, :, dy[b]:dy[b] + 5, dx[b]:dx[b] + 6])
    assert out[0, :, :2].eq(0).all()  # dy = 0: the top two rows come from the zero padding

    shaped = augment_batch(images, Augment(pad=3, flip=True), torch.Generator().manual_seed(0))
    assert shaped.shape == images.shape and shaped.dtype == images.dtype


def test_make_loader_rejects_bad_arguments():
    data = synthetic(n=10)
    with pytest.raises(ValueError, match="rank"):
        make_loader(data, batch_size=2, train=True, rank=2, world_size=2)
    with pytest.raises(TypeError):
        make_loader(list(range(10)), batch_size=2, train=True)


def test_idx_gzip_and_plain_give_same_bytes(tmp_path):
    """gzip handling is transparent: the same IDX content read from .gz and plain files agrees."""
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "a", array)
    write_idx(tmp_path / "a.gz", array)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == (tmp_path / "a").read_bytes()
    from pcdistill.data.idx import IMAGES_MAGIC, read_idx

    assert np.array_equal(read_idx(tmp_path / "a", IMAGES_MAGIC), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz", IMAGES_MAGIC), array)
