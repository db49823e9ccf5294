"""Tests for pcdistill.models: registry API, published parameter counts, shapes and gradients."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import pcdistill.models
from pcdistill.models import create, list_models, register_model
from pcdistill.models.registry import MODELS

# Millions of parameters for 100 classes as published for the CRD CIFAR-100 zoo (CRD, Tian et
# al., ICLR 2020, and the mdistiller / DKD tables); ResNet18/34 as in the DA2Lite CIFAR-100 zoo.
PUBLISHED_CIFAR100_PARAMS_M = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.25,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.36,
    "ResNet18": 11.22,
    "ResNet34": 21.33,
    "ResNet50": 23.7,
}

# Exact 1000-class counts from the torchvision model documentation.
PUBLISHED_IMAGENET_PARAMS = {
    "tv_resnet18": 11_689_512,
    "tv_resnet34": 21_797_672,
    "tv_resnet50": 25_557_032,
    "tv_mobilenet_v2": 3_504_872,
    "tv_mobilenet_v3_small": 2_542_856,
    "tv_mobilenet_v3_large": 5_483_032,
}

CIFAR = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2",
    "ResNet18", "ResNet34", "ResNet50",
}
TORCHVISION = set(PUBLISHED_IMAGENET_PARAMS)
SMALL_CNNS = {"cnn_tiny", "cnn_small", "cnn_large"}
SMALL_SIZES = [(8, 8), (28, 28), (28, 56)]  # digits, Fashion-MNIST, pairs


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_forward_backward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    logits = model(x)
    assert logits.shape == (x.shape[0], num_classes)
    logits.logsumexp(dim=1).mean().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_every_registered_model_is_exercised():
    assert set(list_models()) == CIFAR | TORCHVISION | SMALL_CNNS | {"mlp"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CIFAR100_PARAMS_M))
def test_cifar_param_counts_match_published(name):
    published = PUBLISHED_CIFAR100_PARAMS_M[name] * 1e6
    assert n_params(create(name, num_classes=100)) == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("name", sorted(PUBLISHED_IMAGENET_PARAMS))
def test_torchvision_param_counts_match_published(name):
    assert n_params(create(name, num_classes=1000)) == PUBLISHED_IMAGENET_PARAMS[name]


@pytest.mark.parametrize("name", sorted(CIFAR | TORCHVISION))
def test_image_models_forward_backward(name):
    size = 32 if name in CIFAR else 64
    check_forward_backward(create(name, num_classes=7), torch.randn(2, 3, size, size), 7)


@pytest.mark.parametrize("size", SMALL_SIZES)
@pytest.mark.parametrize("name", sorted(SMALL_CNNS))
def test_small_cnns_forward_backward(name, size):
    check_forward_backward(create(name, num_classes=10), torch.randn(2, 1, *size), 10)


@pytest.mark.parametrize("size", SMALL_SIZES)
def test_mlp_forward_backward(size):
    check_forward_backward(create("mlp", num_classes=100, input_size=size), torch.randn(2, 1, *size), 100)


def test_mlp_rejects_other_input_shapes():
    model = create("mlp", num_classes=10)
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="input_size"):
        create("mlp", num_classes=10, input_size=(0, 8))
    with pytest.raises(ValueError, match="input_size"):
        create("mlp", num_classes=10, input_size=28)


def test_small_nets_order_teacher_above_student():
    tiny, small, large = (n_params(create(n, num_classes=10)) for n in ("cnn_tiny", "cnn_small", "cnn_large"))
    assert 20_000 <= tiny < small < large
    assert tiny <= 40_000 and 500_000 <= large <= 1_000_000


def test_small_nets_fit_the_cpu_flop_budget():
    def flops(name: str) -> int:
        with FlopCounterMode(display=False) as counter:
            create(name, num_classes=10).eval()(torch.randn(1, 1, 28, 28))
        return counter.get_total_flops()

    assert flops("cnn_large") <= 40e6
    assert flops("cnn_tiny") <= 5e6


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_in_channels_default_and_override():
    assert first_conv(create("resnet8x4", num_classes=10)).in_channels == 3
    assert first_conv(create("cnn_tiny", num_classes=10)).in_channels == 1

    gray = create("resnet8x4", num_classes=10, in_channels=1)
    assert first_conv(gray).in_channels == 1
    check_forward_backward(gray, torch.randn(2, 1, 32, 32), 10)
    tv_gray = create("tv_resnet18", num_classes=10, in_channels=1)
    check_forward_backward(tv_gray, torch.randn(2, 1, 64, 64), 10)
    check_forward_backward(create("cnn_tiny", num_classes=10, in_channels=3), torch.randn(2, 3, 28, 28), 10)
    check_forward_backward(create("mlp", num_classes=10, in_channels=3), torch.randn(2, 3, 8, 8), 10)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match=r"'resnet8x5'.*did you mean 'resnet8x4'"):
        create("resnet8x5", num_classes=100)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, "10", True, None])
def test_bad_num_classes_is_named(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create("resnet8", num_classes=bad)


@pytest.mark.parametrize("bad", [0, 1.5, "3"])
def test_bad_in_channels_is_named(bad):
    with pytest.raises(ValueError, match="in_channels"):
        create("resnet8", num_classes=10, in_channels=bad)


def test_unknown_kwarg_names_it_and_the_model():
    with pytest.raises(TypeError, match=r"'resnet8'.*'width'"):
        create("resnet8", num_classes=10, width=2)
    with pytest.raises(TypeError, match=r"'mlp'.*'input_sizes'.*did you mean 'input_size'"):
        create("mlp", num_classes=10, input_sizes=(28, 28))


def test_list_models_sorted_and_filtered():
    names = list_models()
    assert names == sorted(names)
    assert list_models("resnet*x4") == ["resnet32x4", "resnet8x4"]
    assert list_models("tv_*") == sorted(TORCHVISION)
    assert list_models("nothing*") == []


def test_factories_have_one_line_docstrings():
    for name in list_models():
        doc = MODELS.get(name).__doc__
        assert doc and "\n" not in doc.strip(), name


def test_register_model(monkeypatch):
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))

    @register_model("linear_probe")
    def linear_probe(num_classes: int, in_channels: int = 1, size: int = 4) -> nn.Module:
        """Test-only linear classifier."""
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, num_classes))

    assert "linear_probe" in list_models()
    assert create("linear_probe", num_classes=3, size=2)(torch.randn(5, 1, 2, 2)).shape == (5, 3)
    with pytest.raises(ValueError, match="twice"):
        register_model("linear_probe")(linear_probe)
    with pytest.raises(TypeError, match="in_channels"):
        register_model("no_default")(lambda num_classes, in_channels: nn.Identity())


def test_models_never_import_data():
    package = Path(pcdistill.models.__file__).parent
    for source in package.rglob("*.py"):
        text = source.read_text()
        assert "pcdistill.data" not in text and "from ..data" not in text, source
