"""The one weight loader: file layouts, the CRD/mdistiller CIFAR key names, torchvision and timm weights.

The real teacher files (mdistiller's ``cifar_teachers.tar``) cannot be downloaded here, so the
reference networks below re-state the CRD/RepDistiller/mdistiller CIFAR zoo
(``models/cifar/*.py``): their attribute names, hence their state-dict keys, and their order of
operations in every block. They are written from the description of that code, independently of
``pcdistill.models``; checkpoints are saved from them exactly as the zoo's training script saves
them (``{"epoch", "model", "accuracy", "optimizer"}``) and our models must compute the same logits.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from pcdistill.models import create, list_models, read_state_dict
from pcdistill.models.weights import read_metadata
from tests.data_fixtures import cifar_rows, py2_pickle
from tests.helpers import digits_config, run_cli


# ----------------------------------------------------------------------------------------------
# The CRD zoo, as its code names and orders things
# ----------------------------------------------------------------------------------------------
def conv(cin, cout, k, stride=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


class RefResNetBlock(nn.Module):  # models/cifar/resnet.py BasicBlock: post-activation, `downsample`
    def __init__(self, cin, cout, stride, downsample):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet(nn.Module):  # conv1/bn1, layer1-3, AvgPool2d(8), fc
    def __init__(self, depth, filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv(3, filters[0], 3), nn.BatchNorm2d(filters[0])
        cin = filters[0]
        for i, (cout, stride) in enumerate(zip(filters[1:], (1, 2, 2)), 1):
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
            blocks = [RefResNetBlock(cin, cout, stride, down)] + [RefResNetBlock(cout, cout, 1, None)
                                                                   for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.avg_pool2d(x, 8).flatten(1))


class RefV2Block(nn.Module):  # models/cifar/resnetv2.py BasicBlock / Bottleneck, `shortcut` Sequential
    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        self.bottleneck = bottleneck
        if bottleneck:
            self.conv1, self.bn1 = conv(cin, planes, 1), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = conv(planes, cout, 1), nn.BatchNorm2d(cout)
        else:
            self.conv1, self.bn1 = conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        else:
            out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class RefResNetV2(nn.Module):  # conv1/bn1, layer1-4, adaptive pool, `linear`
    def __init__(self, blocks, bottleneck, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 64, 3), nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), 1):
            layer = []
            for j in range(count):
                layer.append(RefV2Block(cin, planes, stride if j == 0 else 1, bottleneck))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class RefWRNBlock(nn.Module):  # models/cifar/wrn.py BasicBlock: pre-activation, `convShortcut`
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv(cout, cout, 3)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else conv(cin, cout, 1, stride)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        # identity adds the raw input; the projection reads the activated one
        return (x if self.equal else self.convShortcut(act)) + out


class RefNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RefWRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefWRN(nn.Module):  # conv1, block1-3 (NetworkBlock.layer), bn1, relu, avg_pool 8, fc
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, ch = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = conv(3, 16, 3)
        self.block1 = RefNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RefNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RefNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1, self.fc = nn.BatchNorm2d(ch[3]), nn.Linear(ch[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.avg_pool2d(F.relu(self.bn1(x)), 8).flatten(1))


VGG_CFG = {8: [[64], [128], [256], [512], [512]], 11: [[64], [128], [256, 256], [512, 512], [512, 512]],
           13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
           16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
           19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}


class RefVGG(nn.Module):  # block0-4 (conv+bias, BN, ReLU; the last ReLU dropped), pool0-2, classifier
    def __init__(self, depth, num_classes):
        super().__init__()
        cin = 3
        for b, widths in enumerate(VGG_CFG[depth]):
            layers = []
            for w in widths:
                layers += [conv(cin, w, 3, bias=True), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        for b in range(5):
            x = F.relu(getattr(self, f"block{b}")(x))
            if b < 3:  # pool3 only runs for 64x64 inputs
                x = F.max_pool2d(x, 2)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class RefInvertedResidual(nn.Module):  # models/cifar/mobilenetv2.py: `conv` Sequential of 8
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        h = cin * t
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(conv(cin, h, 1), nn.BatchNorm2d(h), nn.ReLU(),
                                  conv(h, h, 3, stride, groups=h), nn.BatchNorm2d(h), nn.ReLU(),
                                  conv(h, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class RefMobileNetV2(nn.Module):  # mobile_half: T=6, width 0.5; conv1, blocks[0..6], conv2, avgpool, classifier
    def __init__(self, num_classes, t=6, width=0.5):
        super().__init__()
        setting = [(1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1),
                   (t, 160, 3, 2), (t, 320, 1, 1)]
        cin = int(32 * width)
        self.conv1 = nn.Sequential(conv(3, cin, 3, 2), nn.BatchNorm2d(cin), nn.ReLU())
        self.blocks = nn.ModuleList()
        for e, c, n, s in setting:
            cout, layers = int(c * width), []
            for i in range(n):
                layers.append(RefInvertedResidual(cin, cout, s if i == 0 else 1, e))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.conv2 = nn.Sequential(conv(cin, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = F.avg_pool2d(self.conv2(x), 2, ceil_mode=True)
        return self.classifier(x.flatten(1))


def shuffle(x, g):
    n, c, h, w = x.shape
    return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class RefShuffleV1Block(nn.Module):  # models/cifar/ShuffleNetv1.py Bottleneck
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, self.stride = int(cout / 4), stride
        self.g = 1 if cin == 24 else groups
        self.conv1, self.bn1 = conv(cin, mid, 1, groups=self.g), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv(mid, cout, 1, groups=groups), nn.BatchNorm2d(cout)

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class RefShuffleV1(nn.Module):  # conv1/bn1 (1x1 to 24), layer1-3, avg_pool 4, linear
    def __init__(self, num_classes, planes=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 24, 1), nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(planes, blocks), 1):
            layer = []
            for j in range(n):
                layer.append(RefShuffleV1Block(cin, cout - (cin if j == 0 else 0), 2 if j == 0 else 1, groups))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(x, 4).flatten(1))


class RefShuffleV2Basic(nn.Module):  # models/cifar/ShuffleNetv2.py BasicBlock: split, transform 2nd half
    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.conv1, self.bn1 = conv(h, h, 1), nn.BatchNorm2d(h)
        self.conv2, self.bn2 = conv(h, h, 3, groups=h), nn.BatchNorm2d(h)
        self.conv3, self.bn3 = conv(h, h, 1), nn.BatchNorm2d(h)

    def forward(self, x):
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return shuffle(torch.cat([x1, out], 1), 2)


class RefShuffleV2Down(nn.Module):  # DownBlock: left conv1-2, right conv3-5
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = conv(cin, cin, 3, 2, groups=cin), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = conv(cin, mid, 1), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv(cin, mid, 1), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = conv(mid, mid, 1), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return shuffle(torch.cat([left, right], 1), 2)


class RefShuffleV2(nn.Module):  # net_size 1: conv1/bn1, layer1-3, conv2/bn2 (1024), avg_pool 4, linear
    def __init__(self, num_classes, channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 24, 1), nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(channels, blocks), 1):
            setattr(self, f"layer{i}", nn.Sequential(RefShuffleV2Down(cin, cout),
                                                     *[RefShuffleV2Basic(cout) for _ in range(n)]))
            cin = cout
        self.conv2, self.bn2 = conv(cin, channels[3], 1), nn.BatchNorm2d(channels[3])
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1))


REFERENCE = {
    **{f"resnet{d}": (lambda d: lambda c: RefResNet(d, (16, 16, 32, 64), c))(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda c: RefResNet(8, (32, 64, 128, 256), c),
    "resnet32x4": lambda c: RefResNet(32, (32, 64, 128, 256), c),
    "ResNet18": lambda c: RefResNetV2((2, 2, 2, 2), False, c),
    "ResNet34": lambda c: RefResNetV2((3, 4, 6, 3), False, c),
    "ResNet50": lambda c: RefResNetV2((3, 4, 6, 3), True, c),
    **{f"wrn_{d}_{w}": (lambda d, w: lambda c: RefWRN(d, w, c))(d, w) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": (lambda d: lambda c: RefVGG(d, c))(d) for d in VGG_CFG},
    "MobileNetV2": RefMobileNetV2,
    "ShuffleV1": RefShuffleV1,
    "ShuffleV2": RefShuffleV2,
}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BN statistic drawn at random (running stats far from 0/1), eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(97)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def save_crd_checkpoint(model: nn.Module, path: Path, wrap=lambda m: m) -> Path:
    """The file the zoo's train_teacher.py writes: epoch, state dict under "model", accuracy, SGD state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers, as in a real checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 240, "model": wrap(model).state_dict(), "accuracy": torch.tensor(72.34),
                "optimizer": optimizer.state_dict()}, path)
    return path


def images(n=3, seed=1, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours: nn.Module, ref: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        want, got = ref.eval()(x), ours.eval()(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()


CIFAR_ZOO = sorted(REFERENCE)


def test_reference_covers_every_cifar_model():
    registered = {n for n in list_models() if not n.startswith(("tv_", "cnn_")) and n != "mlp"}
    assert set(CIFAR_ZOO) == registered


@pytest.mark.parametrize("name", CIFAR_ZOO)
def test_crd_checkpoint_loads_strictly_and_computes_their_logits(name, tmp_path):
    torch.manual_seed(0)
    ref = randomize(REFERENCE[name](100), seed=len(name))
    path = save_crd_checkpoint(ref, tmp_path / f"{name}_vanilla" / "ckpt_epoch_240.pth")
    ours = create(name, num_classes=100, weights=path)
    # every tensor of the file is used, including BN statistics and num_batches_tracked
    assert sorted(t.numel() for t in ours.state_dict().values()) == sorted(
        t.numel() for t in ref.state_dict().values())
    assert_same_logits(ours, ref, images())


def test_legacy_serialization_of_old_pytorch_loads(tmp_path):
    """The zoo's teachers date from PyTorch 1.x; files of torch < 1.6 are not zip archives."""
    ref = randomize(REFERENCE["vgg8"](100), seed=2)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": ref.state_dict(), "accuracy": torch.tensor(70.36)}, path,
               _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    assert_same_logits(create("vgg8", num_classes=100, weights=path), ref, images())
    torch.save({"model": ref.state_dict(), "opt": argparse.Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"refusing to load .*argparse\.Namespace"):
        read_state_dict(path)


def test_crd_names_are_their_names():
    """Spot checks of key names the zoo's files are known to hold."""
    keys = {n: set(REFERENCE[n](100).state_dict()) for n in ("resnet32x4", "wrn_40_2", "vgg13", "ResNet50",
                                                                "MobileNetV2", "ShuffleV1", "ShuffleV2")}
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "layer3.4.bn2.bias", "fc.weight"} <= keys["resnet32x4"]
    assert {"block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight",
            "bn1.running_mean", "fc.bias"} <= keys["wrn_40_2"]
    assert {"block0.0.weight", "block0.0.bias", "block0.4.running_mean", "block4.3.weight",
            "classifier.weight"} <= keys["vgg13"]
    assert {"layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"} <= keys["ResNet50"]
    assert {"conv1.0.weight", "blocks.6.0.conv.7.running_var", "conv2.1.weight", "classifier.0.weight"} <= \
        keys["MobileNetV2"]
    assert {"layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"} <= keys["ShuffleV1"]
    assert {"layer1.0.conv5.weight", "layer2.7.bn3.bias", "conv2.weight", "bn2.running_var",
            "linear.weight"} <= keys["ShuffleV2"]


def test_converted_model_trains_like_theirs_in_train_mode(tmp_path):
    """Training mode uses batch statistics: the same forward as theirs there too (wrn: pre-activation)."""
    ref = randomize(REFERENCE["wrn_16_2"](10), seed=3)
    ours = create("wrn_16_2", num_classes=10, weights=save_crd_checkpoint(ref, tmp_path / "w.pth"))
    x = images(4)
    assert torch.allclose(ours.train()(x), ref.train()(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# File layouts
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def resnet8():
    return randomize(REFERENCE["resnet8"](10), seed=5)


@pytest.mark.parametrize("key", ["model", "state_dict", "net", "model_state", None])
def test_state_dict_under_any_usual_key(resnet8, tmp_path, key):
    state = resnet8.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state if key is None else {key: state, "epoch": 3}, path)
    assert_same_logits(create("resnet8", num_classes=10, weights=path), resnet8, images())


@pytest.mark.parametrize("names", ["ours", "theirs"])
def test_dataparallel_prefix_is_stripped(resnet8, tmp_path, names):
    source = resnet8 if names == "theirs" else randomize(create("resnet8", num_classes=10), seed=9)
    path = save_crd_checkpoint(source, tmp_path / "dp.pth.tar", wrap=nn.DataParallel)
    assert next(iter(torch.load(path, weights_only=True)["model"])).startswith("module.")
    assert_same_logits(create("resnet8", num_classes=10, weights=path), source, images())


def test_safetensors_with_their_names(resnet8, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in resnet8.state_dict().items()}, str(path))
    assert_same_logits(create("resnet8", num_classes=10, weights=path), resnet8, images())


class Payload:
    """Unpickling this object would create a file: the loader must refuse before running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_file_needing_pickled_code_is_refused(resnet8, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": resnet8.state_dict(), "payload": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth.*pickled.*weights_only=True") as info:
        create("resnet8", num_classes=10, weights=path)
    assert "pathlib" in str(info.value) and not marker.exists()
    torch.save({"model": resnet8.state_dict(), "opt": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="argparse.Namespace"):
        read_state_dict(path)


def test_strict_errors_name_the_tensors(resnet8, tmp_path):
    state = resnet8.state_dict()
    torch.save({"model": {k: v for k, v in state.items() if k != "fc.bias"}}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing 1 tensors \(fc\.bias\)"):
        create("resnet8", num_classes=10, weights=tmp_path / "missing.pth")
    torch.save({"model": state | {"extra.weight": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected 1 tensors \(extra\.weight\)"):
        create("resnet8", num_classes=10, weights=tmp_path / "extra.pth")
    torch.save({"model": state}, tmp_path / "ten.pth")
    with pytest.raises(ValueError, match=r"2 shape mismatches \(fc\.weight: file \(10, 64\) vs model \(100, 64\)"):
        create("resnet8", num_classes=100, weights=tmp_path / "ten.pth")
    with pytest.raises(ValueError, match="does not fit this WideResNet"):
        create("wrn_16_1", num_classes=10, weights=tmp_path / "ten.pth")


def test_crd_file_of_another_depth_is_refused_in_their_names(tmp_path):
    path = save_crd_checkpoint(randomize(REFERENCE["resnet20"](100), seed=1), tmp_path / "r20.pth")
    # resnet32 has 2 more blocks per stage: 6 blocks x (2 convs + 2 BNs x 4 tensors, num_batches_tracked aside)
    with pytest.raises(ValueError, match=r"missing 60 tensors \(layer1\.3\.bn1\.bias, layer1\.3\.bn1\.running_mean"):
        create("resnet32", num_classes=100, weights=path)


def test_old_files_without_num_batches_tracked_load(resnet8, tmp_path):
    state = {k: v for k, v in resnet8.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state}, tmp_path / "old.pth")
    assert_same_logits(create("resnet8", num_classes=10, weights=tmp_path / "old.pth"), resnet8, images())


def test_files_without_a_state_dict_are_explained(tmp_path):
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"holds no state dict: its top-level keys are 'epoch', 'weights'"):
        read_state_dict(tmp_path / "odd.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file .*junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        create("resnet8", num_classes=10, weights=tmp_path / "absent.pth")


def test_own_checkpoint_layout_loads(tmp_path):
    """A file with our own key names, e.g. a state dict saved from pcdistill's model."""
    source = randomize(create("ShuffleV2", num_classes=10), seed=2)
    torch.save(source.state_dict(), tmp_path / "ours.pth")
    assert_same_logits(create("ShuffleV2", num_classes=10, weights=tmp_path / "ours.pth"), source, images())


# ----------------------------------------------------------------------------------------------
# torchvision and timm
# ----------------------------------------------------------------------------------------------
def test_torchvision_cache_file_loads(tmp_path):
    """A plain state dict as torchvision writes to its cache (resnet18-<hash>.pth)."""
    from torchvision.models import resnet18
    source = randomize(resnet18(weights=None), seed=4)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(source.state_dict(), path)
    assert_same_logits(create("tv_resnet18", num_classes=1000, weights=path), source, images(2, size=64))


def test_timm_model_by_name_with_weights_from_a_file(tmp_path):
    timm = pytest.importorskip("timm")
    source = randomize(timm.create_model("test_resnet", num_classes=7, pretrained=False), seed=6)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "timm.pth.tar")
    model = create("timm/test_resnet", num_classes=7, weights=tmp_path / "timm.pth.tar")
    assert_same_logits(model, source, images(2, size=48))
    with pytest.raises(ValueError, match=r"unknown timm model 'test_resnett' \(did you mean 'test_resnet'\?\)"):
        create("timm/test_resnett", num_classes=7)


def test_timm_pretrained_is_timms_own_loading(monkeypatch):
    timm = pytest.importorskip("timm")
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda arch, **kw: calls.append((arch, kw)) or nn.Linear(1, 1))
    create("timm/deit_tiny_patch16_224", num_classes=100, in_channels=1, pretrained=True, drop_rate=0.1)
    assert calls == [("deit_tiny_patch16_224", {"pretrained": True, "num_classes": 100, "in_chans": 1,
                                                "drop_rate": 0.1})]


def test_timm_pretrained_teacher_must_match_the_classes(monkeypatch):
    timm = pytest.importorskip("timm")
    from pcdistill.config import ConfigError, from_dict
    from pcdistill.tasks.base import load_teacher
    built = []
    cfg = from_dict(digits_config(teacher={"name": "timm/resnet50", "options": {"pretrained": True}},
                                  distill={"method": "kd", "loss": {}}))
    with pytest.raises(ConfigError, match="pretrained weights are for 1000 classes, the dataset has 10"):
        load_teacher(cfg, 10, lambda: built.append(1))
    assert not built  # refused before anything is built or downloaded
    monkeypatch.setattr(timm, "create_model", lambda arch, **kw: nn.Linear(1, kw["num_classes"]))
    teacher = load_teacher(cfg, 1000, lambda: create("timm/resnet50", num_classes=1000, pretrained=True))
    assert teacher.out_features == 1000


def test_timm_models_distill_one_step_on_cpu(tmp_path):
    pytest.importorskip("timm")
    from pcdistill.engine.trainer import train
    from pcdistill.config import from_dict
    teacher = randomize(create("timm/test_efficientnet", num_classes=10, in_channels=1), seed=8)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg = digits_config(model={"name": "timm/test_resnet"}, distill={"method": "pcd", "loss": {"stages": 2}},
                        teacher={"name": "timm/test_efficientnet", "weights": str(tmp_path / "teacher.pth")},
                        trainer={"epochs": 1, "iterations": 1, "batch_size": 32})
    summary = train(from_dict(cfg), tmp_path / "run")
    assert summary.epochs == 1 and np.isfinite(summary.final["test_acc"])
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["train_distill"]) and row["train_distill"] > 0


def test_list_shows_timm_entries():
    pytest.importorskip("timm")
    proc = run_cli("list", "timm")
    assert proc.returncode == 0, proc.stderr
    assert "timm/test_resnet" in proc.stdout and "timm/deit_tiny_patch16_224" in proc.stdout


# ----------------------------------------------------------------------------------------------
# Configs and the command line
# ----------------------------------------------------------------------------------------------
def test_model_weights_initialise_the_student(tmp_path):
    from pcdistill.config import from_dict
    from pcdistill.engine import distributed
    from pcdistill.tasks import build_task
    source = randomize(create("cnn_tiny", num_classes=10, in_channels=1), seed=7)
    torch.save({"net": source.state_dict()}, tmp_path / "init.pth")
    cfg = from_dict(digits_config(model={"name": "cnn_tiny", "weights": str(tmp_path / "init.pth")}))
    task = build_task(cfg, distributed.setup("cpu"))
    for key, value in source.state_dict().items():
        assert torch.equal(task.student.state_dict()[key], value), key


def write_cifar100_labelled(root: Path, n_test: int, labels) -> np.ndarray:
    """CIFAR-100 python files (as in tests.data_fixtures) whose test labels are ``labels``."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    splits = {"train": cifar_rows(100, rng), "test": cifar_rows(n_test, rng)}
    for name, data in splits.items():
        fine = [int(v) for v in (labels(data) if name == "test" else np.arange(len(data)) % 100)]
        record = {b"filenames": [b"x.png"] * len(data), b"batch_label": name.encode(), b"fine_labels": fine,
                  b"coarse_labels": [v // 5 for v in fine], b"data": data}
        (folder / name).write_bytes(py2_pickle(record))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta))
    return splits["test"]


def test_convert_then_eval_the_standard_teacher(tmp_path):
    """`pcdistill convert` writes our layout; `pcdistill eval CONFIG teacher.weights=FILE` prints its accuracy."""
    ref = randomize(REFERENCE["resnet8"](100), seed=11)
    ckpt = save_crd_checkpoint(ref, tmp_path / "cifar_teachers" / "resnet8_vanilla" / "ckpt_epoch_240.pth")
    mean, std = np.array([0.5071, 0.4865, 0.4409]), np.array([0.2673, 0.2564, 0.2762])

    def labels(rows):  # the teacher's own prediction for the first 30 images, another class after
        x = (rows.reshape(-1, 3, 32, 32) / 255.0 - mean[:, None, None]) / std[:, None, None]
        with torch.no_grad():
            pred = ref(torch.tensor(x, dtype=torch.float32)).argmax(1).numpy()
        return np.where(np.arange(len(pred)) < 30, pred, (pred + 1) % 100)

    write_cifar100_labelled(tmp_path / "data", 40, labels)
    out = tmp_path / "resnet8.safetensors"
    proc = run_cli("convert", str(ckpt), "--model", "resnet8", "--num-classes", "100", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(out)["num_classes"] == 100
    assert_same_logits(create("resnet8", num_classes=100, weights=out), ref, images())
    config = tmp_path / "pcd.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "cifar100", "root": str(tmp_path / "data"), "val_fraction": 0},
        "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "weights": "unused.safetensors"},
        "distill": {"method": "pcd", "loss": {"stages": 3}}, "trainer": {"device": "cpu", "batch_size": 16}}))
    for weights in (ckpt, out):
        proc = run_cli("eval", str(config), f"teacher.weights={weights}")
        assert proc.returncode == 0, proc.stderr
        heading, result = proc.stdout.splitlines()[:2]
        assert heading == f"the teacher of {config}: resnet8 with {weights} (teacher.weights)", proc.stdout
        assert result.startswith("test: acc 75.00%,"), proc.stdout
    proc = run_cli("convert", str(ckpt), "--model", "wrn_16_1", "--num-classes", "100", "--out", str(out))
    assert proc.returncode == 2 and "does not fit this WideResNet" in proc.stderr
    config.write_text(yaml.safe_dump({"data": {"name": "cifar100", "root": str(tmp_path / "data")},
                                      "model": {"name": "resnet8"}}))
    proc = run_cli("eval", str(config))
    assert proc.returncode == 2 and "names no teacher with weights" in proc.stderr


def test_model_weights_are_for_classification_only():
    from pcdistill.config import ConfigError, from_dict
    with pytest.raises(ConfigError, match="model.weights applies to classification"):
        from_dict(digits_config(task="detection", model={"name": "fasterrcnn_resnet18_fpn", "weights": "w.pth"}))


def test_teacher_from_a_foreign_checkpoint_through_a_config(tmp_path):
    ref = randomize(REFERENCE["resnet8"](10), seed=12)
    ckpt = save_crd_checkpoint(ref, tmp_path / "t.pth")
    from pcdistill.config import from_dict
    from pcdistill.tasks.base import load_teacher
    cfg = from_dict(digits_config(teacher={"name": "resnet8", "weights": str(ckpt)},
                                  distill={"method": "kd", "loss": {"temperature": 4.0}}))
    teacher = load_teacher(cfg, 10, lambda: create("resnet8", num_classes=10))
    assert_same_logits(teacher, ref, images())
