"""nfm_cli.data.registry: the registered facts against independent sources (torchvision's classes, the
real files where installed, the readers' output), and everything derived from the registry."""
import gzip
from pathlib import Path

import numpy as np
import pytest

from nfm_cli import choices
from nfm_cli.data.datasets import dataset_info, load_split
from nfm_cli.data.registry import DATASET_NAMES, DATASET_SPECS, LAYOUTS, dataset_spec, datasets_help
from nfm_cli.errors import NfmError
from nfm_cli.report.correlations import TEST_SPLIT_SIZES
from tests.conftest import write_idx


def test_every_spec_is_well_formed():
    for name, spec in DATASET_SPECS.items():
        assert spec.name == name and spec.layout in LAYOUTS
        assert spec.shape == (spec.in_channels, spec.image_size, spec.image_size)
        if spec.normalization is not None:
            means, stds = spec.normalization
            assert len(means) == len(stds) == spec.in_channels and all(s > 0 for s in stds)
        assert (spec.download_class is None) == (spec.layout == "synthetic")


@pytest.mark.parametrize("name", [n for n, s in DATASET_SPECS.items() if s.download_class])
def test_download_class_writes_the_registered_folder(name):
    """torchvision's downloader puts the files where the readers look: ``<root>/<Class>/raw`` for the
    IDX datasets (its ``raw_folder``), ``<root>/<base_folder>`` for CIFAR-10."""
    import torchvision.datasets as tvd

    spec = dataset_spec(name)
    cls = getattr(tvd, spec.download_class)
    if spec.layout == "cifar":
        assert cls.base_folder == spec.torchvision_folder
    else:
        folder = cls.__new__(cls)
        folder.root = "ROOT"
        assert Path(folder.raw_folder) == Path("ROOT") / spec.torchvision_folder / "raw"


FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_facts_match_the_real_files():
    """Split sizes, shape, classes and the normalization (mean/std of the training pixels in [0, 1],
    to the 4 digits registered) computed from Debian's files with numpy alone."""
    spec = dataset_spec("fashion-mnist")
    train, test = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-images-idx3-ubyte.gz")
    labels = _idx(FASHION / "train-labels-idx1-ubyte.gz")
    assert (len(train), len(test)) == (spec.train_size, spec.test_size)
    assert train.shape[1:] == spec.shape[1:] and spec.in_channels == 1
    assert len(np.unique(labels)) == spec.num_classes
    counts = np.bincount(train.ravel(), minlength=256)   # pixel values' histogram: exact moments, fast
    values = np.arange(256) / 255
    pixel_mean = (counts * values).sum() / counts.sum()
    pixel_std = np.sqrt((counts * (values - pixel_mean) ** 2).sum() / counts.sum())
    (mean,), (std,) = spec.normalization
    assert abs(pixel_mean - mean) < 1e-4 and abs(pixel_std - std) < 1e-4


def test_synthetic_split_has_the_registered_sizes_and_shape():
    spec = dataset_spec("synthetic")
    for train, size in ((True, spec.train_size), (False, spec.test_size)):
        split = load_split("synthetic", train)
        assert split.x.shape == (size, *spec.shape)
        assert int(split.y.max()) == spec.num_classes - 1


def test_idx_reader_uses_the_registered_normalization_and_torchvision_folder(tmp_path):
    """A made-up IDX split in torchvision's layout of each IDX dataset, standardised as registered."""
    rng = np.random.default_rng(0)
    for name in (n for n, s in DATASET_SPECS.items() if s.layout == "idx"):
        spec = dataset_spec(name)
        images = rng.integers(0, 256, (6, spec.image_size, spec.image_size))
        raw = tmp_path / name / spec.torchvision_folder / "raw"
        write_idx(raw, "train", images, rng.integers(0, 10, 6), True)
        write_idx(raw, "t10k", images[:2], rng.integers(0, 10, 2), True)
        x = load_split(name, True, data_dir=tmp_path / name, strict=True).x.double().numpy()
        (mean,), (std,) = spec.normalization
        np.testing.assert_allclose(x[:, 0], (images / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_derived_lists_and_texts_name_every_dataset():
    assert choices.DATASETS == DATASET_NAMES
    assert TEST_SPLIT_SIZES == {"mnist": 10_000, "fashion-mnist": 10_000, "cifar10": 10_000, "synthetic": 512}
    text = datasets_help()
    for name, spec in DATASET_SPECS.items():
        assert f"{name} ({spec.in_channels}x{spec.image_size}x{spec.image_size}, {spec.num_classes} classes" in text
        info = dataset_info(name)
        assert (info.in_channels, info.image_size, info.num_classes) == (spec.in_channels, spec.image_size,
                                                                         spec.num_classes)


def test_unknown_dataset_is_one_clear_error():
    with pytest.raises(NfmError, match="unknown dataset 'svhn'; valid datasets: mnist, fashion-mnist, cifar10"):
        dataset_spec("svhn")
    with pytest.raises(NfmError, match="unknown dataset"):
        load_split("svhn", True)
