"""Reading a foreign ``state_dict`` safely: safetensors, or torch's pickle format without unpickling code.

* ``.safetensors``: the header is read and checked (size, dtypes, shapes, offsets inside the file
  and not overlapping) before any tensor is allocated (``check_safetensors_header``).
* ``.pt`` / ``.pth`` / ``.bin`` (or anything else in torch's format): ``torch.load(weights_only=True)``
  only, which builds tensors and plain containers and refuses every other global; a file that names
  one (a pickled whole model, a ``__reduce__`` payload) is refused with what it named. Nothing in it runs.
* the usual wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ...), and key prefixes
  ``module.`` (DistributedDataParallel) and ``model.`` (Lightning) are dropped when that makes the keys
  match the model (``match_state_dict``), which also names missing, unexpected and misshaped tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nfm_cli.errors import NfmError

MAX_HEADER_BYTES = 16 << 20     # a real header is KBs (about 100 bytes per tensor)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a safetensors file, validated before anything is allocated: its length is below
    ``MAX_HEADER_BYTES`` and inside the file, every tensor has a known dtype, a shape whose byte size
    equals its offsets' span, and offsets inside the data section that overlap no other tensor's."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise NfmError("is too short to be a safetensors file", path)
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise NfmError(f"safetensors header claims {length} bytes (at most {MAX_HEADER_BYTES} accepted); "
                           "refused before reading it (corrupt or hostile file)", path)
        if length > size - 8:
            raise NfmError(f"safetensors header claims {length} bytes but the file has {size}; truncated or "
                           "not a safetensors file", path)
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise NfmError("safetensors header is not valid JSON (corrupt or not a safetensors file)", path) from None
    if not isinstance(header, dict):
        raise NfmError("safetensors header is not a JSON object (corrupt file)", path)
    spans = []
    for name, entry in header.items():
        if name != "__metadata__":
            spans.append(_tensor_span(name, entry, size - 8 - length, path))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise NfmError(f"safetensors tensors {n0!r} and {n1!r} overlap (corrupt or hostile file)", path)
    return header


def _tensor_span(name: str, entry: Any, data_size: int, path: Path) -> tuple[int, int, str]:
    bad = f"safetensors entry {name!r}"
    if not isinstance(entry, dict) or entry.get("dtype") not in _ITEMSIZE:
        raise NfmError(f"{bad} has no known dtype (corrupt file)", path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise NfmError(f"{bad} has a malformed shape or data_offsets (corrupt file)", path)
    begin, end = offsets
    nbytes = math.prod(shape) * _ITEMSIZE[entry["dtype"]]
    if not 0 <= begin <= end <= data_size:
        raise NfmError(f"{bad} claims bytes {begin}..{end} but the file holds {data_size} bytes of data "
                       "(truncated, corrupt or hostile file); refused before allocating", path)
    if end - begin != nbytes:
        raise NfmError(f"{bad} claims shape {shape} ({nbytes} bytes) in {end - begin} bytes (corrupt file)", path)
    return begin, end, name


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, after ``check_safetensors_header``."""
    from safetensors.torch import load_file

    check_safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors' own checks
        raise NfmError(f"not a valid safetensors file ({str(exc).splitlines()[0][:120]})", path) from None


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


def match_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str]:
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
