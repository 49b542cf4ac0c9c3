"""nfm_cli.data.datasets: loaders on small files in the real formats, subsets, random labels."""
import pickle

import numpy as np
import pytest
import torch

from nfm_cli.data.datasets import load_split, randomize_labels, subset_indices, synthetic_split
from nfm_cli.errors import NfmError
from tests.conftest import write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_flat_layout(tmp_path, compress):
    rng = np.random.default_rng(0)
    train_img, train_lab = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    test_img, test_lab = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    write_idx(tmp_path / "mnist", "train", train_img, train_lab, compress)
    write_idx(tmp_path / "mnist", "t10k", test_img, test_lab, compress)
    split = load_split("mnist", True, data_dir=tmp_path)  # <data-dir>/<name> is searched too
    assert split.x.shape == (12, 1, 28, 28) and split.x.dtype == torch.float32
    assert torch.equal(split.y, torch.tensor(train_lab, dtype=torch.int64))
    expected = (torch.tensor(train_img, dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(split.x[:, 0], expected)
    assert len(load_split("mnist", False, data_dir=tmp_path / "mnist")) == 5


def test_idx_files_torchvision_layout_via_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw, "train", rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7), False)
    write_idx(raw, "t10k", rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3), False)
    monkeypatch.setenv("NFM_DATA", str(tmp_path))
    assert len(load_split("fashion-mnist", True)) == 7


def test_cifar10_pickle_batches(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        batches[name] = (data, labels)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    train = load_split("cifar10", True, data_dir=tmp_path)
    assert train.x.shape == (20, 3, 32, 32)
    first = torch.tensor(batches["data_batch_1"][0][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(train.x[0], (first - mean) / std)
    assert train.y.tolist()[:4] == batches["data_batch_1"][1]
    assert len(load_split("cifar10", False, data_dir=tmp_path)) == 4


def test_missing_dataset_offline_is_one_clear_error(tmp_path):
    with pytest.raises(NfmError) as err:
        load_split("cifar10", True, data_dir=tmp_path)
    msg = str(err.value)
    assert "not found" in msg and str(tmp_path) in msg and "--download" in msg and "\n" not in msg


def test_random_label_fraction_is_seeded_and_about_27_percent():
    labels = torch.randint(10, (20000,), generator=torch.Generator().manual_seed(5))
    noisy = randomize_labels(labels, 0.3, 10, seed=3)
    changed = (noisy != labels).float().mean().item()
    assert abs(changed - 0.27) < 0.01  # 30% redrawn, 1/10 of those land on the true label
    assert torch.equal(noisy, randomize_labels(labels, 0.3, 10, seed=3))
    assert not torch.equal(noisy, randomize_labels(labels, 0.3, 10, seed=4))
    assert torch.equal(randomize_labels(labels, 0.0, 10, seed=3), labels)
    assert abs((randomize_labels(labels, 1.0, 10, 3) != labels).float().mean().item() - 0.9) < 0.01
    with pytest.raises(NfmError):
        randomize_labels(labels, 1.5, 10, 0)


def test_subset_is_seeded_sorted_and_distinct():
    a = subset_indices(1000, 100, seed=1)
    assert torch.equal(a, subset_indices(1000, 100, seed=1))
    assert len(set(a.tolist())) == 100 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, subset_indices(1000, 100, seed=2))
    assert torch.equal(subset_indices(10, None, 0), torch.arange(10))


def test_synthetic_is_deterministic_and_learnable():
    a, b = synthetic_split(True), synthetic_split(True)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # nearest class mean classifies far above chance but not perfectly
    means = torch.stack([a.x[a.y == k].mean(0) for k in range(10)]).flatten(1)
    test = synthetic_split(False)
    pred = torch.cdist(test.x.flatten(1), means).argmin(1)
    acc = (pred == test.y).float().mean().item()
    assert 0.5 < acc < 1.0


def test_shared_splits_reads_the_files_once_and_hands_out_labels_as_copies(tmp_path, monkeypatch):
    import os

    from nfm_cli.data import datasets
    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    write_idx(tmp_path / "mnist", "train", images, labels, False)
    write_idx(tmp_path / "mnist", "t10k", images[:2], labels[:2], False)
    reads = []
    real = datasets._decoded
    monkeypatch.setattr(datasets, "_decoded", lambda *a: reads.append(a[1]) or real(*a))
    expected = (torch.tensor(images, dtype=torch.float32) / 255 - 0.1307) / 0.3081
    with datasets.shared_splits():
        first = load_split("mnist", True, data_dir=tmp_path)
        first.y.zero_()                                        # a caller changing its labels ...
        with datasets.shared_splits():                         # (nested: the same store)
            second = load_split("mnist", True, data_dir=tmp_path)
        assert reads == [True]
        assert torch.equal(second.y, torch.tensor(labels))    # ... changes no one else's
        torch.testing.assert_close(second.x[:, 0], expected, rtol=0, atol=0)
        path = tmp_path / "mnist" / "train-images-idx3-ubyte"  # changed files are read again
        write_idx(tmp_path / "mnist", "train", images[::-1], labels[::-1], False)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        changed = load_split("mnist", True, data_dir=tmp_path)
        torch.testing.assert_close(changed.x[:, 0], expected.flip(0), rtol=0, atol=0)
        assert reads == [True, True]
    load_split("mnist", True, data_dir=tmp_path)                # outside the block: no process cache
    assert reads == [True, True, True]
