"""Name -> factory registry for models: `create` builds one, `list_models` discovers them."""
from __future__ import annotations

import fnmatch
import inspect
import numbers
from typing import Callable

from torch import nn

from pcdistill.models.timm_models import create_timm, is_timm_name
from pcdistill.registry import Registry, closest

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

_CORE_ARGS = ("num_classes", "in_channels")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering `factory(num_classes, in_channels=<natural default>, **options)`."""

    def add(factory: ModelFactory) -> ModelFactory:
        params = inspect.signature(factory).parameters
        in_channels = params.get("in_channels")
        # `create` omits in_channels when the caller does, so the factory must carry the default.
        if "num_classes" not in params or in_channels is None or in_channels.default is in_channels.empty:
            raise TypeError(
                f"model factory {name!r} must accept num_classes and in_channels=<default channels>"
            )
        return MODELS.register(name)(factory)

    return add


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a case-sensitive fnmatch pattern."""
    names = MODELS.names()
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def build(name: str, num_classes: int, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Model `name` (registered, or `timm/<any timm model>`) with `num_classes` logits, freshly initialised;
    :func:`pcdistill.models.create` adds the weights."""
    num_classes = _check_int("num_classes", num_classes, minimum=2)
    if in_channels is not None:
        in_channels = _check_int("in_channels", in_channels, minimum=1)
    if is_timm_name(name):
        model = create_timm(name, num_classes, in_channels, **kwargs)
    else:
        factory = MODELS.get(name)
        _check_options(name, factory, kwargs)
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        model = factory(num_classes=num_classes, **kwargs)
    return model


def _check_int(arg: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_options(name: str, factory: ModelFactory, kwargs: dict) -> None:
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    options = [p.name for p in params if p.name not in _CORE_ARGS and p.kind is not p.VAR_POSITIONAL]
    for key in kwargs:
        if key not in options:
            accepted = ", ".join(options) or "no extra options"
            raise TypeError(
                f"model {name!r} got an unexpected keyword argument {key!r}"
                f"{closest(key, options)}; it accepts: {accepted}"
            )
