"""Reading a foreign ``state_dict`` safely: safetensors, or torch's pickle format without unpickling code.

* ``.safetensors``: the header is read and checked (size, dtypes, shapes, offsets inside the file
  and not overlapping) before any tensor is allocated (``runtime.files.check_safetensors_header``).
* ``.pt`` / ``.pth`` / ``.bin`` (or anything else in torch's format): ``torch.load(weights_only=True)``
  only, which builds tensors and plain containers and refuses every other global; a file that names
  one (a pickled whole model, a ``__reduce__`` payload) is refused with what it named. Nothing in it runs.
* the usual wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ...), and key prefixes
  ``module.`` (DistributedDataParallel) and ``model.`` (Lightning) are dropped when that makes the keys
  match the model (``match_state_dict``), which also names missing, unexpected and misshaped tensors.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nfm_cli.errors import NfmError
from nfm_cli.runtime.files import file_sha256, read_safetensors

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
PREFIXES = ("module.", "model.", "_orig_mod.")
RESAVE = "re-save it with torch.save(model.state_dict(), PATH) or safetensors.torch.save_file"


@dataclass
class StateDict:
    """Tensors by key, and how they were found: file format, wrapper key, sha256 of the file."""

    tensors: dict[str, torch.Tensor]
    format: str
    wrapper: str | None
    sha256: str


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """The tensors of a weights file (safetensors, or torch's format loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise NfmError("no such weights file" if not path.exists() else "is not a file", path)
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{"):
        tensors, fmt, wrapper = read_safetensors(path), "safetensors", None
    else:
        tensors, wrapper = _unwrap(_torch_load(path), path)
        fmt = "torch"
    if not tensors:
        raise NfmError("holds no tensors", path)
    return StateDict(tensors, fmt, wrapper, file_sha256(path))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        named = _unsafe_globals(path, exc)
    if named:
        if any(g.startswith("torch.nn.modules.") or g.startswith("__main__.") for g in named):
            raise NfmError(f"is a pickled whole model ({named[0]}), not a state_dict; nfm loads weights "
                           f"without running code: {RESAVE}", path)
        raise NfmError(f"its pickle would call {', '.join(named[:3])} when loaded (code, not weights); refused, "
                       f"nothing was run; if you trust it, {RESAVE}", path)
    raise NfmError("is neither a safetensors file nor a torch.save file readable with weights_only=True "
                   "(corrupt, TorchScript or another format?); " + RESAVE, path)


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The globals a refused pickle names (scanned, not run)."""
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        named = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    return [str(g) for g in named]


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state_dict inside ``obj``: itself, or under one of ``WRAPPER_KEYS`` (nested once)."""
    wrapper = None
    for _ in range(2):
        if isinstance(obj, dict) and not _is_state_dict(obj):
            key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if key is None:
                break
            wrapper = key if wrapper is None else f"{wrapper}.{key}"
            obj = obj[key]
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        what = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {list(obj)[:5]}"
        raise NfmError(f"holds {what}, not a state_dict (a dict of tensors, possibly under 'state_dict' or "
                       f"'model'); {RESAVE}", path)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, wrapper


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def match_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                     path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """``tensors`` renamed to the model's keys (dropping wrapper prefixes) and cast to the model's float
    dtype; returns it and the prefix dropped. Missing/unexpected/misshaped tensors: one line each."""
    expected = model.state_dict()
    stripped = ""
    while set(tensors) != set(expected):
        prefix = next((p for p in PREFIXES if tensors and all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            break
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        stripped += prefix
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensors ({', '.join(missing[:3])})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"] if unexpected else [])
        raise NfmError(f"weights do not fit the model: {'; '.join(parts)}; is --model (and --model-arg) the "
                       "architecture these weights were saved from?", path)
    out = {}
    for key, ref in expected.items():
        got = tensors.get(key, ref)
        if tuple(got.shape) != tuple(ref.shape):
            raise NfmError(f"tensor {key} has shape {tuple(got.shape)} in the file, the model needs "
                           f"{tuple(ref.shape)}; check --model-arg (e.g. num_classes)", path)
        if got.is_floating_point() != ref.is_floating_point():
            raise NfmError(f"tensor {key} is {got.dtype} in the file, the model needs {ref.dtype}", path)
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise NfmError(f"tensor {key} holds NaN or inf; these weights cannot be measured", path)
        out[key] = got.to(ref.dtype)
    return out, stripped
