"""Classification datasets and fast, deterministic, DDP-aware loaders.

    splits = build("fashion_mnist", root=None, val_fraction=0.1, seed=0)
    loader = make_loader(splits.train, batch_size=128, train=True, seed=0, rank=0, world_size=1)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, targets in loader: ...

Registered datasets: digits, mnist, fashion_mnist, fashion_mnist_pairs, cifar10, cifar100,
imagefolder (see their modules for file formats and sources). Missing or malformed data raises
`DatasetError` (a ValueError) saying what is wrong, where, and how to obtain the data.
Text corpora for language models (python_stdlib, text) are in `pcdistill.data.text` (`build_corpus`).
"""
from pcdistill.data import cifar, digits, idx, imagefolder, pairs  # noqa: F401  (register the datasets)
from pcdistill.data.base import DataInfo, DatasetError, Splits, build, list_datasets, register_dataset
from pcdistill.data.loaders import make_loader

__all__ = ["DataInfo", "DatasetError", "Splits", "build", "list_datasets", "make_loader", "register_dataset"]
