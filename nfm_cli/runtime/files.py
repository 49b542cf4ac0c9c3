"""Files read with care: content hashes, and safetensors files whose header is checked (size, dtypes,
shapes, offsets inside the file and not overlapping) before any tensor is allocated. Used by the
weights reader (``store.weights``) and by data specs (``data.specs``) alike.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from nfm_cli.errors import NfmError

MAX_HEADER_BYTES = 16 << 20     # a real header is KBs (about 100 bytes per tensor)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

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
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
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
