"""Model registry: name -> constructor.

``CATALOG`` is the one list of models: each name and the module that defines it. It needs no torch,
so the command line lists the names (``--model`` choices, ``--help``) without importing torch;
``build(name)`` imports the model's module on first use, and that module registers its constructor
with ``@register(name)``.

A checkpoint stores the registry name and the constructor's keyword arguments, so
``build(name, **config)`` rebuilds exactly the trained architecture.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# name -> module that registers it (a new model: its module here, and @register(name) in it)
CATALOG: dict[str, str] = {"lenet": "nfm_models.lenet", "mlp": "nfm_models.mlp", "vit-tiny": "nfm_models.vit",
                           "wrn16-4": "nfm_models.wrn"}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """Raised for a name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator adding a constructor under ``name``, from the module ``CATALOG`` names
    for it; a name outside the catalog, another module's name, or a second registration is an error."""

    def add(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name not in CATALOG:
            raise ValueError(f"model {name!r} is not in nfm_models.CATALOG; add it there (name -> module)")
        if name in _REGISTRY or constructor.__module__ != CATALOG[name]:
            raise ValueError(f"model {name!r} is already registered (by {CATALOG[name]})")
        _REGISTRY[name] = constructor
        return constructor

    return add


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(CATALOG)


def build(name: str, **config) -> nn.Module:
    """Construct the registered model ``name`` with keyword arguments ``config``."""
    if name not in CATALOG:
        raise UnknownModelError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    if name not in _REGISTRY:
        importlib.import_module(CATALOG[name])   # registers it
        if name not in _REGISTRY:
            raise ValueError(f"{CATALOG[name]} does not register model {name!r}; decorate its constructor "
                             f"with @register({name!r})")
    return _REGISTRY[name](**config)
