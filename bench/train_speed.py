"""Training throughput: what distillation and our data pipeline cost on a real CIFAR pair.

Times one training step (teacher forward + student forward/backward + SGD step) of resnet32x4 ->
resnet8x4 on 32x32 inputs at batch 64 for vanilla, KD, DKD and PCD, in interleaved rounds, on the
CPU and, when present, CUDA; prints images/s and PCD / KD (target: at most 1.05).

Then compares the data pipelines on the same models: ours (uint8 tensors in memory, one gather per
batch, crop/flip/normalise as batched tensor ops) against a conventional one (a Dataset of PIL
images with torchvision's RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize in a
DataLoader), alone and feeding PCD training steps.

    python bench/train_speed.py            # CPU (and CUDA when available)
    python bench/train_speed.py --quick    # fewer rounds
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pcdistill import models
from pcdistill.data.base import Augment, DataInfo, InMemoryDataset
from pcdistill.data.loaders import make_loader
from pcdistill.distiller import Distiller
from pcdistill.losses import build_loss

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
METHODS = {"vanilla": ("vanilla", {}), "KD": ("kd", {"temperature": 4.0}),
           "DKD": ("dkd", {"temperature": 4.0}), "PCD": ("pcd", {"temperature": 4.0, "stages": 3})}


def synthetic_cifar(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n)


class PILDataset(Dataset):
    """The conventional pipeline: one PIL image per item, transformed per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def ours(images: np.ndarray, labels: np.ndarray, batch: int, device) -> object:
    info = DataInfo("synthetic", 100, 3, (32, 32), MEAN, STD)
    data = InMemoryDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                           info, Augment(pad=4, flip=True))
    return make_loader(data, batch_size=batch, train=True, device=device)


def conventional(images: np.ndarray, labels: np.ndarray, batch: int, workers: int):
    return DataLoader(PILDataset(images, labels), batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0)


def distillers(device) -> dict[str, Distiller]:
    torch.manual_seed(0)
    teacher = models.create("resnet32x4", num_classes=100).to(device)
    out = {}
    for name, (method, kwargs) in METHODS.items():
        student = models.create("resnet8x4", num_classes=100).to(device)
        out[name] = Distiller(student, teacher if method != "vanilla" else None, build_loss(method, **kwargs),
                              warmup_epochs=0).train()
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(device, batch: int, rounds: int, amp: bool = False, compiled: bool = False) -> dict[str, float]:
    nets = distillers(device)
    optim = {k: torch.optim.SGD(d.student.parameters(), lr=0.01, momentum=0.9) for k, d in nets.items()}
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def loss_of(net):
        def total(images, targets):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, losses = net(images, targets, epoch=1.0)
            return sum(losses.values())
        return torch.compile(total, fullgraph=True) if compiled else total

    losses_of = {name: loss_of(net) for name, net in nets.items()}

    def step(name):
        optim[name].zero_grad(set_to_none=True)
        losses_of[name](x, y).backward()
        optim[name].step()

    for name in nets:
        step(name)
    times = {name: [] for name in nets}
    for _ in range(rounds):
        for name in nets:
            sync(device)
            start = time.perf_counter()
            step(name)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def pipeline_rate(loader, batches: int, train_step=None) -> float:
    """Images/s of ``batches`` batches from ``loader`` (after one warm-up batch), optionally training on each."""
    it = iter(loader)
    images, targets = next(it)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        if train_step is not None:
            train_step(images, targets)
        count += len(targets)
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes and the loss")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) of each step's loss")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the data-pipeline comparison")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        parser.error("CUDA is not available on this machine")
    print(f"# train_speed: {datetime.date.today()}, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, resnet32x4 -> resnet8x4, batch {args.batch}, 32x32, "
          f"amp {args.amp}, compile {args.compile}")
    for device in devices:
        rates = step_times(device, args.batch, rounds, args.amp, args.compile)
        print(f"\n## {device.type}: training step (teacher forward + student forward/backward + SGD)\n")
        print("| method | images/s | x vanilla |\n|---|---:|---:|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.1f} | {rate / rates['vanilla']:.3f} |")
        ratio = rates["KD"] / rates["PCD"]
        print(f"\nPCD / KD step time: {ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
    if args.no_pipeline:
        return 0

    images, labels = synthetic_cifar(4096)
    cpu = torch.device("cpu")
    print("\n## data pipeline, CPU (images/s)\n")
    print("| pipeline | data only | feeding PCD training steps |\n|---|---:|---:|")
    pcd = distillers(cpu)["PCD"]
    opt = torch.optim.SGD(pcd.student.parameters(), lr=0.01, momentum=0.9)

    def train_step(x, y):
        _, losses = pcd(x.to(cpu), y.to(cpu), epoch=1.0)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    data_batches, train_batches = (20, 3) if args.quick else (60, 6)
    results = {}
    for name, loader in (("ours (batched tensors)", ours(images, labels, args.batch, cpu)),
                         ("conventional (PIL, DataLoader, 0 workers)", conventional(images, labels, args.batch, 0)),
                         ("conventional (PIL, DataLoader, 2 workers)", conventional(images, labels, args.batch, 2))):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)
        results[name] = (pipeline_rate(loader, data_batches), pipeline_rate(loader, train_batches, train_step))
        print(f"| {name} | {results[name][0]:.0f} | {results[name][1]:.1f} |")
    ours_rate = results["ours (batched tensors)"]
    for name, rate in list(results.items())[1:]:
        print(f"\nours / {name}: data only {ours_rate[0] / rate[0]:.1f}x, with PCD training {ours_rate[1] / rate[1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
