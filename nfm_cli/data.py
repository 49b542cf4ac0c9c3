"""Datasets as whole tensors: MNIST, Fashion-MNIST, CIFAR-10 (through torchvision) and a synthetic set.

Local folders are searched first (``--data-dir``, then ``$NFM_DATA``, then Debian's
``/usr/share/datasets/<name>``); nothing is downloaded unless ``download=True``. A folder may hold
torchvision's own layout (``MNIST/raw/...``, ``FashionMNIST/raw/...``, ``cifar-10-batches-py/``) or
the IDX files directly (``train-images-idx3-ubyte[.gz]`` ..., Debian's layout), which are staged
once into the cache folder in torchvision's layout.

Splits are small, so they are held as tensors (on the training device); batches are index slices.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from nfm_cli.errors import NfmError
from nfm_cli.rng import keyed_generator

DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")
DEBIAN_ROOT = Path("/usr/share/datasets")

# Per-channel mean/std of the training splits, used to standardise inputs.
_NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}

SYNTHETIC_SHAPE = (1, 28, 28)
SYNTHETIC_CLASSES = 10
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2048, 512


@dataclass
class Split:
    """Inputs (float32, standardised) and labels (int64) of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DatasetInfo:
    in_channels: int
    image_size: int
    num_classes: int


def dataset_info(name: str) -> DatasetInfo:
    """Input shape and class count of a dataset (they set the model's constructor arguments)."""
    check_dataset_name(name)
    if name == "cifar10":
        return DatasetInfo(3, 32, 10)
    if name == "synthetic":
        return DatasetInfo(SYNTHETIC_SHAPE[0], SYNTHETIC_SHAPE[1], SYNTHETIC_CLASSES)
    return DatasetInfo(1, 28, 10)


def check_dataset_name(name: str) -> None:
    """An ``NfmError`` listing the valid names unless ``name`` is a known dataset."""
    if name not in DATASETS:
        raise NfmError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def cache_dir() -> Path:
    """Where staged copies and downloads go: $NFM_CACHE, else $XDG_CACHE_HOME/nfm, else ~/.cache/nfm."""
    if os.environ.get("NFM_CACHE"):
        return Path(os.environ["NFM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nfm"


def search_roots(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched, in order: --data-dir, $NFM_DATA (each as given and with /<name>), Debian's."""
    roots: list[Path] = []
    for base in (data_dir, os.environ.get("NFM_DATA")):
        if base:
            roots += [Path(base), Path(base) / name]
    roots += [DEBIAN_ROOT / name, cache_dir() / "downloads"]
    return roots


def check_data_dir(data_dir: str | os.PathLike | None) -> None:
    """An explicit ``--data-dir`` must be an existing folder (checked before any work)."""
    if data_dir is None:
        return
    path = Path(data_dir)
    if not path.exists():
        raise NfmError("--data-dir does not exist", path)
    if not path.is_dir():
        raise NfmError("--data-dir is a file, not a folder with the dataset files", path)


def load_split(name: str, train: bool, data_dir: str | os.PathLike | None = None,
               download: bool = False, strict: bool = False) -> Split:
    """One whole split of ``name`` as standardised float32 tensors on the CPU.

    ``strict``: ``data_dir`` was given by the user, so the dataset must be there (or be downloaded
    there); nothing else is searched. Otherwise ``data_dir`` is only the first folder searched."""
    check_dataset_name(name)
    if name == "synthetic":
        return synthetic_split(train)
    if strict:
        check_data_dir(data_dir)
    raw_x, raw_y = _load_raw(name, train, data_dir, download, strict and data_dir is not None)
    x = raw_x.to(torch.float32).div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in _NORMALIZATION[name])
    return Split((x - mean) / std, raw_y.to(torch.int64))


def _load_raw(name: str, train: bool, data_dir, download: bool,
              only_data_dir: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd  # imported lazily: it is slow to import

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": _local_cifar10_class()}[name]
    roots = search_roots(name, data_dir)[:2] if only_data_dir else search_roots(name, data_dir)
    for root in roots:
        tv_root = _torchvision_root(name, root)
        if tv_root is not None:
            try:
                ds = cls(str(tv_root), train=train, download=False)
            except Exception as exc:  # corrupt local files: say which folder
                raise NfmError(f"dataset {name} found but unreadable ({str(exc).splitlines()[0][:100]})",
                               tv_root) from None
            return _as_tensors(ds)
    if download:
        target = Path(data_dir or os.environ.get("NFM_DATA") or cache_dir() / "downloads")
        cls = tvd.CIFAR10 if name == "cifar10" else cls  # downloads are checked against the md5 sums
        try:
            ds = cls(str(target), train=train, download=True)
        except Exception as exc:
            raise NfmError(f"could not download {name} into {target}: {str(exc).splitlines()[0][:120]}") from None
        return _as_tensors(ds)
    where = ", ".join(str(r) for r in roots)
    if only_data_dir:
        raise NfmError(f"--data-dir does not hold the {name} dataset (looked in {where}); point it at the "
                       "folder with the files, leave it out to search the usual places, or add --download",
                       data_dir)
    raise NfmError(f"dataset {name} not found (looked in {where}); put the files in one of these folders, "
                   f"point --data-dir or $NFM_DATA at them, or pass --download when online")


def _local_cifar10_class():
    """torchvision's CIFAR10 reading local batches without their md5 check (a copy, a subset or a
    test's small files in the same pickle format); the reader itself still validates the content."""
    import torchvision.datasets as tvd

    class LocalCIFAR10(tvd.CIFAR10):
        train_list = [[fname, None] for fname, _ in tvd.CIFAR10.train_list]
        test_list = [[fname, None] for fname, _ in tvd.CIFAR10.test_list]
        meta = dict(tvd.CIFAR10.meta, md5=None)

    return LocalCIFAR10


def _as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(ds.data)
    targets = ds.targets if isinstance(ds.targets, torch.Tensor) else torch.tensor(ds.targets)
    return data, targets


def _torchvision_root(name: str, root: Path) -> Path | None:
    """A root that torchvision's class accepts as is, staging flat IDX files if needed."""
    if not root.is_dir():
        return None
    folder = _TORCHVISION_FOLDER[name]
    if name == "cifar10":
        return root if (root / folder / "data_batch_1").exists() else None
    if all((root / folder / "raw" / f).exists() for f in _IDX_FILES):
        return root
    found = {}
    for f in _IDX_FILES:
        for candidate in (root / f, root / (f + ".gz")):
            if candidate.exists():
                found[f] = candidate
                break
    if len(found) < len(_IDX_FILES):
        return None
    return _stage_idx(name, found)


def _stage_idx(name: str, files: dict[str, Path]) -> Path:
    """Decompress/copy flat IDX files into ``<cache>/<name>/<Folder>/raw/`` (once, atomically)."""
    staged_root = cache_dir() / name
    raw = staged_root / _TORCHVISION_FOLDER[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for target_name, source in files.items():
        target = raw / target_name
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        tmp = target.with_name(f".{target_name}.{os.getpid()}.tmp")
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return staged_root


def synthetic_split(train: bool) -> Split:
    """A seeded, image-shaped classification set with a learnable signal (for tests and demos).

    Each class has a fixed random prototype image; a sample is 0.08 x its class prototype plus unit
    Gaussian noise, so prototypes are about 3 noise standard deviations apart: every model can learn
    it, none perfectly (the Bayes accuracy is below 1), and random labels must be memorized.
    Not a substitute for a real dataset.
    """
    protos = torch.randn((SYNTHETIC_CLASSES,) + SYNTHETIC_SHAPE, generator=keyed_generator(0, "synthetic", "protos"))
    n = SYNTHETIC_TRAIN if train else SYNTHETIC_TEST
    gen = keyed_generator(0, "synthetic", "train" if train else "test")
    y = torch.randint(SYNTHETIC_CLASSES, (n,), generator=gen)
    x = 0.08 * protos[y] + torch.randn((n,) + SYNTHETIC_SHAPE, generator=gen)
    return Split(x, y)


def subset_indices(n: int, size: int | None, seed: int, purpose: str = "train-subset") -> torch.Tensor:
    """Sorted indices of a seeded subset of ``size`` out of ``n`` (all of them when size is None)."""
    if size is None or size >= n:
        return torch.arange(n)
    if size < 1:
        raise NfmError(f"subset size must be positive, not {size}")
    perm = torch.randperm(n, generator=keyed_generator(seed, purpose))
    return perm[:size].sort().values


def randomize_labels(labels: torch.Tensor, ratio: float, num_classes: int, seed: int) -> torch.Tensor:
    """Sec. 6.1: a seeded fraction ``ratio`` of labels replaced by labels drawn uniformly from K classes.

    round(ratio * n) positions are chosen without replacement; each gets a uniform class, which
    equals the original with probability 1/K (so r = 0.3, K = 10 changes about 27% of labels).
    """
    if not 0.0 <= ratio <= 1.0:
        raise NfmError(f"random_ratio must be in [0, 1], not {ratio}")
    gen = keyed_generator(seed, "random-labels")
    n = len(labels)
    count = int(round(ratio * n))
    chosen = torch.randperm(n, generator=gen)[:count]
    out = labels.clone()
    out[chosen] = torch.randint(num_classes, (count,), generator=gen)
    return out
