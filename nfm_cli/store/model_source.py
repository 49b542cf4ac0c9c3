"""Where a model's code comes from: a registered name, ``torchvision:NAME`` or ``MODULE:FACTORY``.

A checkpoint's ``model`` entry is ``{"name": SOURCE, "args": {...}}`` (plus, for imported models,
``num_classes`` and ``code``); ``build_model`` rebuilds the architecture from it the same way every
time. For ``MODULE:FACTORY`` the module's source file is hashed at import (``code.sha256``) and
checked on every rebuild, so a checkpoint is never silently paired with edited code.

Rebuilding a ``MODULE:FACTORY`` checkpoint imports that module and calls the factory: it runs the
user's code, as loading any model from code does. To keep a file from naming arbitrary callables
(``os:system``), factories from the standard library and from ``torch`` are refused, and the factory
must be an ``nn.Module`` subclass or a function defined in the module it is named by.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

import nfm_models
from nfm_cli.errors import NfmError

TORCHVISION = "torchvision:"
_REFUSED_TOP_LEVEL = {"builtins", "torch", "nfm_cli"}


def source_kind(source: str) -> str:
    """``registered``, ``torchvision`` or ``factory``; an error for anything else."""
    if not isinstance(source, str) or not source:
        raise NfmError("--model is empty; give a registered name (mlp, lenet, wrn16-4), "
                       "torchvision:NAME or MODULE:FACTORY")
    if source.startswith(TORCHVISION):
        return "torchvision"
    if ":" in source:
        module, _, factory = source.partition(":")
        if not module or not factory or not all(p.isidentifier() for p in module.split(".") + factory.split(".")):
            raise NfmError(f"--model {source!r} is not MODULE:FACTORY (a Python import path, e.g. "
                           "mypkg.nets:make_resnet)")
        return "factory"
    if source not in nfm_models.names():
        raise NfmError(f"unknown model {source!r}; valid: {', '.join(nfm_models.names())}, "
                       "torchvision:NAME or MODULE:FACTORY")
    return "registered"


def parse_model_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "name=wide"]`` -> ``{"num_classes": 10, "name": "wide"}``: values are JSON
    literals when they parse as such (numbers, true/false/null, lists, quoted strings), else strings."""
    args: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise NfmError(f"--model-arg {pair!r} is not KEY=VALUE with KEY a Python identifier")
        if key in args:
            raise NfmError(f"--model-arg {key} is given twice")
        try:
            args[key] = json.loads(text, parse_constant=_refuse_constant)
        except ValueError:
            args[key] = text
    return args


def _refuse_constant(name: str):
    raise ValueError(name)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The architecture of a checkpoint's ``model`` entry (random weights); ``NfmError`` if impossible."""
    source, args = spec["name"], spec["args"]
    kind = source_kind(source)
    if kind == "registered":
        factory = lambda **kw: nfm_models.build(source, **kw)
    elif kind == "torchvision":
        factory = _torchvision_factory(source)
    else:
        factory = _user_factory(source, spec.get("code"))
    try:
        model = factory(**args)
    except NfmError:
        raise
    except Exception as exc:  # the user's code or torchvision refusing the arguments
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise NfmError(f"cannot build {source} with arguments {args}: {type(exc).__name__}: {first}; "
                       "check --model-arg") from None
    if not isinstance(model, nn.Module):
        raise NfmError(f"{source} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _torchvision_factory(source: str) -> Callable[..., nn.Module]:
    import torchvision.models

    name = source[len(TORCHVISION):]
    if name not in torchvision.models.list_models():
        raise NfmError(f"torchvision has no model {name!r} (torchvision {_torchvision_version()}); "
                       "see torchvision.models.list_models()")

    def factory(**kwargs):
        if "weights" in kwargs:
            raise NfmError("--model-arg weights is not allowed: nfm builds the architecture only, "
                           "the weights come from --weights")
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return factory


def _torchvision_version() -> str:
    import torchvision
    return torchvision.__version__


def _user_factory(source: str, recorded: dict[str, Any] | None) -> Callable[..., nn.Module]:
    module_name, _, attr = source.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in _REFUSED_TOP_LEVEL:
        raise NfmError(f"--model {source}: factories from {top!r} are refused (not a model factory); "
                       "name a function or nn.Module class in your own module")
    module = _import(module_name, source)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise NfmError(f"module {module_name} ({_file_of(module)}) has no attribute {attr!r}; "
                           "check the FACTORY part of --model MODULE:FACTORY")
    is_module_class = inspect.isclass(factory) and issubclass(factory, nn.Module)
    defined_here = str(getattr(factory, "__module__", "")).split(".")[0] == top
    if not callable(factory) or not (is_module_class or defined_here):
        raise NfmError(f"--model {source}: {attr} must be an nn.Module class or a function defined in "
                       f"{top} (it is {type(factory).__name__} from {getattr(factory, '__module__', '?')})")
    if recorded and recorded.get("sha256"):
        now = code_record(source).get("sha256")
        if now != recorded["sha256"]:
            raise NfmError(f"the code of {source} ({_file_of(module)}) changed since the weights were imported "
                           f"(sha256 {str(recorded['sha256'])[:12]}... then, {str(now)[:12]}... now); restore "
                           "it or import the weights again with nfm import")
    return factory


def _import(module_name: str, source: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise NfmError(f"cannot import module {module_name!r} for --model {source} ({exc}); put its folder on "
                       "PYTHONPATH or install it (the checkpoint needs the same code to rebuild the model)") from None
    except Exception as exc:  # the user's module failed while importing
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise NfmError(f"importing module {module_name!r} for --model {source} failed: "
                       f"{type(exc).__name__}: {first}") from None


def _file_of(module) -> str:
    return str(getattr(module, "__file__", None) or module.__name__)


def code_record(source: str) -> dict[str, Any]:
    """Where the code came from, for the checkpoint's ``source`` record: the torchvision version, or
    the factory module's file and the SHA-256 of its bytes (``{}`` for registered models)."""
    kind = source_kind(source)
    if kind == "registered":
        return {"kind": "registered"}
    if kind == "torchvision":
        return {"kind": "torchvision", "torchvision": _torchvision_version()}
    module = _import(source.partition(":")[0], source)
    path = getattr(module, "__file__", None)
    digest = None
    if path:
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    return {"kind": "factory", "module": module.__name__, "file": path, "sha256": digest}
