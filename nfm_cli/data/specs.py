"""Data for imported models: a registered dataset, ``tensors:FILE.safetensors`` or ``imagefolder:DIR``.

* a registered name (``mnist``, ``fashion-mnist``, ``cifar10``, ``synthetic``): as ``nfm train`` uses it;
* ``tensors:FILE``: a safetensors file with ``train.x``, ``train.y``, ``test.x``, ``test.y`` (inputs already
  preprocessed as the model expects: floating point, read as float32, or signed integers such as token
  ids for a model that embeds them, any trailing shape, read as int64 and never cast to float; labels
  integer, read as int64). ``uint8`` and ``bool`` inputs are refused: raw image bytes and masks are
  ambiguous (scale them to float, or store ids as int64);
* ``imagefolder:DIR``: torchvision ``ImageFolder`` over ``DIR/train`` and ``DIR/test`` (or ``DIR/val``),
  classes numbered in sorted folder order of ``DIR/train``; images go through ``--resize`` (shorter
  side), ``--crop`` (center), conversion to [0, 1] and ``--normalize`` (per-channel mean and std), and
  must all end up the same size.

The spec and its preprocessing are recorded in the checkpoint's config (``data_spec``) so later steps
load the same tensors; the checkpoint's ``inputs_sha256`` then checks that they are the same.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nfm_cli.data.datasets import Split, load_split
from nfm_cli.data.registry import DATASET_NAMES
from nfm_cli.errors import NfmError
from nfm_cli.runtime.files import file_sha256, read_safetensors

TENSORS, IMAGEFOLDER = "tensors:", "imagefolder:"


@dataclass(frozen=True)
class DataSpec:
    kind: str                       # "registered", "tensors" or "imagefolder"
    location: str                   # dataset name, or the absolute path of the file / folder
    resize: int | None = None
    crop: int | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def text(self) -> str:
        return self.location if self.kind == "registered" else f"{self.kind}:{self.location}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["normalize"] = [list(v) for v in self.normalize] if self.normalize else None
        return out

    @classmethod
    def from_json(cls, record: Any, path: str | os.PathLike | None = None) -> DataSpec:
        try:
            norm = record.get("normalize")
            return cls(record["kind"], record["location"], record.get("resize"), record.get("crop"),
                       (tuple(norm[0]), tuple(norm[1])) if norm else None)
        except (AttributeError, KeyError, TypeError, IndexError):
            raise NfmError("checkpoint has a malformed config.data_spec entry (corrupt file)", path) from None


def parse_data_spec(text: str, resize: int | None = None, crop: int | None = None,
                    normalize: str | None = None) -> DataSpec:
    """``--data SPEC`` with the image options (which only ``imagefolder:`` takes)."""
    if text.startswith(TENSORS) or text.startswith(IMAGEFOLDER):
        kind, _, where = text.partition(":")
        if not where:
            raise NfmError(f"--data {text!r} names no path")
        location = str(Path(where).expanduser().resolve())
    elif text in DATASET_NAMES:
        kind, location = "registered", text
    else:
        raise NfmError(f"--data {text!r} is not a dataset ({', '.join(DATASET_NAMES)}), tensors:FILE.safetensors "
                       "or imagefolder:DIR")
    if kind != "imagefolder" and (resize or crop or normalize):
        raise NfmError("--resize, --crop and --normalize apply to --data imagefolder:DIR only")
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and value < 1:
            raise NfmError(f"--{name} must be a positive number of pixels, not {value}")
    return DataSpec(kind, location, resize, crop, _parse_normalize(normalize) if normalize else None)


def _parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"MEAN,STD"`` (all channels) or ``"m1,m2,m3,s1,s2,s3"`` (per channel: means, then stds)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) < 2 or len(values) % 2 or any(v != v for v in values):
        raise NfmError(f"--normalize {text!r} is not MEAN,STD or m1,..,mC,s1,..,sC (numbers)")
    half = len(values) // 2
    if any(s <= 0 for s in values[half:]):
        raise NfmError(f"--normalize {text!r}: standard deviations must be positive")
    return tuple(values[:half]), tuple(values[half:])


def locate(spec: DataSpec, data_dir: str | os.PathLike | None = None) -> Path:
    """The spec's file or folder; ``data_dir`` (when the data moved) replaces it: a file, or a folder
    holding a file of the same name (tensors) or the folder itself (imagefolder)."""
    path = Path(spec.location)
    if data_dir is not None:
        moved = Path(data_dir)
        path = moved / path.name if spec.kind == "tensors" and moved.is_dir() else moved
    if not path.exists():
        raise NfmError(f"{spec.kind} data not found (moved? pass --data-dir with its new location)", path)
    return path


def load_spec_split(spec: DataSpec, train: bool, data_dir: str | os.PathLike | None = None,
                    download: bool = False, strict: bool = False) -> Split:
    """One split of the data ``spec`` names, as float32 (or int64 token) inputs and int64 labels (``strict``: as
    ``data.load_split``'s, for registered datasets)."""
    if spec.kind == "registered":
        return load_split(spec.location, train, data_dir, download, strict=strict)
    path = locate(spec, data_dir)
    if spec.kind == "tensors":
        return _tensors_split(path, "train" if train else "test")
    return _imagefolder_split(spec, path, train)


def content_record(spec: DataSpec) -> dict[str, Any]:
    """Where the data came from, for the checkpoint's ``source`` record (file hash for tensors:)."""
    record: dict[str, Any] = {"spec": spec.text}
    if spec.kind == "tensors":
        record["sha256"] = file_sha256(Path(spec.location))
    return record


def _tensors_split(path: Path, split: str) -> Split:
    tensors = read_safetensors(path)
    missing = [k for k in (f"{split}.x", f"{split}.y") if k not in tensors]
    if missing:
        raise NfmError(f"tensors file lacks {', '.join(missing)} (needs train.x, train.y, test.x, test.y)", path)
    x, y = tensors[f"{split}.x"], tensors[f"{split}.y"]
    _check_inputs(x, f"{split}.x", path)
    if y.is_floating_point() or y.dtype == torch.bool or y.ndim != 1 or len(y) != len(x):
        raise NfmError(f"{split}.y must be an integer vector with one label per {split}.x sample, not "
                       f"{y.dtype} {tuple(y.shape)}", path)
    if len(y) == 0:
        raise NfmError(f"{split}.x is empty", path)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise NfmError(f"{split}.x holds NaN or inf", path)
    x = x.to(torch.float32) if x.is_floating_point() else x.to(torch.int64)   # token ids stay integers
    return Split(x.contiguous(), y.to(torch.int64))


def _check_inputs(x: torch.Tensor, name: str, path: Path) -> None:
    """Inputs are float (preprocessed values) or signed integers (token ids); uint8 and bool are refused."""
    if x.ndim < 2:
        raise NfmError(f"{name} must be [samples, ...] with at least one feature axis, not {tuple(x.shape)}", path)
    if x.dtype in (torch.uint8, torch.bool):
        raise NfmError(f"{name} is {x.dtype}: store preprocessed inputs as float (e.g. image bytes / 255) or "
                       "token ids as int64", path)
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise NfmError(f"{name} must be floating point or integer (token ids) [samples, ...], not {x.dtype}", path)


def _imagefolder_split(spec: DataSpec, root: Path, train: bool) -> Split:
    import torchvision.datasets as tvd
    from torchvision import transforms

    train_dir = root / "train"
    folder = train_dir if train else next((root / n for n in ("test", "val") if (root / n).is_dir()), root / "test")
    if not folder.is_dir():
        raise NfmError(f"imagefolder needs {'train' if train else 'test or val'} subfolders with one folder "
                       "per class", root)
    steps = ([transforms.Resize(spec.resize)] if spec.resize else []) + \
            ([transforms.CenterCrop(spec.crop)] if spec.crop else []) + [transforms.ToTensor()]
    classes = _classes(train_dir)

    class Fixed(tvd.ImageFolder):  # the test split numbers classes as the training split does
        def find_classes(self, directory):
            found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
            extra = [c for c in found if c not in classes]
            if extra:
                raise NfmError(f"test classes {extra[:3]} are not training classes", directory)
            return found, {c: classes.index(c) for c in found}

    try:
        ds = Fixed(str(folder), transform=transforms.Compose(steps))
        pairs = [ds[i] for i in range(len(ds))]
    except NfmError:
        raise
    except Exception as exc:  # unreadable image, empty class folder, ...
        raise NfmError(f"cannot read images: {str(exc).splitlines()[0][:160]}", folder) from None
    shapes = {tuple(img.shape) for img, _ in pairs}
    if len(shapes) > 1:
        raise NfmError(f"images have different sizes {sorted(shapes)[:3]}; pass --resize and --crop", folder)
    x = torch.stack([img for img, _ in pairs])
    if spec.normalize:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.normalize)
        if mean.numel() not in (1, x.shape[1]):
            raise NfmError(f"--normalize has {mean.numel()} channels, the images have {x.shape[1]}", folder)
        x = (x - mean) / std
    return Split(x.contiguous(), torch.tensor([label for _, label in pairs], dtype=torch.int64))


def _classes(train_dir: Path) -> list[str]:
    if not train_dir.is_dir():
        raise NfmError("imagefolder needs a train subfolder with one folder per class", train_dir.parent)
    return sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
