"""Model registry: name -> constructor.

A checkpoint stores the registry name and the constructor's keyword arguments, so
``build(name, **config)`` rebuilds exactly the trained architecture.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """Raised for a name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator adding a constructor under ``name``; duplicates are an error."""

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = constructor
        return constructor

    return add


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def build(name: str, **config) -> nn.Module:
    """Construct the registered model ``name`` with keyword arguments ``config``."""
    try:
        constructor = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(names())}") from None
    return constructor(**config)


# Registration happens on import of the model modules.
from nfm_models import lenet, mlp, wrn  # noqa: E402,F401
