"""Datasets as whole tensors: the registered ones (``data.registry``: MNIST, Fashion-MNIST, CIFAR-10 and
a synthetic set), read by their registered file layout and standardised with their normalization.

Local folders are searched first (``--data-dir``, then ``$NFM_DATA``, then Debian's
``/usr/share/datasets/<name>``); nothing is downloaded unless ``download=True``. A folder may hold
torchvision's own layout (``MNIST/raw/...``, ``FashionMNIST/raw/...``, ``cifar-10-batches-py/``) or
the IDX files directly (``train-images-idx3-ubyte[.gz]`` ..., Debian's layout). The files are read
by ``nfm_cli.data.files`` (torchvision only downloads) and decoded once into a cache (``cache_dir()``).

Splits are small, so they are held as tensors (on the training device); batches are index slices.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nfm_cli.data.files import CIFAR_BATCHES, IDX_FILES, cached, fingerprint, read_cifar_split, read_idx_split
from nfm_cli.data.registry import DATASET_SPECS, dataset_spec
from nfm_cli.errors import NfmError
from nfm_cli.runtime.rng import keyed_generator

DEBIAN_ROOT = Path("/usr/share/datasets")

# the synthetic set's facts, as registered (``synthetic_split`` makes it)
_SYNTHETIC = DATASET_SPECS["synthetic"]
SYNTHETIC_SHAPE = _SYNTHETIC.shape
SYNTHETIC_CLASSES = _SYNTHETIC.num_classes
SYNTHETIC_TRAIN, SYNTHETIC_TEST = _SYNTHETIC.train_size, _SYNTHETIC.test_size


class Split:
    """Labels (int64) and inputs (float32, standardised) of one split.

    A split read from files keeps its raw bytes; ``inputs(idx)`` standardises only the rows asked for
    (elementwise, so exactly the numbers standardising the whole split gives), which spares a run on
    a 1,000-sample subset converting all 60,000 images. ``x`` is the whole split (computed once).
    """

    def __init__(self, x: torch.Tensor | None, y: torch.Tensor, *, raw: torch.Tensor | None = None,
                 normalization: tuple | None = None):
        self._x, self.y, self.raw, self.normalization = x, y, raw, normalization

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        if self._x is not None:
            return self._x if idx is None else self._x[idx]
        raw = self.raw if idx is None else self.raw[idx]
        x = raw.to(torch.float32).div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x  # IDX: [N, H, W]; CIFAR-10: already [N, C, H, W]
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in self.normalization)
        return (x - mean) / std

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            self._x = self.inputs()
        return self._x


@dataclass(frozen=True)
class DatasetInfo:
    in_channels: int
    image_size: int
    num_classes: int


def dataset_info(name: str) -> DatasetInfo:
    """Input shape and class count of a dataset (they set the model's constructor arguments)."""
    spec = dataset_spec(name)
    return DatasetInfo(spec.in_channels, spec.image_size, spec.num_classes)


def check_dataset_name(name: str) -> None:
    """An ``NfmError`` listing the valid names unless ``name`` is a known dataset."""
    dataset_spec(name)


def cache_dir() -> Path:
    """Where decoded datasets and downloads go: $NFM_CACHE, else $XDG_CACHE_HOME/nfm, else ~/.cache/nfm."""
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
    if dataset_spec(name).layout == "synthetic":
        return synthetic_split(train)
    if strict:
        check_data_dir(data_dir)
    raw_x, raw_y = _load_raw(name, train, data_dir, download, strict and data_dir is not None)
    return Split(None, raw_y.to(torch.int64), raw=raw_x, normalization=dataset_spec(name).normalization)


def _load_raw(name: str, train: bool, data_dir, download: bool,
              only_data_dir: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    roots = search_roots(name, data_dir)[:2] if only_data_dir else search_roots(name, data_dir)
    for root in roots:
        files = _local_files(name, train, root)
        if files is not None:
            return _read_files(name, train, files)
    if download:
        target = Path(data_dir or os.environ.get("NFM_DATA") or cache_dir() / "downloads")
        _download(name, train, target)
        files = _local_files(name, train, target)
        if files is not None:
            return _read_files(name, train, files)
        raise NfmError(f"downloaded {name} but cannot find its files", target)
    where = ", ".join(str(r) for r in roots)
    if only_data_dir:
        raise NfmError(f"--data-dir does not hold the {name} dataset (looked in {where}); point it at the "
                       "folder with the files, leave it out to search the usual places, or add --download",
                       data_dir)
    raise NfmError(f"dataset {name} not found (looked in {where}); put the files in one of these folders, "
                   f"point --data-dir or $NFM_DATA at them, or pass --download when online")


def _local_files(name: str, train: bool, root: Path) -> list[Path] | None:
    """The files of one split under ``root`` (flat IDX files, torchvision's layout, or CIFAR-10's
    batches folder), or None if they are not there."""
    if not root.is_dir():
        return None
    spec = dataset_spec(name)
    if spec.layout == "cifar":
        folder = root / spec.torchvision_folder
        files = [folder / b for b in CIFAR_BATCHES[train]]
        if not (folder / CIFAR_BATCHES[True][0]).exists():
            return None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise NfmError(f"dataset {name} found but incomplete (no {missing[0]})", folder)
        return files
    for folder in (root, root / spec.torchvision_folder / "raw"):
        files = [next((c for c in (folder / f, folder / (f + ".gz")) if c.exists()), None) for f in IDX_FILES[train]]
        if all(files):
            return files
    return None


# While ``shared_splits()`` is active (``nfm measure a b c``, a sweep worker), the raw splits read from
# files are kept in the process, keyed by (dataset, split, the files' paths, sizes and modification times,
# the disk cache's folder): Fashion-MNIST is read once, not once per checkpoint. The raw bytes are never
# changed in place (``Split.inputs`` converts a copy) and the labels are handed out as copies, so sharing
# them cannot change a number; changed files have another key and are read again.
_raw_splits: dict[tuple[str, bool, str, str], tuple[torch.Tensor, torch.Tensor]] | None = None
RAW_SPLITS_KEPT = 4   # MNIST-sized splits are ~50 MB raw, CIFAR-10's training split 150 MB


@contextlib.contextmanager
def shared_splits() -> Iterator[None]:
    """Keep the raw splits read inside the block for the rest of it (nested blocks share one store)."""
    global _raw_splits
    outer = _raw_splits
    _raw_splits = {} if outer is None else outer
    try:
        yield
    finally:
        _raw_splits = outer


def _read_files(name: str, train: bool, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    if _raw_splits is None:
        return _decoded(name, train, files)
    key = (name, train, fingerprint(files), str(cache_dir()))
    if key not in _raw_splits:
        raw = _decoded(name, train, files)
        while len(_raw_splits) >= RAW_SPLITS_KEPT:
            _raw_splits.pop(next(iter(_raw_splits)))     # the oldest entry
        _raw_splits[key] = raw
    x, y = _raw_splits[key]
    return x, y.clone()


def _decoded(name: str, train: bool, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset_spec(name).layout == "cifar":
        decode = lambda: read_cifar_split(files)  # noqa: E731
    else:
        decode = lambda: read_idx_split(*files)  # noqa: E731
    return cached(cache_dir(), f"{name}-{'train' if train else 'test'}", files, decode)


def _download(name: str, train: bool, target: Path) -> None:
    """torchvision's downloader (checked against its md5 sums); imported only here: it is slow."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset_spec(name).download_class)
    try:
        cls(str(target), train=train, download=True)
    except Exception as exc:
        raise NfmError(f"could not download {name} into {target}: {str(exc).splitlines()[0][:120]}") from None


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
