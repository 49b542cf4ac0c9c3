"""nfm_cli.data.files: IDX/CIFAR files read without torchvision, and the decoded, fingerprinted cache."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import nfm_cli.data.datasets as data
from nfm_cli.data.datasets import load_split
from nfm_cli.errors import NfmError
from tests.conftest import write_idx


def _mnist(folder, seed, n=9):
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    write_idx(folder, "train", images, labels, compress=True)
    write_idx(folder, "t10k", images[:3], labels[:3], compress=True)
    return images, labels


def _expected(images):
    return (torch.tensor(images, dtype=torch.float32).div(255) - 0.1307) / 0.3081


@pytest.fixture
def decodes(monkeypatch):
    """Counts how often the IDX files are actually decoded."""
    count = {"n": 0}
    real = data.read_idx_split

    def counting(*files):
        count["n"] += 1
        return real(*files)

    monkeypatch.setattr(data, "read_idx_split", counting)
    return count


def test_second_load_comes_from_the_cache_and_a_changed_file_is_decoded_again(tmp_path, decodes):
    folder = tmp_path / "mnist"
    images, labels = _mnist(folder, 0)
    first = load_split("mnist", True, data_dir=folder)
    second = load_split("mnist", True, data_dir=folder)
    assert decodes["n"] == 1
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    torch.testing.assert_close(second.x[:, 0], _expected(images), rtol=0, atol=0)
    assert torch.equal(second.y, torch.tensor(labels))

    new_images, new_labels = _mnist(folder, 1)  # the same file names, other content
    third = load_split("mnist", True, data_dir=folder)
    assert decodes["n"] == 2
    torch.testing.assert_close(third.x[:, 0], _expected(new_images), rtol=0, atol=0)
    assert torch.equal(third.y, torch.tensor(new_labels))
    entries = sorted(p.name for p in (data.cache_dir() / "decoded").iterdir())
    assert len(entries) == 1 and entries[0].startswith("mnist-train-")  # the stale entry is gone


def test_a_damaged_cache_entry_is_ignored_and_rewritten(tmp_path, decodes):
    folder = tmp_path / "mnist"
    images, _ = _mnist(folder, 2)
    load_split("mnist", True, data_dir=folder)
    (entry,) = (data.cache_dir() / "decoded").iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    again = load_split("mnist", True, data_dir=folder)
    assert decodes["n"] == 2
    torch.testing.assert_close(again.x[:, 0], _expected(images), rtol=0, atol=0)
    assert load_split("mnist", True, data_dir=folder).y.shape == (9,) and decodes["n"] == 2


def test_inputs_of_a_subset_equal_the_rows_of_the_whole_split(tmp_path):
    folder = tmp_path / "mnist"
    _mnist(folder, 3)
    split = load_split("mnist", True, data_dir=folder)
    idx = torch.tensor([7, 0, 4])
    assert torch.equal(split.inputs(idx), split.x[idx])


def test_truncated_idx_file_is_one_clear_error(tmp_path):
    folder = tmp_path / "mnist"
    _mnist(folder, 4)
    path = folder / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as fh:
        fh.write(payload[:-10])
    with pytest.raises(NfmError) as err:
        load_split("mnist", True, data_dir=folder)
    assert "truncated" in str(err.value) and str(path) in str(err.value)


def test_idx_header_is_checked(tmp_path):
    folder = tmp_path / "mnist"
    _mnist(folder, 5)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    (folder / "train-labels-idx1-ubyte").write_bytes(struct.pack(">I", 0x00000D01) + b"\0" * 9)
    with pytest.raises(NfmError, match="bad magic number"):
        load_split("mnist", True, data_dir=folder)


@pytest.mark.integration
def test_reading_dataset_files_does_not_import_torchvision(tmp_path):
    folder = tmp_path / "mnist"
    _mnist(folder, 6)
    code = ("import sys\nfrom nfm_cli.data.datasets import load_split\n"
            f"load_split('mnist', True, data_dir={str(folder)!r})\n"
            "print('torchvision' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, NFM_CACHE=str(tmp_path / "cache")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
