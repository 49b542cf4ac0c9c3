"""Dataset files read directly (no torchvision): IDX (MNIST, Fashion-MNIST) and CIFAR-10's pickled
batches, with a decoded cache so that a process does not decompress and parse them again.

The cache holds each split's raw uint8 images and labels as one safetensors file,
``<cache>/decoded/<dataset>-<split>-<fingerprint>.safetensors``; the fingerprint is the SHA-256 of
every source file's resolved path, size and modification time (ns), so replacing or editing a source
file gives another fingerprint and the split is decoded again (older entries of the split are then
removed). A cache entry that cannot be read is ignored and rewritten. The cache is an optimization
only: the tensors are the same with or without it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from nfm_cli.errors import NfmError

CACHE_VERSION = 1
IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_BATCHES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
_IDX_UINT8 = 0x08


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (``.gz`` or not) of unsigned bytes as a uint8 tensor of its recorded shape."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise NfmError(f"cannot read IDX file: {exc}", path) from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UINT8:
        raise NfmError("is not an IDX file of unsigned bytes (bad magic number)", path)
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise NfmError("is not a valid IDX file (bad header)", path)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(data) - header != count:
        raise NfmError(f"IDX file holds {len(data) - header} bytes of data, its header says {count} "
                       "(truncated or corrupt)", path)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*dims)


def read_idx_split(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one IDX split, checked to match."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise NfmError(f"images {tuple(x.shape)} and labels {tuple(y.shape)} do not match", images.parent)
    return x, y


def read_cifar_split(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's python batches: uint8 images [N, 3, 32, 32] and int64 labels."""
    xs, ys = [], []
    for path in files:
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data, labels = entry["data"], entry["labels"] if "labels" in entry else entry["fine_labels"]
            xs.append(torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32))
            ys.append(torch.as_tensor(labels, dtype=torch.int64))
        except NfmError:
            raise
        except Exception as exc:  # pickle and numpy raise many types for a damaged file
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise NfmError(f"cannot read CIFAR-10 batch ({reason})", path) from None
        if len(xs[-1]) != len(ys[-1]):
            raise NfmError("CIFAR-10 batch has unequal numbers of images and labels", path)
    return torch.cat(xs), torch.cat(ys)


def fingerprint(files: list[Path]) -> str:
    """SHA-256 of the files' resolved paths, sizes and modification times (and the cache version)."""
    entries = []
    for path in files:
        st = path.stat()
        entries.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps([CACHE_VERSION, entries]).encode()).hexdigest()


def cached(cache_root: Path, key: str, files: list[Path],
           decode: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode()``'s (images, labels), from ``<cache_root>/decoded`` when the files are unchanged."""
    from safetensors.torch import load_file, save

    folder = cache_root / "decoded"
    entry = folder / f"{key}-{fingerprint(files)[:32]}.safetensors"
    if entry.exists():
        try:
            t = load_file(str(entry))
            return t["x"], t["y"]
        except Exception:  # a damaged entry: decode again and replace it
            pass
    x, y = decode()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{entry.name}.{os.getpid()}.tmp"
        tmp.write_bytes(save({"x": x.contiguous(), "y": y.contiguous()}))
        os.replace(tmp, entry)
        for old in folder.glob(f"{key}-*.safetensors"):
            if old != entry:
                old.unlink(missing_ok=True)
    except OSError:  # a read-only or full cache folder: work without the cache
        pass
    return x, y
